"""The gateway's side of a session, sans I/O (docs/PROTOCOL.md §6).

The protocol object owns every protocol fact of a session: the phase, the
draft window, the position awaiting a side output, rollbacks, epochs, pushed
taps and resumption. Its host owns the websocket, the KV cache and the
backbone, and holds no protocol state. The shape is the one of
`DeviceProtocol` (and of the websockets library): data in, actions and data
to send out.

    gp.receive(map)              every unpacked device map
    gp.next_action()             what the host must compute now, or None:
        Prefill(hello)           tokenize and prefill the prompt; gp.started(...)
        Draft(epoch, pos, feed, branch)
                                 the states at pos (feeding `feed` to the KV cache of
                                 the main line, branch 0, or of a branch line; or the
                                 states the prefill left when feed is None) and the
                                 backbone's token there; gp.draft_ready(...)
        SendTaps(pos)            the taps of pos as they go on the wire; gp.taps_ready(...)
        Head(pos, s)             the token of lm_head(norm(cloud_state(f_pos, s))); gp.verdict_ready(...)
        Truncate(keep)           a rollback: keep the KV cache of positions < keep,
                                 forget the states of later positions
        Forget(upto)             positions <= upto are verified: their states are not needed
        Fork(branch, keep)       branch drafting: a new branch line whose KV cache is a
                                 copy of the main line's positions < keep
        Adopt(branch, keep)      a branch hit: that line's KV cache and states replace the
                                 main line's from keep on; every other branch line is dropped
        Discard()                drop every branch line (KV caches and states)
    gp.data_to_send()            maps to send, in order
    gp.closing                   True once the host should close the connection normally
                                 (after sending): `end` was sent, or the device said `bye`

Draft-ahead: a `Draft` is asked for while fewer than W + 1 positions are
unverified. While the host computes one, the device's `need_taps` and
`accept` are handled at once (taps are cached: the side network's round trip
need not wait for the backbone); any other message waits, unparsed, until the
draft is reported, and so does everything received after it, to keep the order.

Branch drafting (`branches=K > 0`): while the gateway waits for the side
output of a sigma = 1 position t (asked with need_taps, or predicted from
pushed taps), it also drafts, on forked KV caches, the continuations of the K
runners-up of the backbone's own choice at t (`draft_ready(..., alternatives)`
reports them for every draft). Each round of drafts (the main line's next
one, and one per branch line) is handed out as consecutive `Draft` actions,
which the host runs as rows of one batched forward. When the verdict of t
changes the token to a branch's token, that branch becomes the main line at
once (`Adopt`): its drafts go out as steps of the new epoch, no decode step
waited for. Branches are dropped (`Discard`) at t's verdict otherwise, on any
rollback, when t turns out sigma = 0, and on a resume. One branch point at a
time: the earliest such position, and only while no verdict is computed for it.

Resumption (`resumable=True`): a fresh connection's `hello` with `resume`
yields the action `ResumeWanted`; the host finds the session it names, calls
that session's `check_resume(hello)` and then `resume(next, secret)`, which
queues `resumed` and what the device must get again. With `tokens` (a
`spa.protocol.resume_tokens.ResumeTokens`: signed resume tokens any replica of the
deployment can verify) the protocol issues the secrets itself, refreshes them
on steps and verdicts, and a gateway that does not hold the session rebuilds
it: the fresh protocol's `check_rebuild(hello)`, then the host tokenizes the
prompt and calls `rebuilt(session, prompt_tokens, commits)` (which queues
`resumed`), and feeds the committed tokens to a new KV cache (prefill, then
one-token steps) before serving the Draft that follows. `check_resume` raises
`SessionMoved` when the token shows that the session was resumed elsewhere
since: the host drops its copy and rebuilds.
"""

import hmac
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from spa.protocol import codec
from spa.model.cloud_gate import predicts_open
from spa.protocol import messages as m
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.limits import Limits
from spa.protocol.resume_tokens import REFUSED, ResumeTokens, TokenClaims, generation_digest, prefix_digest


# --- actions: what the host computes -------------------------------------

@dataclass(frozen=True)
class Prefill:
    hello: m.Hello  # validated: version, auth, backbone, limits


@dataclass(frozen=True)
class ResumeWanted:
    hello: m.Hello  # validated like a new hello; hello.resume.next is set


@dataclass(frozen=True)
class Draft:
    epoch: int
    pos: int
    feed: int | None  # the token x_pos to feed; None: the states of pos exist (prefill, or kept)
    branch: int = 0  # 0: the main line; else the id of the branch line (Fork) whose KV cache to feed


@dataclass(frozen=True)
class Fork:
    branch: int  # the new branch line's id (unique within the session)
    keep: int  # its KV cache: a copy of the main line's positions < keep (the branch point t + 1)


@dataclass(frozen=True)
class Adopt:
    branch: int  # this branch line's KV cache and states become the main line's
    keep: int  # the main line's states of positions < keep stay; later ones are void


