"""The gateway's side of a session, sans I/O (docs/PROTOCOL.md §6).

The protocol object owns every protocol fact of a session: the phase, the
draft window, the positions in flight, rollbacks, epochs, pushed taps, branch
lines and resumption. Its host owns the websocket, the backbone and the lines
(KV caches and states), and holds no protocol state. The shape is the one of
`DeviceProtocol` (and of the websockets library): data in, actions and data to
send out.

    gp.receive(map)          every unpacked device map
    gp.next_action()         what the host must do now (spa/protocol/gateway/actions.py), or None
    gp.started(...), gp.draft_ready(...), gp.taps_ready(...), gp.verdict_ready(...)
                             the results of Prefill, Draft, SendTaps and Head
    gp.data_to_send()        maps to send, in order
    gp.closing               True once the host should close the connection normally
                             (after sending): `end` was sent, or the device said `bye`

Draft-ahead: a `Draft` is asked for while fewer than W + 1 positions are
unverified. While the host computes a round of drafts, the device's
`need_taps` and `accept` are handled at once (taps are kept: the side
network's round trip need not wait for the backbone); any other message
waits, unparsed, until the round is reported, and so does everything
received after it, to keep the order.

Each round of drafts (the main line's next one, and one per branch line,
spa/protocol/gateway/branches.py) is handed out as consecutive `Draft`
actions, which the host runs as rows of one batched forward.

Pushed taps: with `hello.gate` and a `predict_gate` from the host (the
protocol imports no model code), a step whose position the device's gate
will open is held until its taps are ready and sent with them.

Resumption (`resumable=True`; spa/protocol/gateway/resume.py): a fresh
connection's `hello` with `resume` yields `ResumeWanted`; the host finds the
session it names and calls that session's `check_resume(hello)` and then
`resume(next)`, which queues `resumed` and what the device must get again.
Where this gateway does not hold the session (signed resume tokens), the
fresh protocol's `check_rebuild(hello)`, then `rebuilt(session,
prompt_tokens, commits)`; the host feeds the committed tokens to a new main
line (prefill, then one-token steps) before serving the Draft that follows.
"""

from collections import deque

import numpy as np

from spa.protocol import codec
from spa.protocol import messages as m
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.gateway.actions import MAIN_LINE, Action, Draft, Prefill, ResumeWanted, SendTaps
from spa.protocol.gateway.branches import Branching
from spa.protocol.gateway.drafts import Drafted, SidePos
from spa.protocol.gateway.handshake import ProjectionCache, Uploads, check_hello, check_identity, check_prompt
from spa.protocol.gateway.resume import Resuming
from spa.protocol.gateway.resume_secrets import Resumption
from spa.protocol.gateway.stats import GatewayStats
from spa.protocol.gateway.verify import Verifying
from spa.protocol.limits import Limits
from spa.protocol.resume_tokens import ResumeTokens


