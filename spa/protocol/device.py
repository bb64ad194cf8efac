"""The device's side of a session, sans I/O: verify drafts strictly in order.

The caller owns the websocket, the gate and the side network:

    dp = DeviceProtocol(hello);  send dp.hello_message()
    on each received map:   dp.receive(frames.unpack(data))
    then until it is None:  action = dp.next_action()
        RunGate(pos, f)     -> dp.gated(pos, gate(f) > tau)
        RunSide(pos, taps)  -> dp.side_output(pos, side(taps)), or
                               side_projected(taps) when action.projected
    when no received message is waiting (or after each one: lock-step):
                            send each of dp.flush()
    dp.ended -> done; dp.committed holds the text
    connection lost before the end: on a new connection send
                            dp.resume_hello(); the gateway answers `resumed`,
                            then steps (or `end`) follow as before

A position is committed only once its sigma is known: sigma = 0 commits the
draft, sigma = 1 commits the verdict's token. So nothing shown to the user is
ever taken back. Rules: docs/PROTOCOL.md §6.
"""

from dataclasses import dataclass

import numpy as np

from spa import codec
from spa.protocol import messages as m
from spa.protocol.errors import PeerError, ProtocolError


@dataclass(frozen=True)
class RunGate:
    pos: int
    f: np.ndarray  # decoded f_pos, [1, hidden_size]


@dataclass(frozen=True)
class RunSide:
    pos: int
    taps: np.ndarray  # decoded T_pos, [n_taps, hidden_size]; [n_taps, r] when projected
    projected: bool = False  # the cloud applied the per-tap projections (hello.projection)


Action = RunGate | RunSide


Commit = m.Commit  # one committed position: pos t, token x_{t+1}, its text piece


@dataclass
class DeviceStats:
    """Everything the device protocol counts for one session."""

    side_positions: int = 0  # sigma = 1 positions
    rollbacks: int = 0  # verdicts with changed = True
    dropped: int = 0  # steps voided by those verdicts
    pushed_used: int = 0  # sigma = 1 positions answered from pushed taps (no need_taps)
    resumes: int = 0