@dataclass(frozen=True)
class Discard:
    """Drop every branch line: their KV caches and states."""


@dataclass(frozen=True)
class SendTaps:
    pos: int


@dataclass(frozen=True)
class Head:
    pos: int
    s: np.ndarray  # the device's side output as received, [H]


@dataclass(frozen=True)
class Truncate:
    keep: int  # positions < keep stay in the KV cache


@dataclass(frozen=True)
class Forget:
    upto: int


Action = Prefill | ResumeWanted | Draft | SendTaps | Head | Truncate | Forget | Fork | Adopt | Discard
_CACHE_WORK = (Truncate, Forget, Fork, Adopt, Discard)  # keeps the host's KV caches in step: never dropped


class SessionMoved(Exception):
    """The resume token is newer than the session this gateway holds: the
    session was resumed on another replica since. The host drops its copy and
    rebuilds the session from the resume hello."""


@dataclass
class GatewayStats:
    """Everything the gateway counts for one session; sent in `end.stats`."""

    drafts: int = 0  # steps sent
    discarded: int = 0  # drafts voided by rollbacks
    side_positions: int = 0  # sigma = 1 positions
    rollbacks: int = 0  # verdicts that changed the draft
    pushed: int = 0  # steps that carried their taps (hello.gate)
    pushed_used: int = 0  # sigma = 1 positions answered from pushed taps
    early_taps: int = 0  # taps sent while a draft was being computed
    resumes: int = 0
    rebuilt_tokens: int = 0  # committed tokens fed again to rebuild the session on this gateway (a resume elsewhere)
    max_in_flight: int = 0  # most sigma = 1 positions awaiting their verdict at once
    stale: int = 0  # device messages of an epoch a rollback had ended (dropped)
    # Branch drafting (`branches` > 0):
    branch_points: int = 0  # sigma = 1 positions whose alternatives were drafted
    branch_hits: int = 0  # changed verdicts whose token a branch had drafted: its drafts sent at once
    branch_misses: int = 0  # changed verdicts at a branch point that no branch (with a draft) had
    branch_drafts: int = 0  # draft rows computed on branch lines
    branch_wasted: int = 0  # of which were dropped (unchanged verdict, miss, rollback, the other branches)
    # Filled in by the host (backbone work):
    prompt_tokens: int = 0
    decode_steps: int = 0  # one-token decode steps run for this session
    batched_steps: int = 0  # of which ran batched with other sessions' steps
    batch_rows: int = 0  # sum of those steps' batch sizes
    max_batch: int = 1

    def add_decode_step(self, batch: int) -> None:
        self.decode_steps += 1
        self.batched_steps += batch > 1
        self.batch_rows += batch
        self.max_batch = max(self.max_batch, batch)

    def to_dict(self) -> dict:
        d = asdict(self)
        rows = d.pop("batch_rows")
        d["mean_batch"] = round(rows / max(self.decode_steps, 1), 3)
        return d


@dataclass
class _SidePos:
    """A sigma = 1 position in flight."""

    taps_sent: bool = False
    s: np.ndarray | None = None  # the side output, once received
    head_asked: bool = False


@dataclass
class _Drafted:
    pos: int
    token: int
    piece: bytes
    f: dict  # encoded f_pos, kept to send the step again after a resume
    alternatives: tuple = ()  # the runners-up of the backbone's choice at pos (branch drafting)
    margin: float | None = None  # the backbone's top-2 logit margin at pos, where options.gate_margin


@dataclass
class _Branch:
    """A branch line: the continuation of an alternative token at the branch point."""

    id: int
    token: int  # the alternative x_{t+1}
    drafts: list  # _Drafted of positions t + 1, t + 2, ... on this line
    feed: int  # the token to feed for its next draft