class GatewayProtocol(Verifying, Resuming):
    def __init__(
        self,
        backbone: m.BackboneInfo,
        eos_ids,  # token ids that end generation
        limits: Limits = Limits(),
        auth_token: str | None = None,  # None: no auth (loopback only)
        resumable: bool = False,  # the host keeps sessions for `hello.resume`
        resume_tokens: ResumeTokens | None = None,  # signed resume tokens (None: the host's opaque secrets)
        branches: int = 0,  # K: draft the continuations of K alternatives at a pending side position
        # p_t of the device's uploaded gate on a received f_t [1, H]: (f, weight, bias, margin) -> p
        # (spa.model.cloud_gate.gate_probability). None: hello.gate is accepted and never used.
        predict_gate=None,
        # Settlement (version 3): the host's logits are float32, so a device's proof of a token holds
        # (docs/PROTOCOL.md §6, "Settlement"); `pieces`: every token's bytes (settled tokens come as ids).
        settle: bool = False,
        pieces: list[bytes] | None = None,
        # Projection weights kept across sessions (the host's, shared by its sessions), or None.
        projections: ProjectionCache | None = None,
    ):
        self.backbone = backbone
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.limits = limits
        self.auth_token = auth_token
        self.resumable = resumable
        self.predict_gate = predict_gate
        self.projections = projections
        if settle and not pieces:
            raise ValueError("settlement needs the vocabulary's pieces")
        self.settle_offered, self.pieces = settle, pieces or []
        self.settling = False  # this session settles: the device asked (version 3, greedy) and we offer it
        self._resume_tokens: tuple | None = None  # a resume hello's committed tokens (check_resume)
        self.stats = GatewayStats()
        self.branching = Branching(branches, self.stats)
        self.resumption = Resumption(resume_tokens, limits.resume_grace_s)
        self.phase = "hello"  # -> "ready" -> "generating" -> "ended"
        self.hello: m.Hello | None = None
        self.uploads = Uploads()
        self.session: str | None = None  # the id sent in ready
        self.epoch = 0
        self.first_pos = 0  # P - 1: the position of the first step
        self.verified = 0  # next position to verify
        self.main = MAIN_LINE  # the main line's id
        self._line_ids = MAIN_LINE  # the last line id given out
        self._branch_line_ids: set[int] = set()  # lines made for branches (not adopted)
        self._drafts: list[Drafted] = []  # unverified drafted positions of the main line, ascending
        self._next_feed: int | None = None  # the token to feed for the next draft (None: states exist)
        # The device's decisions, in position order: every position in [verified, decided) is
        # decided; those in `_sides` are sigma = 1 (in flight), the others sigma = 0. The gateway
        # verifies strictly in order.
        self.decided = 0
        self._sides: dict[int, SidePos] = {}
        self.pushed: set[int] = set()  # unverified positions whose step carried their taps
        self._commits: list[m.Commit] = []  # every verified position, in order (resumes replay them)
        self.finish_reason: str | None = None  # set when the final position is verified
        self.closing = False
        self.end_msg: dict | None = None  # replayed if the device missed it
        self._actions: deque = deque()
        self._outbox: list[dict] = []
        self._drafting: dict[int, Draft] = {}  # the drafts the host is computing, by line
        self._round: deque = deque()  # Drafts of the current round not handed out yet
        self._held: dict | None = None  # a step waiting for its pushed taps
        self._stash: list = []  # maps received while drafting, handled after the round

    @property
    def secret(self) -> str | None:
        """The latest resume secret handed to the device."""
        return self.resumption.secret

    @property
    def projection(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The cloud-side projection's weights as uploaded (widened to float32), or None."""
        return self.uploads.projection

    @property
    def drafted(self) -> list[tuple[int, int]]:
        """Unverified (pos, draft token) of the main line, ascending."""
        return [(d.pos, d.token) for d in self._drafts]

    @property
    def next_draft_pos(self) -> int:
        return self.verified + len(self._drafts)

    @property
    def in_flight(self) -> list[int]:
        """sigma = 1 positions awaiting their verdict, ascending."""
        return sorted(self._sides)

    def release(self) -> None:
        """The session is over: forget what the device uploaded (memory only, never on disk)."""
        self.uploads = Uploads()

    # --- incoming --------------------------------------------------------

    def receive(self, d: dict) -> None:
        if self._drafting and (self._stash or not _handled_while_drafting(d)):
            self._stash.append(d)  # not even parsed: the state must not move under the draft
            return
        msg = m.parse(d, "gateway")
        if isinstance(msg, m.Error):
            raise PeerError(msg.code, msg.message)
        if isinstance(msg, m.Bye):
            self.phase, self.closing = "ended", True
            return
        if isinstance(msg, m.Hello):
            return self._on_hello(msg)
        # A device with several side outputs in flight may have decided positions that a
        # rollback has since voided: those messages carry an older epoch and are dropped, also
        # when that rollback's token ended the generation. A newer epoch is a broken device.
        if self.phase in ("generating", "ended") and msg.epoch < self.epoch:
            self.stats.stale += 1
            return
        if self.phase != "generating" or self.finish_reason:
            raise ProtocolError("out_of_order", f"{msg.TYPE} outside generation")
        if msg.epoch > self.epoch:
            raise ProtocolError("out_of_order", f"{msg.TYPE} has epoch {msg.epoch}, expected {self.epoch}")
        if isinstance(msg, m.Accept):
            self._decide_through(msg.upto, "accept.upto")
        elif isinstance(msg, m.NeedTaps):
            self._on_need_taps(msg)
        elif isinstance(msg, m.Settled):
            self._on_settled(msg)
        else:
            self._on_side(msg)
        self._verify()
        self._maybe_end()

    def _on_hello(self, hello: m.Hello) -> None:
        if self.phase != "hello":
            raise ProtocolError("out_of_order", "second hello")
        if hello.resume is not None:
            check_identity(hello, self.backbone, self.auth_token)
            if not self.resumable:
                raise ProtocolError("resume_failed", "this gateway does not resume sessions")
            if hello.resume.next is None:
                raise ProtocolError("bad_field", "hello.resume.next: missing (required to resume)")
            self._actions.append(ResumeWanted(hello))
            return
        self.uploads = check_hello(hello, self.backbone, self.limits, self.auth_token, self.projections)
        self._accept(hello)
        self._actions.append(Prefill(hello))

    def _accept(self, hello: m.Hello) -> None:
        """The session's hello is checked: what the session is from now on."""
        self.hello = hello
        self.phase = "ready"
        opts = hello.options
        self.settling = self.settle_offered and hello.version >= 3 and opts.settle and opts.temperature == 0

    def _maybe_end(self) -> None:
        if self.finish_reason and self.phase == "generating" and not self._drafting:
            self._actions.extend(self.branching.close())
            self.phase = "ended"
            self.end_msg = m.End(self.finish_reason, {"tokens": self.verified - self.first_pos,
                                                      **self.stats.to_dict()}).to_dict()
            self._outbox.append(self.end_msg)
            self.closing = True

    # --- actions and what the host reports -------------------------------

    def next_action(self) -> Action | None:
        """The next piece of work for the host, or None until more data arrives. Drafts are asked
        for only when nothing else is queued, a round at a time: the main line's next draft and one
        per branch line, as consecutive Draft actions (the host runs them as one forward); the next
        round once every draft of this one is reported."""
        while self._round:  # the rest of the round, unless a rollback voided it meanwhile
            d = self._round.popleft()
            if d.epoch == self.epoch and (d.line == self.main or d.line in self.branching.lines):
                return d
            del self._drafting[d.line]
            if not self._drafting:
                self._replay_stash()
        if self._actions:
            return self._actions.popleft()
        if self._drafting or self._held is not None:
            return None
        if self._open_branch_point():  # the ForkLines first: the branch drafts feed their caches
            return self._actions.popleft()
        drafts = [Draft(self.epoch, self.next_draft_pos, self._next_feed, self.main)] if self.can_draft() else []
        if self.branching.at is not None:
            drafts += self.branching.drafts(self.epoch, self.hello.options.window, self.first_pos,
                                            self.hello.options.max_new_tokens, self.eos_ids)
        if not drafts:
            return None
        self._drafting = {d.line: d for d in drafts}
        self._round.extend(drafts[1:])
        return drafts[0]

    def _open_branch_point(self) -> bool:
        """Open a branch point at the earliest sigma = 1 position still waiting for its side
        output (or predicted sigma = 1 from pushed taps). True if it forked any line."""
        if not self.branching.k or self.branching.at is not None or self.phase != "generating" \
                or self.finish_reason:
            return False
        waiting = [p for p, side in self._sides.items() if not side.head_asked]
        waiting += [p for p in self.pushed if p >= self.decided]
        if not waiting:
            return False
        t = min(waiting)
        entry = next(d for d in self._drafts if d.pos == t)
        fits = t + 1 - self.first_pos < self.hello.options.max_new_tokens  # t does not decide the last token
        forks = self.branching.open(t, self.main, entry, self._new_line,
                                    lambda token: fits and token not in self.eos_ids)
        self._branch_line_ids.update(f.line for f in forks)
        self._actions.extend(forks)
        return bool(forks)

    def _new_line(self) -> int:
        self._line_ids += 1
        return self._line_ids

    def data_to_send(self) -> list[dict]:
        out, self._outbox = self._outbox, []
        return out

    def started(self, session: str, secret: str | None, prompt_tokens: int) -> None:
        """After Prefill: the prompt's length; queues `ready`. Raises ProtocolError("limit") for a
        prompt over max_prompt_tokens. `secret` None: issue a signed resume token."""
        self._require(self.phase == "ready", "started() before hello or twice")
        check_prompt(prompt_tokens, self.limits)
        self.first_pos = self.verified = self.decided = prompt_tokens - 1
        self.phase = "generating"
        self.session = session
        self.resumption.issue(session, self.hello, [], secret)
        self.stats.prompt_tokens = prompt_tokens
        self._next_feed = None  # the prefill computed the states of the first position
        self._outbox.append(m.Ready(session, self.secret, self.backbone, prompt_tokens, self.limits.to_dict(),
                                    settle=self.settling).to_dict())

    def can_draft(self) -> bool:
        """True while another step may be drafted on the main line: fewer than W + 1 unverified
        positions, and the drafts so far do not already end generation."""
        if self.phase != "generating" or self.finish_reason:
            return False
        if self._drafts and self._drafts[-1].token in self.eos_ids:
            return False
        if self.next_draft_pos - self.first_pos >= self.hello.options.max_new_tokens:
            return False
        return len(self._drafts) <= self.hello.options.window

    def draft_ready(self, pos: int, f: np.ndarray, token: int, piece: bytes, alternatives=(),
                    line: int = MAIN_LINE, margin: float | None = None, batch: int | None = None) -> bool:
        """The host computed the Draft for pos on `line`: f_pos [1, H] (float32), the backbone's
        token and (branch drafting) its runners-up, best first; `margin`: the backbone's top-2
        logit margin at pos (`spa.model.generate.logit_margin`), required when the hello asked for
        `gate_margin`; `batch`: the rows of the decode step it ran in (None: no decode step, only
        the head). A main-line draft queues its step (after its taps, where the device's gate will
        open and it uploaded that gate); a branch draft is kept until its line is adopted or
        dropped. Returns False for a draft that a rollback or a resolved branch point made stale
        (its states are void)."""
        asked = self._drafting.get(line)
        self._require(asked is not None and pos == asked.pos and asked not in self._round,
                      f"draft_ready({pos}, line={line}) not asked for")
        del self._drafting[line]
        if batch is not None:
            self.stats.add_decode_step(batch)
        opts = self.hello.options
        self._require(margin is not None or not opts.gate_margin, f"draft_ready({pos}) without its margin")
        margin = float(np.float32(margin)) if opts.gate_margin else None
        main = line == self.main and asked.epoch == self.epoch
        exact = codec.encode(f, "f32", 0) if self.settling else None  # what a settling device proves from
        entry = Drafted(pos, int(token), bytes(piece), self._encode(f), tuple(map(int, alternatives)), margin, exact)
        if not main:
            kept = False
            if line in self._branch_line_ids:
                kept = self.branching.drafted(line, entry if asked.epoch == self.epoch else None)
            if kept and self.settling:  # streamed: a hit then continues on the device without a round trip
                branch = m.BranchRef(self.branching.at, self.branching.lines[line].token)
                self._outbox.append(m.Step(self.epoch, pos, entry.f, entry.token, entry.piece, margin=margin,
                                           branch=branch).to_dict())
                self.stats.branch_streamed += 1
            if not self._drafting:
                self._replay_stash()
            return kept
        self._drafts.append(entry)
        self._next_feed = entry.token
        self.stats.drafts += 1
        step = self._refreshed(self._step(entry))
        if self._predicts_open(entry):
            self._held = step
            self._actions.append(SendTaps(self.main, pos))
        else:
            self._outbox.append(step)
        if not self._drafting:
            self._replay_stash()
        return True

    def _predicts_open(self, entry: Drafted) -> bool:
        """Will the device's gate open at this position? (its uploaded gate, on the f it receives)"""
        gate = self.uploads.gate
        if gate is None or self.predict_gate is None:
            return False
        return self.predict_gate(codec.decode(entry.f), gate.weight, gate.bias, entry.margin) > gate.tau

    def _replay_stash(self) -> None:
        """Handle, in order, what arrived while a round of drafts was computed."""
        stash, self._stash = self._stash, []
        for d in stash:
            self.receive(d)
        self._maybe_end()

    # --- resumption ------------------------------------------------------

    def connection_lost(self) -> None:
        """The connection is gone: what was received but not handled is void (the device sends it
        again after a resume)."""
        self._stash.clear()

    def _committed_ids(self) -> list[int]:
        return [c.token for c in self._commits]

    def _refreshed(self, msg: dict) -> dict:
        """msg with a fresh resume token when the current one is half a grace old."""
        if self.resumable and self.resumption.due():
            msg["secret"] = self.resumption.issue(self.session, self.hello, self._committed_ids())
        return msg

    def _step(self, d: Drafted) -> dict:
        """The step of a drafted position in the current epoch (without pushed taps: the device
        asks where it needs them); the same bytes every time it is sent again."""
        return m.Step(self.epoch, d.pos, d.f, d.token, d.piece, margin=d.margin).to_dict()

    def _encode(self, x: np.ndarray) -> dict:
        return codec.encode(x, self.hello.options.codec, self.hello.options.outliers)

    @staticmethod
    def _require(ok: bool, what: str) -> None:
        if not ok:  # a bug in the caller, not in the peer
            raise RuntimeError(f"gateway protocol misuse: {what}")


def _handled_while_drafting(d) -> bool:
    """Messages answered during a draft: they need no backbone work."""
    return isinstance(d, dict) and d.get("type") in ("need_taps", "accept", "settled")
