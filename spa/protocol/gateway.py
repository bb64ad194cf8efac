"""The gateway's side of a session, sans I/O: bookkeeping only.

The caller owns the websocket and the backbone. It feeds every unpacked map to
`receive`, which returns an event saying what the device asked for, and it
builds every outgoing message with the methods below, which check that the
message is allowed now. Rules: docs/PROTOCOL.md §6.

A typical loop:

    event = gp.receive(frames.unpack(data))
    Start        -> tokenize/prefill, send gp.ready(...), then draft
    Accepted     -> draft more while gp.can_draft()
    TapsWanted   -> send gp.taps(pos, cached taps of pos), projected first
                    with gp.projection when the device uploaded it
    SideReceived -> token of lm_head(norm(f_pos + s)); send gp.verdict(...);
                    if it says changed, truncate the KV cache after pos
    after each event: if gp.finish_reason, send gp.end() and close
    drafting:     epoch, pos = gp.epoch, gp.next_draft_pos; compute; send
                  gp.step(epoch, pos, ...) unless it returns None (stale)

Resumption (host-supported, `resumable=True`): a `hello` with `resume` on a
fresh connection yields `ResumeWanted`; the host finds the session it names
and calls that session's `check_resume(hello)` then `resume(next, secret)`,
which answers `resumed` and says what to send again (docs/PROTOCOL.md §6).
"""

import hmac
from dataclasses import dataclass

import numpy as np

from spa import codec
from spa.protocol import messages as m
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.limits import Limits


@dataclass(frozen=True)
class Start:
    hello: m.Hello  # validated: version, auth, backbone, limits


@dataclass(frozen=True)
class Accepted:
    upto: int


@dataclass(frozen=True)
class TapsWanted:
    pos: int


@dataclass(frozen=True)
class SideReceived:
    pos: int
    s: np.ndarray  # decoded, [1, hidden_size]


@dataclass(frozen=True)
class Closed:
    """The device said bye."""


@dataclass(frozen=True)
class ResumeWanted:
    hello: m.Hello  # validated like a new hello; hello.resume.next is set


Event = Start | Accepted | TapsWanted | SideReceived | Closed | ResumeWanted