class GatewayProtocol:
    def __init__(
        self,
        backbone: m.Backbone,
        eos_ids,  # token ids that end generation
        limits: Limits = Limits(),
        auth_token: str | None = None,  # None: no auth (loopback only)
        resumable: bool = False,  # the host keeps sessions for `hello.resume`
        tokens: ResumeTokens | None = None,  # signed resume tokens (None: the host's opaque secrets)
        branches: int = 0,  # K: draft the continuations of K alternatives at a pending side position
    ):
        if branches < 0:
            raise ValueError(f"branches must be >= 0, not {branches}")
        self.branches = branches
        self.backbone = backbone
        self.resumable = resumable
        self.tokens = tokens
        self.resume_gen = 0  # resumes of this session so far (on any replica): tokens carry it
        self._token_time = 0.0  # when the current token was issued (tokens' clock)
        self._claims: TokenClaims | None = None  # of the token check_resume accepted
        self._generation: bytes | None = None  # generation_digest of the session's hello
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.limits = limits
        self.auth_token = auth_token
        self.phase = "hello"  # -> "ready" -> "generating" -> "ended"
        self.hello: m.Hello | None = None
        # Cloud-side projection weights (weight float32 [n_taps, r, H], widened
        # from the uploaded float16; bias float32 [n_taps, r]), or None.
        self.projection: tuple[np.ndarray, np.ndarray] | None = None
        # The device's gate for pushed taps (weight [2, H], bias [2], tau), or None.
        self.gate: tuple[np.ndarray, np.ndarray, float] | None = None
        self.pushed: set[int] = set()  # unverified positions whose step carried their taps
        self.epoch = 0
        self.first_pos = 0  # P - 1: the position of the first step
        self.verified = 0  # next position to verify
        self._drafts: list[_Drafted] = []  # unverified drafted positions, ascending
        self._next_feed: int | None = None  # the token to feed for the next draft (None: states exist)
        # The device's decisions, in position order: every position in
        # [verified, decided) is decided; those in `_sides` are sigma = 1 (in
        # flight: taps asked or sent, side output awaited or received), the
        # others sigma = 0. The gateway verifies strictly in order.
        self.decided = 0
        self._sides: dict[int, _SidePos] = {}
        self._commits: list[m.Commit] = []  # every verified position, in order (resumes replay them)
        self.finish_reason: str | None = None  # set when the final position is verified
        self.closing = False
        self.session: str | None = None  # the id sent in ready
        self.secret: str | None = None  # current resume secret (rotated on every resume)
        self.end_msg: dict | None = None  # replayed if the device missed it
        self.stats = GatewayStats()
        self._actions: deque = deque()
        self._outbox: list[dict] = []
        self._drafting: dict[int, Draft] = {}  # the drafts the host is computing, by line (0: main)
        self._round: deque = deque()  # Drafts of the current round not handed out yet
        self._branch_at: int | None = None  # the branch point t, while its branches are alive
        self._branch_lines: dict[int, _Branch] = {}  # by id, best alternative first
        self._branch_ids = 0  # the last id given to a branch line
        self._held: dict | None = None  # a step waiting for its pushed taps
        self._stash: list = []  # maps received while drafting, handled after the draft

    @property
    def drafted(self) -> list[tuple[int, int]]:
        """Unverified (pos, draft token), ascending."""
        return [(d.pos, d.token) for d in self._drafts]

    @property
    def next_draft_pos(self) -> int:
        return self.verified + len(self._drafts)

    @property
    def in_flight(self) -> list[int]:
        """sigma = 1 positions awaiting their verdict, ascending."""
        return sorted(self._sides)

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
        if self.phase != "generating" or self.finish_reason:
            raise ProtocolError("out_of_order", f"{msg.TYPE} outside generation")
        # A device with several side outputs in flight may have decided
        # positions that a rollback has since voided: those messages carry
        # an older epoch and are dropped. A newer epoch is a broken device.
        if msg.epoch < self.epoch:
            self.stats.stale += 1
            return
        if msg.epoch > self.epoch:
            raise ProtocolError("out_of_order", f"{msg.TYPE} has epoch {msg.epoch}, expected {self.epoch}")
        if isinstance(msg, m.Accept):
            self._on_accept(msg)
        elif isinstance(msg, m.NeedTaps):
            self._on_need_taps(msg)
        else:
            self._on_side(msg)
        self._verify()
        self._maybe_end()

    def _on_hello(self, hello: m.Hello) -> None:
        if self.phase != "hello":
            raise ProtocolError("out_of_order", "second hello")
        if self.auth_token is not None and not hmac.compare_digest(
            hello.token.encode(), self.auth_token.encode()
        ):
            raise ProtocolError("unauthorized", "wrong or missing auth token")
        if hello.plugin.fingerprint != self.backbone.fingerprint:
            raise ProtocolError(
                "backbone_mismatch",
                f"plugin is for backbone {hello.plugin.fingerprint!r}, this gateway serves "
                f"{self.backbone.name} ({self.backbone.fingerprint!r})",
            )
        if hello.plugin.taps[-1] > self.backbone.num_layers:
            raise ProtocolError(
                "backbone_mismatch", f"tap {hello.plugin.taps[-1]} > {self.backbone.num_layers} layers"
            )
        if hello.resume is not None:
            if not self.resumable:
                raise ProtocolError("resume_failed", "this gateway does not resume sessions")
            if hello.resume.next is None:
                raise ProtocolError("bad_field", "hello.resume.next: missing (required to resume)")
            self._actions.append(ResumeWanted(hello))
            return
        opts = hello.options
        if opts.window > self.limits.max_window:
            raise ProtocolError("limit", f"window {opts.window} > max_window {self.limits.max_window}")
        if opts.max_new_tokens > self.limits.max_new_tokens:
            raise ProtocolError(
                "limit", f"max_new_tokens {opts.max_new_tokens} > {self.limits.max_new_tokens}"
            )
        if hello.projection is not None:
            self.projection = self._projection(hello.projection, len(hello.plugin.taps))
        if hello.gate is not None:
            width = self.backbone.hidden_size + opts.gate_margin  # a margin gate reads [f, m]
            weight = self._floats(hello.gate.weight, "<f4", (2, width), "hello.gate.weight")
            bias = self._floats(hello.gate.bias, "<f4", (2,), "hello.gate.bias")
            self.gate = (weight, bias, hello.gate.tau)
        self.hello = hello
        self.phase = "ready"
        self._actions.append(Prefill(hello))

    def _projection(self, proj: m.Projection, n_taps: int) -> tuple[np.ndarray, np.ndarray]:
        hidden = self.backbone.hidden_size
        weight = self._floats(proj.weight, "<f2", (n_taps, proj.rank, hidden), "hello.projection.weight")
        return weight, self._floats(proj.bias, "<f4", (n_taps, proj.rank), "hello.projection.bias")

    @staticmethod
    def _floats(raw: bytes, dtype: str, shape: tuple, what: str) -> np.ndarray:
        """A little-endian array of `shape` from raw bytes, widened to float32; bad_field if it is not."""
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(raw) != expected:
            raise ProtocolError("bad_field", f"{what}: {len(raw)} bytes, expected {expected} "
                                             f"({'x'.join(map(str, shape))} {np.dtype(dtype).name})")
        x = np.frombuffer(raw, dtype).reshape(shape).astype(np.float32)
        if not np.isfinite(x).all():
            raise ProtocolError("bad_field", f"{what}: non-finite values")
        return x

    def _on_accept(self, msg: m.Accept) -> None:
        self._decide_through(msg.upto, "accept.upto")

    def _on_need_taps(self, msg: m.NeedTaps) -> None:
        self._decide_through(msg.pos, "need_taps.pos")  # positions < pos are sigma = 0
        self._sides[msg.pos] = _SidePos()
        self.stats.side_positions += 1
        self.stats.early_taps += bool(self._drafting)
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._sides))
        self._actions.append(SendTaps(msg.pos))

    def _on_side(self, msg: m.Side) -> None:
        side = self._sides.get(msg.pos)
        if side is None and msg.pos in self.pushed and msg.pos >= self.decided:
            # Its taps came with its step: the side decides every position before it.
            self._decide_through(msg.pos, "side.pos")
            side = self._sides[msg.pos] = _SidePos(taps_sent=True)
            self.stats.side_positions += 1
            self.stats.pushed_used += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._sides))
        if side is None or not side.taps_sent or side.s is not None:
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

    def _verify(self) -> None:
        """Verify in order what the device decided: sigma = 0 positions commit
        their draft; a sigma = 1 position waits for its side output, then asks
        the host for its head (one at a time: its verdict may roll back)."""
        while self.verified < self.decided and not self.finish_reason:
            pos = self.verified
            side = self._sides.get(pos)
            if side is None:
                entry = self._drafts[0]
                self._pop_through(pos)
                self._committed(entry)
                if pos == self._branch_at:  # predicted sigma = 1 (pushed taps), but the device accepted it
                    self._drop_branches()
                continue
            if side.s is not None and not side.head_asked:
                side.head_asked = True
                self._actions.append(Head(pos, side.s))
            return

    def _pop_through(self, pos: int) -> None:
        """Drop drafts up to pos (verified now)."""
        while self._drafts and self._drafts[0].pos <= pos:
            self._drafts.pop(0)
        self.verified = pos + 1
        self.decided = max(self.decided, self.verified)
        self.pushed = {p for p in self.pushed if p > pos}
        self._actions.append(Forget(pos))

    def _committed(self, commit) -> None:
        """Position commit.pos is verified with commit.token (a draft or a verdict)."""
        self._commits.append(m.Commit(commit.pos, commit.token, commit.piece))
        if commit.token in self.eos_ids:
            self.finish_reason = "eos"
        elif commit.pos - self.first_pos + 1 >= self.hello.options.max_new_tokens:
            self.finish_reason = "max_tokens"

    def _maybe_end(self) -> None:
        if self.finish_reason and self.phase == "generating" and not self._drafting:
            self._drop_branches()
            self.phase = "ended"
            self.end_msg = m.End(self.finish_reason, {"tokens": self.verified - self.first_pos,
                                                      **self.stats.to_dict()}).to_dict()
            self._outbox.append(self.end_msg)
            self.closing = True

    # --- actions and what the host reports ---------------------------------

    def next_action(self) -> Action | None:
        """The next piece of work for the host, or None until more data arrives.
        Drafts are asked for only when nothing else is queued, a round at a
        time: the main line's next draft and one per branch line, as
        consecutive Draft actions (the host runs them as one forward); the
        next round once every draft of this one is reported."""
        while self._round:  # the rest of the round, unless a rollback voided it meanwhile
            d = self._round.popleft()
            if d.epoch == self.epoch and (d.branch == 0 or d.branch in self._branch_lines):
                return d
            del self._drafting[d.branch]
            if not self._drafting:
                self._replay_stash()
        if self._actions:
            return self._actions.popleft()
        if self._drafting or self._held is not None:
            return None
        if self._fork_branches():  # the Forks first: the branch drafts feed their caches
            return self._actions.popleft()
        drafts = [Draft(self.epoch, self.next_draft_pos, self._next_feed)] if self.can_draft() else []
        drafts += [Draft(self.epoch, b.drafts[-1].pos + 1 if b.drafts else self._branch_at + 1, b.feed, b.id)
                   for b in self._branch_lines.values() if self._branch_can_draft(b)]
        if not drafts:
            return None
        self._drafting = {d.branch: d for d in drafts}
        self._round.extend(drafts[1:])
        return drafts[0]

    # --- branch drafting -----------------------------------------------------

    def _fork_branches(self) -> bool:
        """Open a branch point at the earliest sigma = 1 position still waiting
        for its side output (or predicted sigma = 1 from pushed taps): queue a
        Fork per alternative worth drafting. True if any was queued."""
        if not self.branches or self._branch_at is not None or self.phase != "generating" or self.finish_reason:
            return False
        waiting = [p for p, side in self._sides.items() if not side.head_asked]
        waiting += [p for p in self.pushed if p >= self.decided]
        if not waiting:
            return False
        t = min(waiting)
        entry = next(d for d in self._drafts if d.pos == t)
        self._branch_at = t  # even without lines: not looked at again until t is resolved
        if t + 1 - self.first_pos >= self.hello.options.max_new_tokens:
            return False  # t decides the last token: nothing to draft after it
        for token in entry.alternatives[: self.branches]:
            if token in self.eos_ids:  # the generation would end there: nothing to draft
                continue
            self._branch_ids += 1
            self._branch_lines[self._branch_ids] = _Branch(self._branch_ids, token, [], token)
            self._actions.append(Fork(self._branch_ids, t + 1))
        self.stats.branch_points += bool(self._branch_lines)
        return bool(self._branch_lines)

    def _branch_can_draft(self, b: _Branch) -> bool:
        """A branch line drafts what the main line could hold right after a
        hit: W + 1 positions from t + 1, not past an EOS or max_new_tokens."""
        if b.drafts and b.drafts[-1].token in self.eos_ids:
            return False
        pos = b.drafts[-1].pos + 1 if b.drafts else self._branch_at + 1
        return (pos - self.first_pos < self.hello.options.max_new_tokens
                and len(b.drafts) <= self.hello.options.window)

    def _drop_branches(self, keep: int | None = None) -> None:
        """The branch point is resolved: drop its lines (but `keep`, adopted);
        the drafts they computed count as wasted."""
        if self._branch_at is None:
            return
        self.stats.branch_wasted += sum(len(b.drafts) for b in self._branch_lines.values() if b.id != keep)
        if self._branch_lines and keep is None:
            self._actions.append(Discard())
        self._branch_lines.clear()
        self._branch_at = None

    def data_to_send(self) -> list[dict]:
        out, self._outbox = self._outbox, []
        return out

    def started(self, session: str, secret: str | None, prompt_tokens: int) -> None:
        """After Prefill: the prompt's length; queues `ready`. Raises
        ProtocolError("limit") for a prompt over max_prompt_tokens. `secret`
        None: issue a resume token (with `tokens`)."""
        self._require(self.phase == "ready", "started() before hello or twice")
        self._check_prompt(prompt_tokens)
        self.first_pos = self.verified = self.decided = prompt_tokens - 1
        self.phase = "generating"
        self.session = session
        self.secret = secret if secret is not None else self._issue()
        self.stats.prompt_tokens = prompt_tokens
        self._next_feed = None  # the prefill computed the states of the first position
        self._outbox.append(m.Ready(session, self.secret, self.backbone, prompt_tokens,
                                    self.limits.to_dict()).to_dict())

    def _check_prompt(self, prompt_tokens: int) -> None:
        if not 1 <= prompt_tokens <= self.limits.max_prompt_tokens:
            raise ProtocolError(
                "limit", f"prompt has {prompt_tokens} tokens; allowed 1..{self.limits.max_prompt_tokens}"
            )

    def _issue(self) -> str:
        """A new resume token for the session as it stands (signed: any replica can check it)."""
        self._require(self.tokens is not None, "no secret given and no resume tokens")
        self._token_time = self.tokens.clock()
        if self._generation is None:  # hashes the uploads (~1 MB with the projection): once
            self._generation = generation_digest(self.hello)
        return self.tokens.issue(self.session, self.resume_gen, [c.token for c in self._commits],
                                 self._generation, 2 * self.limits.resume_grace_s)

    def _refreshed(self, msg: dict) -> dict:
        """msg with a fresh resume token when the current one is half a grace old (tokens expire
        2 grace after issue, so a device losing its link always holds one valid for a grace)."""
        if (self.tokens is not None and self.resumable
                and self.tokens.clock() - self._token_time >= self.limits.resume_grace_s / 2):
            self.secret = msg["secret"] = self._issue()
        return msg

    def can_draft(self) -> bool:
        """True while another step may be drafted: fewer than W + 1 unverified
        positions, and the drafts so far do not already end generation."""
        if self.phase != "generating" or self.finish_reason:
            return False
        if self._drafts and self._drafts[-1].token in self.eos_ids:
            return False
        if self.next_draft_pos - self.first_pos >= self.hello.options.max_new_tokens:
            return False
        return len(self._drafts) <= self.hello.options.window

    def draft_ready(self, pos: int, f: np.ndarray, token: int, piece: bytes, alternatives=(),
                    branch: int = 0, margin: float | None = None) -> bool:
        """The host computed the Draft for pos on line `branch`: f_pos [1, H]
        (float32), the backbone's token and (branch drafting) its runners-up,
        best first; `margin`: the backbone's top-2 logit margin at pos
        (`spa.model.generate.logit_margin`), required when the hello asked for
        `gate_margin`. A main-line draft queues its step (after its taps, where
        the device's gate will open and it uploaded that gate); a branch draft
        is kept until its branch is adopted or dropped. Once the round's last
        draft is reported, handles what arrived meanwhile. Returns False for a
        draft a rollback or a resolved branch point made stale (dropped)."""
        asked = self._drafting.get(branch)
        self._require(asked is not None and pos == asked.pos and asked not in self._round,
                      f"draft_ready({pos}, branch={branch}) not asked for")
        del self._drafting[branch]
        opts = self.hello.options
        self._require(margin is not None or not opts.gate_margin, f"draft_ready({pos}) without its margin")
        margin = float(np.float32(margin)) if opts.gate_margin else None
        line = self._branch_lines.get(branch) if branch else None
        # A rollback came while it was computed (the host's Truncate or Discard, queued
        # after it, drops its KV entry), or its branch point was resolved.
        stale = asked.epoch != self.epoch or (branch != 0 and line is None)
        if branch:
            self.stats.branch_drafts += 1
            self.stats.branch_wasted += stale
        if stale or branch:
            if not stale:
                token = int(token)
                line.drafts.append(_Drafted(pos, token, bytes(piece), self._encode(f), tuple(map(int, alternatives)),
                                            margin))
                line.feed = token
            if not self._drafting:
                self._replay_stash()
            return not stale
        token = int(token)
        entry = _Drafted(pos, token, bytes(piece), self._encode(f), tuple(map(int, alternatives)), margin)
        self._drafts.append(entry)
        self._next_feed = token
        self.stats.drafts += 1
        step = self._refreshed(self._step(entry))
        if self.gate is not None and predicts_open(f, self.gate, opts.codec, opts.outliers, margin):
            self._held = step
            self._actions.append(SendTaps(pos))
        else:
            self._outbox.append(step)
        if not self._drafting:
            self._replay_stash()
        return True

    def _replay_stash(self) -> None:
        """Handle, in order, what arrived while a draft was computed."""
        stash, self._stash = self._stash, []
        for d in stash:
            self.receive(d)
        self._maybe_end()

    def taps_ready(self, pos: int, taps: np.ndarray) -> None:
        """The taps of pos for SendTaps: [n_taps, H], or [n_taps, r] projected
        with `self.projection` when the device uploaded it."""
        self._check_taps_shape(taps)
        if self._held is not None and self._held["pos"] == pos:  # pushed with its step
            self._held["taps"] = self._encode(taps)
            self._outbox.append(self._held)
            self._held = None
            self.pushed.add(pos)
            self.stats.pushed += 1
            return
        side = self._sides.get(pos)
        self._require(side is not None and not side.taps_sent, f"taps_ready({pos}) not asked for")
        side.taps_sent = True
        self._outbox.append(m.Taps(self.epoch, pos, self._encode(taps)).to_dict())

    def _check_taps_shape(self, taps: np.ndarray) -> None:
        cols = self.backbone.hidden_size if self.projection is None else self.projection[1].shape[1]
        self._require(taps.shape == (len(self.hello.plugin.taps), cols), f"taps of shape {taps.shape}")

    def verdict_ready(self, pos: int, token: int, piece: bytes) -> None:
        """The side-corrected token for Head(pos). When it differs from the
        draft, later drafts (and the device's decisions on them) are void: the
        epoch moves on and the host gets Truncate(pos + 1) before any further
        Draft."""
        side = self._sides.get(pos)
        self._require(pos == self.verified and side is not None and side.head_asked,
                      f"verdict_ready({pos}) without its side output")
        token, piece = int(token), bytes(piece)
        changed = token != self._drafts[0].token
        del self._sides[pos]
        self._pop_through(pos)
        adopted = None  # the branch line that drafted this token, if any: it becomes the main line
        if pos == self._branch_at:
            if changed:
                adopted = next((b for b in self._branch_lines.values() if b.token == token and b.drafts
                                and b.id not in self._drafting), None)
                self.stats.branch_hits += adopted is not None
                self.stats.branch_misses += adopted is None
            self._drop_branches(keep=adopted.id if adopted else None)
        elif changed:  # the branches continue drafts that are void now
            self._drop_branches()
        if changed:
            self.stats.discarded += len(self._drafts)
            self.stats.rollbacks += 1
            self._drafts.clear()
            self._sides.clear()
            self.pushed.clear()
            self.decided = pos + 1
            self.epoch += 1
            self._next_feed = token
            # Queued work for the voided positions is void too.
            if self._held is not None and self._held["pos"] > pos:
                self._held = None
            self._actions = deque(a for a in self._actions if not isinstance(a, (SendTaps, Head)) or a.pos <= pos)
            if adopted is None:
                self._actions.append(Truncate(pos + 1))
            else:  # its cache holds pos + 1 ... already: no decode step to wait for
                self._actions.append(Adopt(adopted.id, pos + 1))
                self._drafts = adopted.drafts
                self._next_feed = adopted.feed
        self._committed(m.Commit(pos, token, piece))
        self._outbox.append(self._refreshed(m.Verdict(self.epoch, pos, token, piece, changed).to_dict()))
        if adopted is not None:  # its steps, in the new epoch (no pushed taps: the device asks where it needs them)
            for d in self._drafts:
                self._outbox.append(self._step(d))
            self.stats.drafts += len(self._drafts)
        self._verify()
        self._maybe_end()

    # --- resumption ------------------------------------------------------

    def connection_lost(self) -> None:
        """The connection is gone: what was received but not handled is void
        (the device sends it again after a resume)."""
        self._stash.clear()

    def check_resume(self, hello: m.Hello) -> None:
        """On the session a `ResumeWanted` names: raise resume_failed unless the
        secret is this session's current one (constant-time; with `tokens`: a
        genuine, unexpired, unused token issued since the last resume) and the
        hello asks for the same generation (plugin, prompt, options, and the
        uploads if it sends them again). SessionMoved: the session was resumed
        on another replica since (rebuild it)."""
        if self.tokens is not None:
            if self.session is None:
                raise ProtocolError("resume_failed", REFUSED)
            claims = self.tokens.check(hello.resume.secret, self.session)
            if claims.g > self.resume_gen:
                raise SessionMoved()
            if claims.g < self.resume_gen:  # issued before a resume: rotated away
                raise ProtocolError("resume_failed", REFUSED)
            self._claims = claims
        elif self.secret is None or not hmac.compare_digest(hello.resume.secret.encode(), self.secret.encode()):
            raise ProtocolError("resume_failed", REFUSED)
        differs = (hello.plugin, hello.prompt, hello.options) != (self.hello.plugin, self.hello.prompt,
                                                                 self.hello.options)
        if not differs and (hello.projection is not None or hello.gate is not None):
            differs = generation_digest(hello) != generation_digest(self.hello)
        if differs:
            raise ProtocolError("resume_failed", "the resume hello differs from the session's (plugin, prompt, options)")
        sent = hello.resume.tokens
        if sent is not None:  # what the device committed must be what this gateway verified
            mine = [c.token for c in self._commits]
            n = min(len(sent), len(mine))
            if list(sent[:n]) != mine[:n]:
                raise ProtocolError("resume_failed", "the committed tokens differ from the session's")

    def resume(self, next_pos: int, secret: str | None = None) -> None:
        """Continue after a lost connection; the device has committed every
        position < next_pos. Queues `resumed`, then `end` again if the session
        ended, else a step for each unverified drafted position. Any pending
        need_taps/side exchange is forgotten: the device gates the resent
        steps again. Raises resume_failed (the session unchanged) if it cannot."""
        self._require(not self._drafting, "resume() while a draft is computed")
        if self.phase == "ended" and self.end_msg is None or self.phase not in ("generating", "ended"):
            raise ProtocolError("resume_failed", "the session is not generating")
        if not self.first_pos <= next_pos <= self.next_draft_pos:
            raise ProtocolError(
                "resume_failed", f"device resumes at position {next_pos}; the gateway verified up to {self.verified}"
            )
        if next_pos > self.verified:  # the device committed drafts; their accept was lost
            if any(p < next_pos for p in self._sides):
                raise ProtocolError("resume_failed", f"position {min(self._sides)} awaits a side output")
            self.decided = max(self.decided, next_pos)
            self._verify()
        # Everything the device had not committed is forgotten, on both sides:
        # it gates the resent steps again. Verified positions it missed (lost
        # verdicts, or drafts verified after them) come back as commits.
        commits = self._commits[next_pos - self.first_pos:]
        self.stats.side_positions -= len(self._sides)
        self._sides.clear()
        self.decided = self.verified
        # Unsent messages and the work for them are void: resent below. Cache
        # work (Truncate, Forget) stays queued: the KV cache must follow.
        self._outbox.clear()
        self._actions = deque(a for a in self._actions if isinstance(a, _CACHE_WORK))
        self._drop_branches()  # (after the filter: its Discard stays queued)
        self._held = None
        self._stash.clear()
        self.pushed.clear()  # resent steps carry no taps: the device asks with need_taps
        self.resume_gen += 1
        if self._claims is not None:  # the token just used never resumes again here
            self.tokens.spend(self._claims)
            self._claims = None
        self.secret = secret if secret is not None else self._issue()
        self.stats.resumes += 1
        self.closing = False
        self._outbox.append(m.Resumed(self.session, self.secret, self.epoch, self.verified, commits).to_dict())
        if self.end_msg is not None:  # the device missed `end`
            self._outbox.append(self.end_msg)
            self.closing = True
            return
        for d in self._drafts:  # the steps it may have missed, identical to the first time
            self._outbox.append(self._step(d))
        self._maybe_end()

    # --- rebuilding a session this gateway does not hold -----------------

    def check_rebuild(self, hello: m.Hello) -> None:
        """On the fresh protocol whose `ResumeWanted` names a session this
        gateway does not hold: raise resume_failed unless the token is genuine,
        unexpired, unused here, of that session and generation, and the
        device's committed tokens start with the prefix it covers; then check
        the hello like a new one (limits, uploads). The token is spent at once."""
        self._require(self.phase == "hello" and hello.resume is not None, "check_rebuild() out of place")
        resume = hello.resume
        if self.tokens is None or resume.tokens is None:  # nothing to rebuild from
            raise ProtocolError("resume_failed", REFUSED)
        claims = self.tokens.check(resume.secret, resume.session)
        if generation_digest(hello) != claims.generation:
            raise ProtocolError("resume_failed", "the resume hello differs from the session's (plugin, prompt, options)")
        if claims.n > len(resume.tokens) or prefix_digest(resume.tokens[:claims.n]) != claims.prefix:
            raise ProtocolError("resume_failed", "the committed tokens differ from the session's")
        opts = hello.options
        if opts.window > self.limits.max_window or len(resume.tokens) > opts.max_new_tokens:
            raise ProtocolError("resume_failed", "the resume asks for more than the session may have")
        if opts.max_new_tokens > self.limits.max_new_tokens:
            raise ProtocolError("limit", f"max_new_tokens {opts.max_new_tokens} > {self.limits.max_new_tokens}")
        if hello.projection is not None:
            self.projection = self._projection(hello.projection, len(hello.plugin.taps))
        if hello.gate is not None:
            hidden = self.backbone.hidden_size
            self.gate = (self._floats(hello.gate.weight, "<f4", (2, hidden), "hello.gate.weight"),
                         self._floats(hello.gate.bias, "<f4", (2,), "hello.gate.bias"), hello.gate.tau)
        self.tokens.spend(claims)
        self.hello = hello
        self.resume_gen = claims.g
        self.phase = "ready"

    def rebuilt(self, session: str, prompt_tokens: int, commits: list) -> None:
        """After check_rebuild, the prompt tokenized: the session continues from
        the device's committed tokens (`commits`: m.Commit for positions P - 1
        upwards, pieces from the host's vocabulary). Queues `resumed` (and
        `end` if those tokens already end the generation). Unless it ended, the
        host must then have a KV cache holding the prompt and every committed
        token but the last: the next Draft feeds that one."""
        self._require(self.phase == "ready" and self.hello.resume is not None, "rebuilt() without check_rebuild()")
        self._check_prompt(prompt_tokens)
        first = prompt_tokens - 1
        if self.hello.resume.next != first + len(commits) or [c.pos for c in commits] != list(
                range(first, first + len(commits))):
            raise ProtocolError("resume_failed", f"device resumes at position {self.hello.resume.next} with "
                                                 f"{len(commits)} committed tokens after a prompt of {prompt_tokens}")
        self.session = session
        self.first_pos = self.verified = self.decided = first
        self.phase = "generating"
        self.stats.prompt_tokens = prompt_tokens
        self.stats.rebuilt_tokens = len(commits)
        for c in commits:
            if self.finish_reason:
                raise ProtocolError("resume_failed", "committed tokens go on after the end of the generation")
            self.verified = self.decided = c.pos + 1
            self._committed(c)
        self._next_feed = commits[-1].token if commits else None  # None: the prefill's states
        self.resume_gen += 1
        self.secret = self._issue()
        self.stats.resumes += 1
        self._outbox.append(m.Resumed(session, self.secret, self.epoch, self.verified, ()).to_dict())
        self._maybe_end()

    def _step(self, d: _Drafted) -> dict:
        """The step of a drafted position in the current epoch (without pushed taps: the
        device asks where it needs them); the same bytes every time it is sent again."""
        return m.Step(self.epoch, d.pos, d.f, d.token, d.piece, margin=d.margin).to_dict()

    def _encode(self, x: np.ndarray) -> dict:
        return codec.encode(x, self.hello.options.codec, self.hello.options.outliers)

    @staticmethod
    def _require(ok: bool, what: str) -> None:
        if not ok:  # a bug in the caller, not in the peer
            raise RuntimeError(f"gateway protocol misuse: {what}")


def _handled_while_drafting(d) -> bool:
    """Messages answered during a draft: they need no backbone work."""
    return isinstance(d, dict) and d.get("type") in ("need_taps", "accept")
