"""Verifying what the device decided, in position order (docs/PROTOCOL.md §6, G4-G8, "Settlement"):
the methods of `GatewayProtocol` that take the device's `need_taps`, `side` and `settled`, hand out
taps and heads, and resolve each sigma = 1 position — by the host's verdict, or by the token the
device settled — rolling back (or adopting a branch line) where its token changed the draft.
"""

import dataclasses
from collections import deque

import numpy as np

from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway.actions import CutLine, DropLine, ForgetStates, Head, SendTaps
from spa.protocol.gateway.drafts import SidePos


class Verifying:
    """Mixed into GatewayProtocol: these methods work on its state."""

    def _on_need_taps(self, msg: m.NeedTaps) -> None:
        self._decide_through(msg.pos, "need_taps.pos")  # positions < pos are sigma = 0
        self._sides[msg.pos] = SidePos()
        self.stats.side_positions += 1
        self.stats.early_taps += bool(self._drafting)
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._sides))
        self._actions.append(SendTaps(self.main, msg.pos))

    def _on_side(self, msg: m.Side) -> None:
        side = self._side_of(msg.pos, "side.pos")
        if side is None or not side.taps_sent or side.s is not None or side.token is not None:
            raise ProtocolError("out_of_order", f"side for position {msg.pos} was not asked for")
        expected = (1, self.backbone.hidden_size)
        if msg.s_array.shape != expected:
            raise ProtocolError("bad_field", f"side.s has shape {msg.s_array.shape}, expected {expected}")
        side.s = msg.s_array[0]

    def _decide_through(self, pos: int, what: str) -> None:
        """The device decided every position up to pos (sigma = 0 before it)."""
        if not self._drafts or not self.decided <= pos <= self._drafts[-1].pos:
            raise ProtocolError("out_of_order", f"{what} = {pos} is not an undecided drafted position")
        self.decided = pos + 1

    def _on_settled(self, msg: m.Settled) -> None:
        """The device proved the token of a sigma = 1 position whose taps (with exact f) it got."""
        side = self._side_of(msg.pos, "settled.pos")
        if not self.settling or side is None or not side.taps_sent or side.s is not None or side.token is not None:
            raise ProtocolError("out_of_order", f"settled for position {msg.pos}, whose taps were not sent with exact "
                                                f"f (or that was already answered)")
        if msg.token >= len(self.pieces):
            raise ProtocolError("bad_field", f"settled.token: {msg.token} is beyond the vocabulary ({len(self.pieces)})")
        side.token = msg.token

    def _side_of(self, pos: int, what: str) -> SidePos | None:
        """The sigma = 1 position pos, taking its decision from the message itself where its taps
        came with its step (pushed): such a message decides every position before it."""
        side = self._sides.get(pos)
        if side is None and pos in self.pushed and pos >= self.decided:
            self._decide_through(pos, what)
            side = self._sides[pos] = SidePos(taps_sent=True)
            self.stats.side_positions += 1
            self.stats.pushed_used += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._sides))
        return side

    # --- verification ----------------------------------------------------

    def _verify(self) -> None:
        """Verify in order what the device decided: sigma = 0 positions commit their draft; a
        sigma = 1 position waits for its side output, then asks the host for its head (one at a
        time: its verdict may roll back)."""
        while self.verified < self.decided and not self.finish_reason:
            pos = self.verified
            side = self._sides.get(pos)
            if side is None:
                entry = self._drafts[0]
                self._pop_through(pos)
                self._committed(m.Commit(pos, entry.token, entry.piece, sigma=False))
                if pos == self.branching.at:  # predicted sigma = 1 (pushed taps), but the device accepted it
                    self._actions.extend(self.branching.close())
                continue
            if side.token is not None:  # settled on the device: no head, no verdict message
                self._resolve(pos, side.token, self.pieces[side.token], settled=True)
                continue
            if side.s is not None and not side.head_asked:
                side.head_asked = True
                self.stats.heads += 1
                self._actions.append(Head(self.main, pos, side.s))
            return

    def _pop_through(self, pos: int) -> None:
        """Drop the main line's drafts up to pos (verified now)."""
        while self._drafts and self._drafts[0].pos <= pos:
            self._drafts.pop(0)
        self.verified = pos + 1
        self.decided = max(self.decided, self.verified)
        self.pushed = {p for p in self.pushed if p > pos}
        self._actions.append(ForgetStates(self.main, pos))

    def _committed(self, commit: m.Commit) -> None:
        """Position commit.pos is verified with commit.token (a draft or a verdict)."""
        self._commits.append(commit)
        if commit.token in self.eos_ids:
            self.finish_reason = "eos"
        elif commit.pos - self.first_pos + 1 >= self.hello.options.max_new_tokens:
            self.finish_reason = "max_tokens"

    def taps_ready(self, pos: int, taps: np.ndarray) -> None:
        """The taps of pos for SendTaps: [n_taps, H], or [n_taps, r] projected with the uploaded
        projection."""
        cols = self.backbone.hidden_size if self.projection is None else self.projection[1].shape[1]
        self._require(taps.shape == (len(self.hello.plugin.taps), cols), f"taps of shape {taps.shape}")
        exact = self._exact_of(pos)
        if self._held is not None and self._held["pos"] == pos:  # pushed with its step
            self._held["taps"] = self._encode(taps)
            if exact is not None:
                self._held["exact"] = exact
            self._outbox.append(self._held)
            self._held = None
            self.pushed.add(pos)
            self.stats.pushed += 1
            return
        side = self._sides.get(pos)
        self._require(side is not None and not side.taps_sent, f"taps_ready({pos}) not asked for")
        side.taps_sent = True
        self._outbox.append(m.Taps(self.epoch, pos, self._encode(taps), exact=exact).to_dict())

    def _exact_of(self, pos: int) -> dict | None:
        """f_pos itself, for a settling session's taps."""
        if not self.settling:
            return None
        return next(d.exact for d in self._drafts if d.pos == pos)

    def verdict_ready(self, pos: int, token: int, piece: bytes) -> None:
        """The side-corrected token for Head(pos)."""
        side = self._sides.get(pos)
        self._require(pos == self.verified and side is not None and side.head_asked,
                      f"verdict_ready({pos}) without its side output")
        self._resolve(pos, int(token), bytes(piece), settled=False)
        self._verify()
        self._maybe_end()

    def _resolve(self, pos: int, token: int, piece: bytes, settled: bool) -> None:
        """The sigma = 1 position pos (the next to verify) has its token: a verdict's (sent to the
        device) or the device's own (settled). When it differs from the draft, later drafts (and the
        device's decisions on them) are void: the epoch moves on and the host gets CutLine(main,
        pos + 1) before any further Draft, or, on a branch hit, that branch line becomes the main
        line with its drafts (sent to the device now, unless it has them already: streamed)."""
        changed = token != self._drafts[0].token
        del self._sides[pos]
        self._pop_through(pos)
        adopted = None  # the branch line that drafted this token, if any: it becomes the main line
        if pos == self.branching.at and changed:
            adopted = self.branching.hit(token)
        if pos == self.branching.at or changed:  # resolved, or the branches continue void drafts
            self._actions.extend(self.branching.close(keep=adopted))
        if changed:
            self.stats.discarded += len(self._drafts)
            self.stats.rollbacks += 1
            self._sides.clear()
            self.pushed.clear()
            self.decided = pos + 1
            self.epoch += 1
            # Queued work for the voided positions is void too.
            if self._held is not None and self._held["pos"] > pos:
                self._held = None
            self._actions = deque(a for a in self._actions if not isinstance(a, (SendTaps, Head)) or a.pos <= pos)
            if adopted is None:
                self._drafts.clear()
                self._next_feed = token
                self._actions.append(CutLine(self.main, pos + 1))
            else:  # its KV cache holds pos + 1 ... already: no decode step to wait for
                self._actions.append(DropLine(self.main))
                self.main = adopted.line
                self._branch_line_ids.discard(adopted.line)
                self._drafts, self._next_feed = adopted.drafts, adopted.feed
                if adopted.line in self._drafting:  # its draft in progress is the main line's next one
                    self._drafting[adopted.line] = dataclasses.replace(self._drafting[adopted.line], epoch=self.epoch)
                    self._round = deque(dataclasses.replace(d, epoch=self.epoch) if d.line == adopted.line else d
                                        for d in self._round)
        self._committed(m.Commit(pos, token, piece, sigma=True))
        if settled:
            self.stats.settled += 1
            self.stats.settled_changed += changed
        else:
            self._outbox.append(self._refreshed(m.Verdict(self.epoch, pos, token, piece, changed).to_dict()))
        if adopted is not None and not self.settling:  # its steps, in the new epoch (no pushed taps: the
            self._outbox += [self._step(d) for d in self._drafts]  # device asks where it needs them)
            self.stats.drafts += len(self._drafts)