class GatewayProtocol:
    def __init__(
        self,
        backbone: m.Backbone,
        eos_ids,  # token ids that end generation
        limits: Limits = Limits(),
        auth_token: str | None = None,  # None: no auth (loopback only)
        resumable: bool = False,  # the host keeps sessions for `hello.resume`
    ):
        self.backbone = backbone
        self.resumable = resumable
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.limits = limits
        self.auth_token = auth_token
        self.phase = "hello"  # -> "ready" -> "generating" -> "ended"
        self.hello: m.Hello | None = None
        # Cloud-side projection weights (weight float32 [n_taps, r, H], widened
        # from the uploaded float16; bias float32 [n_taps, r]), or None.
        self.projection: tuple[np.ndarray, np.ndarray] | None = None
        # The device's gate for pushed taps (weight [2, H], bias [2], tau), or None;
        # `pushed`: unverified drafted positions whose step carried their taps.
        self.gate: tuple[np.ndarray, np.ndarray, float] | None = None
        self.pushed: set[int] = set()
        self.epoch = 0
        self.first_pos = 0  # P - 1: the position of the first step
        self.verified = 0  # next position to verify
        self.drafted: list[tuple[int, int]] = []  # unverified (pos, draft), ascending
        self.side_pos: int | None = None  # sigma = 1 position awaiting its verdict
        self.taps_sent = False
        self.finish_reason: str | None = None  # set when the final position is verified
        self.session: str | None = None  # the id sent in ready
        self.secret: str | None = None  # current resume secret (rotated on every resume)
        self.last_verdict: m.Commit | None = None  # replayed if the device missed it
        self.end_msg: dict | None = None  # replayed if the device missed it
        self.stats = {"drafts": 0, "discarded": 0, "side_positions": 0, "rollbacks": 0}

    # --- incoming ------------------------------------------------------

    def receive(self, d: dict) -> Event:
        msg = m.parse(d)
        if isinstance(msg, m.Error):
            raise PeerError(msg.code, msg.message)
        if isinstance(msg, m.Bye):
            self.phase = "ended"
            return Closed()
        if isinstance(msg, m.Hello):
            return self._on_hello(msg)
        if not isinstance(msg, (m.Accept, m.NeedTaps, m.Side)):
            raise ProtocolError("unknown_type", f"the gateway does not receive {msg.TYPE!r}")
        if self.phase != "generating" or self.finish_reason:
            raise ProtocolError("out_of_order", f"{msg.TYPE} outside generation")
        # The device sends nothing past a sigma = 1 position before its
        # verdict, so its messages always carry the current epoch.
        if msg.epoch != self.epoch:
            raise ProtocolError("out_of_order", f"{msg.TYPE} has epoch {msg.epoch}, expected {self.epoch}")
        if isinstance(msg, m.Accept):
            return self._on_accept(msg)
        if isinstance(msg, m.NeedTaps):
            return self._on_need_taps(msg)
        return self._on_side(msg)

    def _on_hello(self, hello: m.Hello) -> Start | ResumeWanted:
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
            return ResumeWanted(hello)
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
            hidden = self.backbone.hidden_size
            weight = self._floats(hello.gate.weight, "<f4", (2, hidden), "hello.gate.weight")
            bias = self._floats(hello.gate.bias, "<f4", (2,), "hello.gate.bias")
            self.gate = (weight, bias, hello.gate.tau)
        self.hello = hello
        self.phase = "ready"
        return Start(hello)

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

    def _on_accept(self, msg: m.Accept) -> Accepted:
        self._check_no_side(msg)
        self._check_drafted(msg.upto, "accept.upto")
        token = self._pop_through(msg.upto)
        self._committed(msg.upto, token)
        return Accepted(msg.upto)

    def _on_need_taps(self, msg: m.NeedTaps) -> TapsWanted:
        self._check_no_side(msg)
        self._check_drafted(msg.pos, "need_taps.pos")
        self._pop_through(msg.pos - 1)  # positions < pos are accepted
        self.side_pos, self.taps_sent = msg.pos, False
        self.stats["side_positions"] += 1
        return TapsWanted(msg.pos)

    def _on_side(self, msg: m.Side) -> SideReceived:
        if self.side_pos is None and msg.pos in self.pushed:
            # Its taps came with its step: the side accepts every position before it.
            self._check_drafted(msg.pos, "side.pos")
            self._pop_through(msg.pos - 1)
            self.side_pos, self.taps_sent = msg.pos, True
            self.stats["side_positions"] += 1
            self.stats["pushed_used"] = self.stats.get("pushed_used", 0) + 1
        if msg.pos != self.side_pos or not self.taps_sent:
            raise ProtocolError("out_of_order", f"side for position {msg.pos} was not asked for")
        s = codec.decode(msg.s)
        if s.shape != (1, self.backbone.hidden_size):
            expected = (1, self.backbone.hidden_size)
            raise ProtocolError("bad_field", f"side.s has shape {s.shape}, expected {expected}")
        return SideReceived(msg.pos, s)

    def _check_no_side(self, msg) -> None:
        if self.side_pos is not None:
            raise ProtocolError("out_of_order", f"{msg.TYPE} while position {self.side_pos} awaits its side")

    def _check_drafted(self, pos: int, what: str) -> None:
        if not self.drafted or not self.verified <= pos <= self.drafted[-1][0]:
            raise ProtocolError("out_of_order", f"{what} = {pos} is not an unverified drafted position")

    def _pop_through(self, pos: int) -> int:
        """Drop drafts up to pos (verified now); return the draft at pos."""
        token = None
        while self.drafted and self.drafted[0][0] <= pos:
            token = self.drafted.pop(0)[1]
        self.verified = pos + 1
        self.pushed = {p for p in self.pushed if p > pos}
        return token

    def _committed(self, pos: int, token: int) -> None:
        if token in self.eos_ids:
            self.finish_reason = "eos"
        elif pos - self.first_pos + 1 >= self.hello.options.max_new_tokens:
            self.finish_reason = "max_tokens"

    # --- outgoing ------------------------------------------------------

    def ready(self, session: str, secret: str, prompt_tokens: int) -> dict:
        """After Start and prefill: the `ready` map. Raises ProtocolError("limit")
        for a prompt over max_prompt_tokens (send it as an error)."""
        self._require(self.phase == "ready", "ready() before hello or twice")
        if not 1 <= prompt_tokens <= self.limits.max_prompt_tokens:
            raise ProtocolError(
                "limit", f"prompt has {prompt_tokens} tokens; allowed 1..{self.limits.max_prompt_tokens}"
            )
        self.first_pos = self.verified = prompt_tokens - 1
        self.phase = "generating"
        self.session, self.secret = session, secret
        return m.Ready(session, secret, self.backbone, prompt_tokens, self.limits.to_dict()).to_dict()

    @property
    def next_draft_pos(self) -> int:
        return self.verified + len(self.drafted)

    def can_draft(self) -> bool:
        """True while another step may be sent: fewer than W + 1 unverified
        positions, and the drafts so far do not already end generation."""
        if self.phase != "generating" or self.finish_reason:
            return False
        if self.drafted and self.drafted[-1][1] in self.eos_ids:
            return False
        if self.next_draft_pos - self.first_pos >= self.hello.options.max_new_tokens:
            return False
        return len(self.drafted) <= self.hello.options.window

    def step(self, epoch: int, pos: int, f: np.ndarray, draft: int, piece: bytes,
             taps: np.ndarray | None = None) -> dict | None:
        """The `step` map for a draft computed at (epoch, pos), or None when a
        rollback since made it stale (drop it; the KV cache was truncated).
        `taps`: push them with the step (only with `self.gate`; as for `taps()`)."""
        if epoch != self.epoch:
            return None
        self._require(pos == self.next_draft_pos and self.can_draft(), f"step({pos}) not draftable now")
        encoded_taps = None
        if taps is not None:
            self._require(self.gate is not None, "pushed taps without hello.gate")
            self._check_taps_shape(taps)
            encoded_taps = self._encode(taps)
            self.pushed.add(pos)
            self.stats["pushed"] = self.stats.get("pushed", 0) + 1
        self.drafted.append((pos, int(draft)))
        self.stats["drafts"] += 1
        return m.Step(epoch, pos, self._encode(f), int(draft), bytes(piece), encoded_taps).to_dict()

    def _check_taps_shape(self, taps: np.ndarray) -> None:
        cols = self.backbone.hidden_size if self.projection is None else self.projection[1].shape[1]
        self._require(taps.shape == (len(self.hello.plugin.taps), cols), f"taps of shape {taps.shape}")

    def taps(self, pos: int, taps: np.ndarray) -> dict:
        """The `taps` map answering TapsWanted(pos); taps is [n_taps, H], or
        [n_taps, r] projected with `self.projection` when the device uploaded it."""
        self._require(pos == self.side_pos and not self.taps_sent, f"taps({pos}) not asked for")
        self._check_taps_shape(taps)
        self.taps_sent = True
        return m.Taps(self.epoch, pos, self._encode(taps)).to_dict()

    def verdict(self, pos: int, token: int, piece: bytes) -> dict:
        """The `verdict` map for the side-corrected token at pos. When it
        differs from the draft, later drafts are void and the epoch moves on."""
        self._require(pos == self.side_pos and self.taps_sent, f"verdict({pos}) without its side output")
        token = int(token)
        changed = token != self._pop_through(pos)
        if changed:
            self.stats["discarded"] += len(self.drafted)
            self.stats["rollbacks"] += 1
            self.drafted.clear()
            self.pushed.clear()
            self.epoch += 1
        self.side_pos = None
        self._committed(pos, token)
        self.last_verdict = m.Commit(pos, token, bytes(piece))
        return m.Verdict(self.epoch, pos, token, bytes(piece), changed).to_dict()

    def end(self, **extra_stats) -> dict:
        """The `end` map, once finish_reason is set; extra_stats are numbers."""
        self._require(self.finish_reason is not None and self.phase == "generating", "end() before the end")
        self.phase = "ended"
        tokens = self.verified - self.first_pos
        self.end_msg = m.End(self.finish_reason, {"tokens": tokens, **self.stats, **extra_stats}).to_dict()
        return self.end_msg

    # --- resumption ------------------------------------------------------

    def check_resume(self, hello: m.Hello) -> None:
        """On the session a `ResumeWanted` names: raise resume_failed unless the
        secret is this session's current one (constant-time) and the hello asks
        for the same generation (plugin, prompt, options)."""
        if self.secret is None or not hmac.compare_digest(hello.resume.secret.encode(), self.secret.encode()):
            raise ProtocolError("resume_failed", "unknown session or wrong secret")
        if (hello.plugin, hello.prompt, hello.options) != (self.hello.plugin, self.hello.prompt, self.hello.options):
            raise ProtocolError("resume_failed", "the resume hello differs from the session's (plugin, prompt, options)")

    def resume(self, next_pos: int, secret: str) -> dict:
        """Continue after a lost connection; the device has committed every
        position < next_pos. Returns the `resumed` map. Then send, in order:
        `end_msg` if set, else `end()` if finish_reason is set, else a step
        (`restep`) for each position of `drafted`. Any pending need_taps/side
        exchange is forgotten: the device gates the resent steps again."""
        if self.phase == "ended" and self.end_msg is None or self.phase not in ("generating", "ended"):
            raise ProtocolError("resume_failed", "the session is not generating")
        commit = None
        last = self.last_verdict
        if last is not None and next_pos == last.pos == self.verified - 1:
            commit = last  # the device sent its side output but missed the verdict
        elif self.verified <= next_pos <= self.next_draft_pos:
            if next_pos > self.verified:  # the device committed drafts; their accept was lost
                if self.side_pos is not None and self.side_pos < next_pos:
                    raise ProtocolError("resume_failed", f"position {self.side_pos} awaits a side output")
                self._committed(next_pos - 1, self._pop_through(next_pos - 1))
        else:
            raise ProtocolError(
                "resume_failed", f"device resumes at position {next_pos}; the gateway verified up to {self.verified}"
            )
        if self.side_pos is not None:  # asked again after the resent step
            self.stats["side_positions"] -= 1
            self.side_pos, self.taps_sent = None, False
        self.pushed.clear()  # resent steps carry no taps: the device asks with need_taps
        self.secret = secret
        self.stats["resumes"] = self.stats.get("resumes", 0) + 1
        return m.Resumed(self.session, secret, self.epoch, self.verified, commit).to_dict()

    def restep(self, pos: int, f: np.ndarray, piece: bytes) -> dict:
        """A `step` sent again after a resume, for a drafted unverified position."""
        drafts = dict(self.drafted)
        self._require(pos in drafts, f"restep({pos}) of a position not drafted")
        return m.Step(self.epoch, pos, self._encode(f), drafts[pos], bytes(piece)).to_dict()

    def _encode(self, x: np.ndarray) -> dict:
        return codec.encode(x, self.hello.options.codec, self.hello.options.outliers)

    @staticmethod
    def _require(ok: bool, what: str) -> None:
        if not ok:  # a bug in the caller, not in the peer
            raise RuntimeError(f"gateway protocol misuse: {what}")