class DeviceProtocol:
    def __init__(self, hello: m.Hello):
        self.hello = hello
        self.window = hello.options.window
        self.phase = "hello"  # -> "generating" (<-> "resuming") -> "ended"
        self.ready: m.Ready | None = None
        self.epoch = 0
        self.next_pos = 0  # next position to gate
        # Received steps not yet committed (all of this epoch), with decoded f.
        self.steps: dict[int, tuple[m.Step, np.ndarray]] = {}
        self.pushed: dict[int, np.ndarray] = {}  # decoded taps that came with those steps (hello.gate)
        self.last_step_pos = -1
        self.gateway_verified = 0  # what the gateway knows is verified, from what we sent
        self.wait: tuple[str, int] | None = None  # ("taps"|"side"|"verdict", pos)
        self.taps: np.ndarray | None = None  # of the position in wait
        self.pending_accept: int | None = None  # end of a sigma = 0 run not yet sent
        self.outbox: list[dict] = []
        self.committed: list[Commit] = []
        self.end: m.End | None = None
        self.stats = DeviceStats()
        self.session: str | None = None  # from ready
        self.secret: str | None = None  # latest resume secret (ready, then each resumed)

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    def hello_message(self) -> dict:
        return self.hello.to_dict()

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
        self.session, self.secret = ready.session, ready.secret
        self.next_pos = self.gateway_verified = ready.prompt_tokens - 1
        self.last_step_pos = self.next_pos - 1
        self.phase = "generating"

    def resume_hello(self) -> dict:
        """The `hello` that resumes this session on a new connection. Everything
        not committed is dropped: the gateway sends the steps again from the
        first position it has not verified, and the device gates them again."""
        self._require(self.phase in ("generating", "resuming") and self.session is not None, "resume_hello()")
        self.phase = "resuming"
        resume = m.Resume(self.session, self.secret, self.next_pos)
        h = self.hello
        return m.Hello(h.token, h.plugin, h.prompt, h.options, resume, h.version).to_dict()

    def _on_resumed(self, r: m.Resumed) -> None:
        self._expect(self.phase == "resuming", "resumed without a resume hello")
        self._expect(r.session == self.session, f"resumed names session {r.session!r}, not {self.session!r}")
        if r.commit is not None:  # the verdict of our side output was lost on the way
            self._expect(r.commit.pos == self.next_pos and r.pos == self.next_pos + 1,
                         f"resumed commits position {r.commit.pos} at {r.pos}; expected {self.next_pos}")
            self._commit(r.commit.pos, r.commit.token, r.commit.piece)
        else:
            self._expect(r.pos == self.next_pos, f"resumed at position {r.pos}, device is at {self.next_pos}")
        self.secret, self.epoch = r.secret, r.epoch
        self.steps.clear()
        self.pushed.clear()
        self.last_step_pos = r.pos - 1
        self.gateway_verified = r.pos
        self.wait, self.taps, self.pending_accept, self.outbox = None, None, None, []
        self.stats.resumes += 1
        self.phase = "generating"

    def _on_step(self, step: m.Step) -> None:
        # Steps voided by a rollback all arrive before its verdict (one ordered
        # stream), so any step that arrives carries the current epoch.
        self._expect(step.epoch == self.epoch, f"step of epoch {step.epoch}, expected {self.epoch}")
        self._expect(step.pos == self.last_step_pos + 1, f"step {step.pos} after step {self.last_step_pos}")
        self._expect(
            step.pos <= self.gateway_verified + self.window,
            f"step {step.pos} beyond window {self.window} after position {self.gateway_verified}",
        )
        self.steps[step.pos] = (step, self._shaped(step.f_array, "step.f", 1))
        if step.taps is not None:
            self._expect(self.hello.gate is not None, f"step {step.pos} pushes taps; the hello did not ask for that")
            self.pushed[step.pos] = self._taps_of(step.taps_array, "step.taps")
        self.last_step_pos = step.pos

    def _on_taps(self, taps: m.Taps) -> None:
        self._expect(self.wait == ("taps", taps.pos), f"taps for position {taps.pos} not asked for")
        self._expect(taps.epoch == self.epoch, f"taps of epoch {taps.epoch}, expected {self.epoch}")
        self.taps = self._taps_of(taps.taps_array, "taps.taps")
        self.wait = ("side", taps.pos)

    def _taps_of(self, x: np.ndarray, what: str) -> np.ndarray:
        proj = self.hello.projection
        cols = self.ready.backbone.hidden_size if proj is None else proj.rank
        return self._shaped(x, what, len(self.hello.plugin.taps), cols)

    def _on_verdict(self, v: m.Verdict) -> None:
        self._expect(self.wait == ("verdict", v.pos), f"verdict for position {v.pos} not expected")
        draft = self.steps[v.pos][0].draft
        self._expect(v.changed == (v.token != draft), "verdict.changed disagrees with the draft")
        self._expect(v.epoch == self.epoch + v.changed, f"verdict epoch {v.epoch} after epoch {self.epoch}")
        del self.steps[v.pos]
        if v.changed:  # drafts after pos were built on the old token
            self.stats.rollbacks += 1
            self.stats.dropped += len(self.steps)
            self.steps.clear()
            self.pushed.clear()
            self.last_step_pos = v.pos
            self.epoch = v.epoch
        self._commit(v.pos, v.token, v.piece)
        self.gateway_verified = v.pos + 1
        self.wait = None

    def _on_end(self, end: m.End) -> None:
        self._expect(
            self.wait is None and not self.steps and self.pending_accept is None,
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
        """What to compute next, or None until more messages arrive."""
        if self.phase != "generating":
            return None
        if self.wait is not None:
            kind, pos = self.wait
            return RunSide(pos, self.taps, self.hello.projection is not None) if kind == "side" else None
        if self.next_pos not in self.steps:
            return None
        return RunGate(self.next_pos, self.steps[self.next_pos][1])

    def gated(self, pos: int, sigma: bool) -> None:
        """Report sigma for the position of the last RunGate."""
        self._require(self.wait is None and pos == self.next_pos and pos in self.steps, f"gated({pos})")
        pushed = self.pushed.pop(pos, None)
        if not sigma:
            step = self.steps.pop(pos)[0]
            self._commit(pos, step.draft, step.piece)
            self.pending_accept = pos
            return
        self.stats.side_positions += 1
        self.pending_accept = None  # need_taps (or a side for pushed taps) implies it
        self.gateway_verified = pos
        if pushed is not None:  # the taps came with the step: no need_taps round trip
            self.stats.pushed_used += 1
            self.taps, self.wait = pushed, ("side", pos)
            return
        self.outbox.append(m.NeedTaps(self.epoch, pos).to_dict())
        self.wait = ("taps", pos)

    def side_output(self, pos: int, s: np.ndarray) -> None:
        """Report s [1, H] for the position of the last RunSide."""
        self._require(self.wait == ("side", pos), f"side_output({pos})")
        opts = self.hello.options
        self.outbox.append(m.Side(self.epoch, pos, codec.encode(s, opts.codec, opts.outliers)).to_dict())
        self.taps = None
        self.wait = ("verdict", pos)

    def flush(self) -> list[dict]:
        """Messages to send now, in order; a run of sigma = 0 positions becomes
        one `accept`. Call it when no received message is waiting."""
        if self.pending_accept is not None:
            self.outbox.append(m.Accept(self.epoch, self.pending_accept).to_dict())
            self.gateway_verified = self.pending_accept + 1
            self.pending_accept = None
        out, self.outbox = self.outbox, []
        return out

    # --- helpers -------------------------------------------------------

    def _commit(self, pos: int, token: int, piece: bytes) -> None:
        self.committed.append(Commit(pos, token, piece))
        self.next_pos = pos + 1

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
