"""Both sides of a session in one process, no sockets: each protocol machine with a host that runs
its actions against an in-memory model, and two in-order queues between them.

The bytes benchmark (a real backbone and `.pte`), the trace model (a virtual clock) and the
protocol tests (fake models) drive sessions with these, so the way a host follows each protocol
is written once for all of them. The real hosts (cloud_gateway/session.py, device_runtime/client.py)
do the same with sockets, threads and batching.

    gateway = GatewayHost(GatewayProtocol(...), model)               # model: a GatewayModel
    device = DeviceHost(DeviceProtocol(hello, max_in_flight), gate, side)
    pair = Loopback(gateway, device)
    pair.run()                        # until the device has `end`: deliveries in a fixed order
    pair.run(random.Random(seed))     # ... or interleaved at random (every order a network allows)

Like a real gateway, `GatewayHost` keeps a round of drafts in progress while device messages
arrive, until `finish()` reports it; with `defer_heads` a head is in progress too (and device
messages wait meanwhile, as they do for a host awaiting its head).
"""

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from spa.protocol.device import DeviceProtocol, RunGate, RunHead, RunSide
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import (CutLine, Draft, DropLine, ForgetStates, ForkLine, GatewayProtocol, Head, Prefill,
                                  SendTaps)


@dataclass(frozen=True)
class Drafted:
    """What a model computed for a Draft: f_pos [1, H] and the backbone's choice there."""

    f: np.ndarray
    token: int
    piece: bytes
    alternatives: tuple = ()  # runners-up, best first (branch drafting)
    margin: float | None = None  # the top-2 logit margin (options.gate_margin)
    batch: int | None = None  # rows of the decode step it ran in; None: no decode step (prefill's states)


class GatewayModel(Protocol):
    """The compute a gateway host does for one session, on the protocol's lines."""

    def prefill(self) -> int:
        """Tokenize and prefill the prompt as line MAIN_LINE; the prompt's token count."""

    def draft(self, line: int, pos: int, feed: int | None) -> Drafted:
        """Feed `feed` at pos to `line` (None: its states of pos exist) and choose there. A line
        dropped meanwhile still gets an answer (the protocol drops it as stale)."""

    def taps(self, line: int, pos: int) -> np.ndarray:
        """The taps of pos as they go on the wire, [n_taps, H] (or projected)."""

    def head(self, line: int, pos: int, s: np.ndarray) -> tuple[int, bytes]:
        """The token of lm_head(norm(f_pos + s)) and its piece."""

    def fork(self, line: int, parent: int, keep: int) -> None: ...

    def cut(self, line: int, keep: int) -> None: ...

    def drop(self, line: int) -> None: ...

    def forget(self, line: int, upto: int) -> None: ...


class GatewayHost:
    def __init__(self, proto: GatewayProtocol, model: GatewayModel, session: str = "session",
                 secret: str | None = "secret", defer_heads: bool = False):
        """`secret`: the opaque resume secret handed to `started` (None: the protocol signs its own)."""
        self.proto, self.model = proto, model
        self.session, self.secret = session, secret
        self.defer_heads = defer_heads
        self.jobs: deque = deque()  # in progress, in the order they complete: a round of Drafts, a Head (defer_heads)
        self.waiting: deque = deque()  # device maps that arrived while a head was in progress
        self.cuts: list[CutLine] = []  # asked for while drafts were in progress: they follow those drafts
        self.log: list = []  # every action, in order
        self.rounds: list[int] = []  # the size of every round of drafts

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def heading(self) -> bool:
        """A head is in progress: the host reads nothing until it is done."""
        return any(isinstance(job, Head) for job in self.jobs)

    def receive(self, msg: dict) -> None:
        if self.heading:
            self.waiting.append(msg)
            return
        self.proto.receive(msg)
        self.work()

    def work(self) -> None:
        """Run what the protocol asks for until it waits: a round of drafts (or a deferred head)
        only starts here; `finish` completes it."""
        while not self.heading and (action := self.proto.next_action()) is not None:
            self.log.append(action)
            if isinstance(action, Draft):
                if not any(isinstance(job, Draft) for job in self.jobs):
                    self.rounds.append(0)
                self.rounds[-1] += 1
                self.jobs.append(action)
            elif isinstance(action, Head) and self.defer_heads:  # after the drafts ahead of it, as on one compute thread
                self.jobs.append(action)
            elif isinstance(action, Head):
                self.proto.verdict_ready(action.pos, *self.model.head(action.line, action.pos, action.s))
            elif isinstance(action, SendTaps):
                self.proto.taps_ready(action.pos, self.model.taps(action.line, action.pos))
            elif isinstance(action, ForkLine):
                if any(isinstance(j, Draft) and j.line == action.parent for j in self.jobs):
                    raise RuntimeError("a line was forked while a draft grows its parent")
                self.model.fork(action.line, action.parent, action.keep)
            elif isinstance(action, CutLine) and any(isinstance(job, Draft) for job in self.jobs):
                self.cuts.append(action)  # a real host's cut runs on its compute thread, after the drafts
            elif isinstance(action, CutLine):
                self.model.cut(action.line, action.keep)
            elif isinstance(action, DropLine):
                self.model.drop(action.line)
            elif isinstance(action, ForgetStates):
                self.model.forget(action.line, action.upto)
            elif isinstance(action, Prefill):
                self.proto.started(self.session, self.secret, self.model.prefill())
            else:  # ResumeWanted: the test or benchmark that resumes handles it
                raise RuntimeError(f"the loopback host does not handle {action}")

    def finish(self, then_work: bool = True) -> None:
        """Complete the oldest job in progress (then go on, unless `then_work` is False: a host whose
        connection is gone only reports)."""
        job = self.jobs.popleft()
        if isinstance(job, Head):
            self.proto.verdict_ready(job.pos, *self.model.head(job.line, job.pos, job.s))
            while self.waiting and not self.heading:
                self.proto.receive(self.waiting.popleft())
        else:
            d = self.model.draft(job.line, job.pos, job.feed)
            if not any(isinstance(j, Draft) for j in self.jobs):
                for cut in self.cuts:
                    self.model.cut(cut.line, cut.keep)
                self.cuts.clear()
            self.proto.draft_ready(job.pos, d.f, d.token, d.piece, d.alternatives, line=job.line, margin=d.margin,
                                   batch=d.batch)
        if then_work:
            self.work()

    def send(self) -> list[dict]:
        return self.proto.data_to_send()


