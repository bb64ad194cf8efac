"""The device's side of a session, sans I/O (docs/PROTOCOL.md §6).

The caller owns the websocket, the gate and the side network:

    dp = DeviceProtocol(hello, max_in_flight=N);  send dp.hello_message()
    on each received map:   dp.receive(frames.unpack(data))
    then until it is None:  action = dp.next_action()
        RunGate(pos, f, m)  -> dp.gated(pos, gate(f) > tau), or gate([f, m]) for a
                               margin gate (m: the step's margin, options.gate_margin)
        RunSide(pos, taps)  -> dp.side_output(pos, side(taps)), or
                               side_projected(taps) when action.projected
        RunHead(pos, f, s)  -> dp.certified(pos, token, piece): a settling session's proof
                               (spa.model.output_head.OutputHead.certify), token None if
                               it does not hold
    when no received message is waiting (or after each one: lock-step):
                            send each of dp.flush()
    dp.ended -> done; dp.committed holds the text
    connection lost before the end: on a new connection send
                            dp.resume_hello(); the gateway answers `resumed`,
                            then steps (or `end`) follow as before

Positions are gated in order. A sigma = 1 position asks for its taps (or
uses the taps pushed with its step) and sends its side output; with
`max_in_flight` > 1 the device goes on gating the next drafts meanwhile, so
up to that many side outputs are in flight, each conditional on the drafts
before it. A position is committed only once it and every earlier position
are settled (sigma = 0: the draft; sigma = 1: the verdict's token), so
nothing shown to the user is ever taken back. A verdict that changes its
token voids every later decision: the gateway drops the device's messages
about them by their old epoch, and the device drops its own state.

Settlement (version 3, `options.settle`, once `ready.settle` agrees): with a
position's taps the gateway sends the exact `f_t`; after the side output the
device tries to prove its token (`RunHead`). A proven token is committed here,
in order, like a verdict's, and only the token goes up (`settled`): the side
output stays on the device. Where the proof does not hold, `side` goes up and
the verdict decides, as without settlement. A settled token that changes the
draft voids every later decision at once, and when the gateway streamed the
branch line of that token (`step.branch`), its drafts become the main line's:
gating goes on without a round trip.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from spa.protocol import codec
from spa.protocol import messages as m
from spa.protocol.device_settle import Settling
from spa.protocol.errors import PeerError, ProtocolError


@dataclass(frozen=True)
class RunGate:
    pos: int
    f: np.ndarray  # decoded f_pos, [1, hidden_size]
    margin: float | None = None  # the backbone's top-2 logit margin at pos (hello.options.gate_margin)


@dataclass(frozen=True)
class RunSide:
    pos: int
    taps: np.ndarray  # decoded T_pos, [n_taps, hidden_size]; [n_taps, r] when projected
    projected: bool = False  # the cloud applied the per-tap projections (hello.projection)


@dataclass(frozen=True)
class RunHead:
    pos: int
    f: np.ndarray  # the exact f_pos [H], from the gateway
    s: np.ndarray  # the side output as the gateway decodes it [H]


Action = RunGate | RunSide | RunHead


Commit = m.Commit  # one committed position: pos t, token x_{t+1}, its text piece


@dataclass
class DeviceStats:
    """Everything the device protocol counts for one session."""

    side_positions: int = 0  # sigma = 1 positions
    rollbacks: int = 0  # verdicts with changed = True
    dropped: int = 0  # steps voided by those verdicts
    pushed_used: int = 0  # sigma = 1 positions answered from pushed taps (no need_taps)
    resumes: int = 0
    max_in_flight: int = 0  # most side outputs awaiting their verdict at once
    settled: int = 0  # committed sigma = 1 positions whose token the device proved itself (settlement)
    unproven: int = 0  # sigma = 1 positions of a settling session where the proof did not hold: side sent
    branch_adopted: int = 0  # streamed branch steps that became main-line steps after a change


class DeviceProtocol(Settling):
    def __init__(self, hello: m.Hello, max_in_flight: int = 1):
        """`max_in_flight`: how many sigma = 1 positions may await their verdict
        at once (1: gate the next draft only after the verdict, as lock-step)."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.hello = hello
        self.window = hello.options.window
        self.max_in_flight = max_in_flight
        self.phase = "hello"  # -> "generating" (<-> "resuming") -> "ended"
        self.ready: m.Ready | None = None
        self.epoch = 0
        self.next_pos = 0  # next position to commit
        self.next_gate = 0  # next position to gate
        # Received steps not yet committed (all of this epoch), with decoded f.
        self.steps: dict[int, tuple[m.Step, np.ndarray]] = {}
        self.pushed: dict[int, np.ndarray] = {}  # decoded taps that came with those steps (hello.gate)
        self.last_step_pos = -1
        self.sent_upto = 0  # every position < sent_upto has its decision sent (or queued)
        # sigma of gated, uncommitted positions; for sigma = 1 also where its side stands:
        self.sigma: dict[int, bool] = {}
        # sigma = 1 pos -> "taps" | "side" | "head" (settling: the proof is computed) | "verdict" | "settled"
        self.side_state: dict[int, str] = {}
        self.taps: dict[int, np.ndarray] = {}  # decoded taps of positions in state "side"
        # Settlement: whether the session settles (the hello asked, ready agreed); the exact f of
        # positions whose taps came; the side output of positions in state "head" (encoded, decoded);
        # the proven (token, piece) of positions in state "settled"; streamed branch lines by
        # (branch point, token); the branch point a change adopted (its late branch steps are main).
        self.settles = False
        self.exact: dict[int, np.ndarray] = {}
        self.heads: dict[int, tuple[dict, np.ndarray]] = {}
        self.proven: dict[int, tuple[int, bytes]] = {}
        self.branches: dict[tuple[int, int], list[tuple[m.Step, np.ndarray]]] = {}
        self.adopted: tuple[int, int] | None = None
        self.pending_accept: int | None = None  # end of a sigma = 0 run not yet sent
        self.outbox: list[dict] = []
        self.committed: list[Commit] = []
        self.changed_positions: set[int] = set()  # positions whose verdict changed the draft (rollbacks)
        self.end: m.End | None = None
        self.stats = DeviceStats()
        self.session: str | None = None  # from ready
        self.secret: str | None = None  # latest resume secret (ready, then each resumed)

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    @property
    def in_flight(self) -> int:
        """sigma = 1 positions awaiting their verdict."""
        return len(self.side_state)

    @property
    def gateway_verified(self) -> int:
        """The most the gateway can have verified from what we sent: every
        decided position, up to the first side output still awaiting its verdict."""
        return min([self.sent_upto, *self.side_state])

    def hello_message(self) -> dict:
        return self.hello.to_dict()

    def upload(self, projection: m.Projection) -> None:
        """The gateway answered `upload_needed`: the next hello carries the projection's weights."""
        self._require(self.phase in ("hello", "resuming") and self.hello.projection is not None
                      and projection.digest == self.hello.projection.digest, "upload()")
        self.hello = dataclasses.replace(self.hello, projection=projection)

    def text(self) -> str:
        """The committed text; a trailing partial UTF-8 character shows as U+FFFD."""
        return b"".join(c.piece for c in self.committed).decode("utf-8", errors="replace")

    # --- incoming ------------------------------------------------------

    def receive(self, d: dict) -> None:
        msg = m.parse(d, "device")
        if isinstance(msg, m.Error):
            raise PeerError(msg.code, msg.message)
        if isinstance(msg, m.Ready):
            return self._on_ready(msg)
        if isinstance(msg, m.Resumed):
            return self._on_resumed(msg)
        if not isinstance(msg, (m.Step, m.Taps, m.Verdict, m.End)):
            raise ProtocolError("unknown_type", f"the device does not receive {msg.TYPE!r}")
        if self.phase != "generating":
            raise ProtocolError("out_of_order", f"{msg.TYPE} outside generation")
        if isinstance(msg, m.Step):
            return self._on_step(msg)
        if isinstance(msg, m.Taps):
            return self._on_taps(msg)
        if isinstance(msg, m.Verdict):
            return self._on_verdict(msg)
        return self._on_end(msg)

    def _on_ready(self, ready: m.Ready) -> None:
        if self.phase != "hello":
            raise ProtocolError("out_of_order", "second ready")
        if ready.backbone.fingerprint != self.hello.plugin.fingerprint:
            raise ProtocolError(
                "backbone_mismatch",
                f"gateway serves {ready.backbone.fingerprint!r}, "
                f"plugin needs {self.hello.plugin.fingerprint!r}",
            )
        self.ready = ready
        self.settles = self.hello.options.settle and ready.settle
        self.session, self.secret = ready.session, ready.secret
        self.next_pos = self.next_gate = self.sent_upto = ready.prompt_tokens - 1
        self.last_step_pos = self.next_pos - 1
        self.phase = "generating"

    def resume_hello(self) -> dict:
        """The `hello` that resumes this session on a new connection. Everything
        not committed is dropped: the gateway sends the steps again from the
        first position it has not verified, and the device gates them again."""
        self._require(self.phase in ("generating", "resuming") and self.session is not None, "resume_hello()")
        self.phase = "resuming"
        # Everything a gateway that does not hold the session needs to rebuild
        # it: the committed token ids and the first hello's uploads.
        resume = m.Resume(self.session, self.secret, self.next_pos, tuple(c.token for c in self.committed))
        h = self.hello
        return m.Hello(h.token, h.plugin, h.prompt, h.options, resume, h.version, h.projection, h.gate,
                       h.compression).to_dict()

    def _on_resumed(self, r: m.Resumed) -> None:
        self._expect(self.phase == "resuming", "resumed without a resume hello")
        self._expect(r.session == self.session, f"resumed names session {r.session!r}, not {self.session!r}")
        # The verified positions we missed (a lost verdict, and what the gateway verified after it).
        self._expect([c.pos for c in r.commits] == list(range(self.next_pos, self.next_pos + len(r.commits)))
                     and r.pos == self.next_pos + len(r.commits),
                     f"resumed commits {[c.pos for c in r.commits]} then position {r.pos}; "
                     f"the device is at {self.next_pos}")
        for c in r.commits:  # its sigma as the gateway knew it (our own decision may have been voided)
            self._commit(c.pos, c.token, c.piece, c.sigma)
        self.branches.clear()  # the gateway dropped its branch lines
        self.adopted = None
        self.secret, self.epoch = r.secret, r.epoch
        self._forget_after(r.pos - 1)
        self.pending_accept = None
        self.last_step_pos = r.pos - 1
        self.next_gate = self.sent_upto = r.pos
        self.outbox = []
        self.stats.resumes += 1
        self.phase = "generating"

    def _on_step(self, step: m.Step) -> None:
        if step.branch is not None and (step.branch.pos, step.branch.token) != self.adopted:
            return self._on_branch_step(step)
        if step.branch is not None:  # the line a change adopted: streamed before the gateway learned of it
            step = dataclasses.replace(step, epoch=self.epoch, branch=None)
            self.stats.branch_adopted += 1
        if self.settles and (step.epoch < self.epoch or step.pos > self._void_after()):
            # A settling device changes tokens itself: the drafts the gateway made before it learned
            # of the change arrive after it (in the old epoch, or past a change not committed yet)
            # and are void.
            self.stats.dropped += 1
            return
        # Without settlement, steps voided by a rollback all arrive before its verdict (one
        # ordered stream), so any step that arrives carries the current epoch.
        self._expect(step.epoch == self.epoch, f"step of epoch {step.epoch}, expected {self.epoch}")
        self._expect(step.pos == self.last_step_pos + 1, f"step {step.pos} after step {self.last_step_pos}")
        self._expect(
            step.pos <= self.gateway_verified + self.window,
            f"step {step.pos} beyond window {self.window} after position {self.gateway_verified}",
        )
        if step.secret is not None:  # a refreshed resume token
            self.secret = step.secret
        if self.hello.options.gate_margin and step.margin is None:
            raise ProtocolError("bad_field", f"step {step.pos} has no margin, which the hello asked for "
                                             f"(options.gate_margin); this gateway may predate gate margins")
        self.steps[step.pos] = (step, self._shaped(step.f_array, "step.f", 1))
        if step.taps is not None:
            self._expect(self.hello.gate is not None, f"step {step.pos} pushes taps; the hello did not ask for that")
            self.pushed[step.pos] = self._taps_of(step.taps_array, "step.taps")
            self._keep_exact(step.pos, step.exact_array, "step.exact")
        self.last_step_pos = step.pos

    def _on_taps(self, taps: m.Taps) -> None:
        if self.settles and (taps.epoch < self.epoch or taps.pos > self._void_after()):
            return  # asked for before a token we proved changed its draft: void (the gateway drops it too)
        self._expect(self.side_state.get(taps.pos) == "taps", f"taps for position {taps.pos} not asked for")
        self._expect(taps.epoch == self.epoch, f"taps of epoch {taps.epoch}, expected {self.epoch}")
        self.taps[taps.pos] = self._taps_of(taps.taps_array, "taps.taps")
        self._keep_exact(taps.pos, taps.exact_array, "taps.exact")
        self.side_state[taps.pos] = "side"

    def _taps_of(self, x: np.ndarray, what: str) -> np.ndarray:
        proj = self.hello.projection
        cols = self.ready.backbone.hidden_size if proj is None else proj.rank
        return self._shaped(x, what, len(self.hello.plugin.taps), cols)

    def _on_verdict(self, v: m.Verdict) -> None:
        # The gateway verifies in order: a verdict is for the first uncommitted position.
        self._expect(v.pos == self.next_pos and self.side_state.get(v.pos) == "verdict",
                     f"verdict for position {v.pos} not expected")
        draft = self.steps[v.pos][0].draft
        self._expect(v.changed == (v.token != draft), "verdict.changed disagrees with the draft")
        self._expect(v.epoch == self.epoch + v.changed, f"verdict epoch {v.epoch} after epoch {self.epoch}")
        if v.secret is not None:  # a refreshed resume token
            self.secret = v.secret
        self._commit(v.pos, v.token, v.piece, True)
        if v.changed:  # drafts after pos were built on the old token, and so were our decisions on them
            self._changed(v.pos, v.token, v.epoch)
        self._commit_settled()

    def _forget_after(self, pos: int) -> None:
        """Drop every uncommitted decision and step past pos (and queued messages about them)."""
        self.steps = {p: st for p, st in self.steps.items() if p <= pos}
        self.pushed.clear()
        for state in (self.exact, self.heads, self.proven):
            for p in [p for p in state if p > pos]:
                del state[p]
        self.sigma = {p: x for p, x in self.sigma.items() if p <= pos}
        self.side_state = {p: x for p, x in self.side_state.items() if p <= pos}
        self.taps = {p: x for p, x in self.taps.items() if p <= pos}
        if self.pending_accept is not None and self.pending_accept > pos:
            self.pending_accept = None
        self.outbox = [d for d in self.outbox if d.get("pos", d.get("upto", -1)) <= pos]

    def _on_end(self, end: m.End) -> None:
        self._expect(
            not self.side_state and not self.steps and self.pending_accept is None,
            "end while positions are unverified",
        )
        self._expect(
            end.stats["tokens"] == len(self.committed),
            f"end reports {end.stats['tokens']} tokens, {len(self.committed)} committed",
        )
        self.end = end
        self.phase = "ended"

    # --- the caller's work ---------------------------------------------

    def next_action(self) -> Action | None:
        """What to compute next, or None until more messages arrive: a side
        output whose taps are here first, then the next gate if fewer than
        max_in_flight side outputs await their verdict."""
        if self.phase != "generating":
            return None
        for pos in sorted(self.heads):
            if self.side_state.get(pos) == "head":
                return RunHead(pos, self.exact[pos], self.heads[pos][1][0])
        for pos in sorted(self.taps):
            return RunSide(pos, self.taps[pos], self.hello.projection is not None)
        if self.next_gate in self.steps and self.in_flight < self.max_in_flight and not self._change_pending():
            step, f = self.steps[self.next_gate]
            return RunGate(self.next_gate, f, step.margin if self.hello.options.gate_margin else None)
        return None

    def gated(self, pos: int, sigma: bool) -> None:
        """Report sigma for the position of the last RunGate."""
        self._require(pos == self.next_gate and pos in self.steps and self.in_flight < self.max_in_flight,
                      f"gated({pos})")
        self.next_gate = pos + 1
        self.sigma[pos] = bool(sigma)
        pushed = self.pushed.pop(pos, None)
        if not sigma:
            self.pending_accept = pos
            self._commit_settled()
            return
        self.stats.side_positions += 1
        self.pending_accept = None  # need_taps (or a side for pushed taps) implies it
        self.sent_upto = pos + 1
        if pushed is not None:  # the taps came with the step: no need_taps round trip
            self.stats.pushed_used += 1
            self.taps[pos], self.side_state[pos] = pushed, "side"
        else:
            self.outbox.append(m.NeedTaps(self.epoch, pos).to_dict())
            self.side_state[pos] = "taps"
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)

    def side_output(self, pos: int, s: np.ndarray) -> None:
        """Report s [1, H] for the position of a RunSide."""
        self._require(self.side_state.get(pos) == "side", f"side_output({pos})")
        opts = self.hello.options
        encoded = codec.encode(s, opts.codec, opts.outliers)
        del self.taps[pos]
        if self.settles and pos in self.exact and opts.temperature == 0:  # try to prove the token first
            self.heads[pos] = (encoded, codec.decode(encoded))
            self.side_state[pos] = "head"
            return
        self.outbox.append(m.Side(self.epoch, pos, encoded).to_dict())
        self.side_state[pos] = "verdict"

    def flush(self) -> list[dict]:
        """Messages to send now, in order; a run of sigma = 0 positions becomes
        one `accept`. Call it when no received message is waiting."""
        if self.pending_accept is not None:
            self.outbox.append(m.Accept(self.epoch, self.pending_accept).to_dict())
            self.sent_upto = self.pending_accept + 1
            self.pending_accept = None
        out, self.outbox = self.outbox, []
        return out

    # --- helpers -------------------------------------------------------

    def _commit_settled(self) -> None:
        """Commit, in order, the positions that are settled: sigma = 0 ones (their draft) and proven
        ones (their token; a change begins the new epoch, as a changed verdict does), until one
        still awaits its side output or verdict."""
        while True:
            pos = self.next_pos
            if self.sigma.get(pos) is False:
                step = self.steps[pos][0]
                self._commit(pos, step.draft, step.piece, False)
            elif pos in self.proven and self.side_state.get(pos) == "settled":
                token, piece = self.proven.pop(pos)
                draft = self.steps[pos][0].draft
                self.stats.settled += 1  # counted at its commit: a proof voided by an earlier change is not
                self._commit(pos, token, piece, True)
                if token != draft:
                    self._changed(pos, token, self.epoch + 1)
            else:
                return

    def _commit(self, pos: int, token: int, piece: bytes, sigma: bool | None) -> None:
        self.committed.append(Commit(pos, token, piece, sigma))
        for state in (self.steps, self.sigma, self.side_state, self.taps, self.exact, self.heads, self.proven):
            state.pop(pos, None)
        self.next_pos = pos + 1
        self.branches = {key: line for key, line in self.branches.items() if key[0] >= pos}

    def _shaped(self, x: np.ndarray, what: str, rows: int, cols: int | None = None) -> np.ndarray:
        """x (decoded once, by messages.parse) if it has the expected shape."""
        shape = (rows, cols or self.ready.backbone.hidden_size)
        if x.shape != shape:
            raise ProtocolError("bad_field", f"{what} has shape {x.shape}, expected {shape}")
        return x

    @staticmethod
    def _expect(ok: bool, what: str) -> None:
        if not ok:
            raise ProtocolError("out_of_order", what)

    @staticmethod
    def _require(ok: bool, what: str) -> None:
        if not ok:  # a bug in the caller, not in the peer
            raise RuntimeError(f"device protocol misuse: {what}")