class DeviceHost:
    def __init__(self, proto: DeviceProtocol, gate: Callable, side: Callable, head: Callable | None = None):
        """`gate(pos, f, margin) -> sigma`, `side(pos, taps, projected) -> s [1, H]`; a settling
        session's `head(pos, f, s) -> (token, piece)`, token None where the proof does not hold."""
        self.proto, self.gate, self.side, self.head = proto, gate, side, head

    def receive(self, msg: dict) -> None:
        self.proto.receive(msg)
        self.compute()

    def compute(self) -> None:
        while (action := self.proto.next_action()) is not None:
            if isinstance(action, RunGate):
                self.proto.gated(action.pos, self.gate(action.pos, action.f, action.margin))
            elif isinstance(action, RunSide):
                self.proto.side_output(action.pos, self.side(action.pos, action.taps, action.projected))
            elif isinstance(action, RunHead):
                self.proto.certified(action.pos, *self.head(action.pos, action.f, action.s))

    def send(self) -> list[dict]:
        return self.proto.flush()


@dataclass
class Loopback:
    """Two in-order queues between a GatewayHost and a DeviceHost; every map crosses as a packed frame
    (so sizes are the wire's) unless `frames` is None."""

    gateway: GatewayHost
    device: DeviceHost
    frames: FrameCodec | None = field(default_factory=FrameCodec)
    down: deque = field(default_factory=deque)  # gateway -> device, in order
    up: deque = field(default_factory=deque)
    sent: list = field(default_factory=list)  # ("up" | "down", map, frame bytes) of everything sent

    def __post_init__(self):
        self._send("up", [self.device.proto.hello_message()])

    def _send(self, direction: str, maps: list[dict]) -> None:
        for d in maps:
            size = len(self.frames.pack(d)) if self.frames is not None else 0
            self.sent.append((direction, d, size))
            (self.up if direction == "up" else self.down).append(d)

    def moves(self, device_may_send: bool = True) -> list[Callable]:
        """What may happen next: the device sends what it has, a message crosses either way, or the
        gateway finishes a job."""
        moves = [self.device_sends] if device_may_send else []
        if self.up:
            moves.append(self.deliver_up)
        if self.down:
            moves.append(self.deliver_down)
        if self.gateway.busy:
            moves.append(self.gateway_finishes)
        return moves

    def device_sends(self) -> None:
        self._send("up", self.device.send())

    def deliver_up(self) -> None:
        self.gateway.receive(self.up.popleft())
        self._send("down", self.gateway.send())

    def deliver_down(self) -> None:
        self.device.receive(self.down.popleft())

    def gateway_finishes(self) -> None:
        self.gateway.finish()
        self.gateway_sends()

    def gateway_sends(self) -> None:
        """Queue what the gateway has to send (after its host was driven from outside)."""
        self._send("down", self.gateway.send())

    def step(self, rng: random.Random | None = None) -> None:
        """One move: at random, or in a fixed order (the device reads everything it was sent before
        it sends, as the real client does; the gateway reads before it computes)."""
        if rng is not None:
            rng.choice(self.moves())()
        elif self.down:
            self.deliver_down()
        elif self.up:
            self.deliver_up()
        elif self.gateway.busy:
            self.gateway_finishes()
        else:
            self.device_sends()
            if not self.up:
                raise RuntimeError("the session is stuck: nobody has anything to send or compute")

    def run(self, rng: random.Random | None = None, max_moves: int = 1_000_000) -> None:
        for _ in range(max_moves):
            if self.device.proto.ended:
                return
            self.step(rng)
        raise RuntimeError("the session did not end")
