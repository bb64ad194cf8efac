"""The device side of a session: websocket I/O around `DeviceProtocol`.

The gate and the side network run in the ExecuTorch runtime (`PtePlugin`).
For a sigma = 0 position nothing is sent but a (batched) `accept`; only a
sigma = 1 position asks for its taps and sends its side output.

Byte accounting: websocket payload bytes (compressed frames) in each
direction, split into the handshake (hello/ready: the prompt dominates) and
generation (everything after). "Per token" divides generation bytes by the
committed tokens.

Round trips: a message whose answer the device needs before it can commit its
next token. `need_taps` (answered by taps) and `side` (answered by the
verdict) always count; an `accept` counts when the gateway could not have
drafted the next position without it (lock-step, or a full window).
"""

import asyncio
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidURI, InvalidHandshake

from spa.errors import SpaError
from spa.protocol import messages as m
from spa.protocol.device import Commit, DeviceProtocol, RunGate, RunSide
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits


@dataclass
class SummaryResult:
    tokens: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    sigmas: list[int] = field(default_factory=list)  # 1 where the side network chose the token
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return b"".join(self.pieces).decode("utf-8", errors="replace")


class _Counters:
    def __init__(self):
        self.up = self.down = self.handshake_up = self.handshake_down = 0
        self.round_trips = 0
        self.messages_down: dict[str, int] = {}  # message type -> count
        self.messages_up: dict[str, int] = {}

    @staticmethod
    def count(table: dict, msg_type: str) -> None:
        table[msg_type] = table.get(msg_type, 0) + 1


async def run_session(url: str, pte, prompt: str, options: m.Options, *, tau: float | None = None,
                      token: str = "", on_commit=None, limits: Limits = Limits(),
                      open_timeout: float = 30.0) -> SummaryResult:
    """Generate one summary through the gateway at `url`; `on_commit(piece, sigma)` streams it."""
    tau = pte.tau if tau is None else tau
    plugin = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    proto = DeviceProtocol(m.Hello(token, plugin, prompt, options))
    frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes)
    counters, result, sigma_of = _Counters(), SummaryResult(), {}
    t_start = time.perf_counter()
    t_first = t_last = None
    try:
        conn_ctx = connect(url, compression=None, max_size=limits.max_frame_bytes, open_timeout=open_timeout)
        async with conn_ctx as conn:
            hello = frames.pack(proto.hello_message())
            counters.handshake_up += len(hello)
            await conn.send(hello)
            inbox: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(_read(conn, inbox))
            try:
                while not proto.ended:
                    data = await inbox.get()
                    if data is None:
                        raise SpaError("the gateway closed the connection before the summary ended")
                    if proto.ready is None:
                        counters.handshake_down += len(data)
                    else:
                        counters.down += len(data)
                    msg = frames.unpack(data)
                    counters.count(counters.messages_down, str(msg.get("type")))
                    proto.receive(msg)  # a verdict commits a token
                    _compute(proto, pte, tau, sigma_of)  # a sigma = 0 gate commits a draft
                    for commit in proto.committed[len(result.tokens):]:
                        t_last = time.perf_counter()
                        t_first = t_first or t_last
                        _record(result, commit, sigma_of, on_commit)
                    if inbox.empty():
                        await _flush(conn, proto, frames, counters)
            finally:
                reader.cancel()
    except PeerError as exc:
        raise SpaError(f"the gateway refused the session: {exc.code}: {exc.message}") from None
    except ProtocolError as exc:
        raise SpaError(f"the gateway broke the protocol: {exc}") from None
    except (OSError, InvalidURI, InvalidHandshake, asyncio.TimeoutError) as exc:
        raise SpaError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None
    except ConnectionClosed as exc:
        raise SpaError(f"the gateway closed the connection: {exc}") from None

    result.finish_reason = proto.end.reason
    n = max(len(result.tokens), 1)
    wall = time.perf_counter() - t_start
    result.stats = {
        "tokens": len(result.tokens),
        "side_tokens": sum(result.sigmas),
        "side_usage": sum(result.sigmas) / n,
        "rollbacks": proto.rollbacks,
        "change_rate": proto.rollbacks / max(sum(result.sigmas), 1),
        "dropped_drafts": proto.dropped,
        "bytes_down": counters.down,
        "bytes_up": counters.up,
        "bytes_down_per_token": counters.down / n,
        "bytes_up_per_token": counters.up / n,
        "handshake_bytes_up": counters.handshake_up,
        "handshake_bytes_down": counters.handshake_down,
        "messages_down": counters.messages_down,
        "messages_up": counters.messages_up,
        "round_trips": counters.round_trips,
        "round_trips_per_token": counters.round_trips / n,
        "ttft_s": (t_first - t_start) if t_first else None,
        "tokens_per_s": (len(result.tokens) - 1) / (t_last - t_first) if t_first and t_last > t_first else None,
        "wall_s": wall,
        "window": options.window,
        "codec": options.codec,
        "tau": tau,
        "gateway": proto.end.stats,
    }
    return result


async def _read(conn, inbox: asyncio.Queue) -> None:
    try:
        async for data in conn:
            await inbox.put(data if isinstance(data, bytes) else b"")
    except ConnectionClosed:
        pass
    finally:
        await inbox.put(None)


def _compute(proto: DeviceProtocol, pte, tau: float, sigma_of: dict) -> None:
    """Answer every action the protocol has for us: gates, then a side output."""
    while (action := proto.next_action()) is not None:
        if isinstance(action, RunGate):
            sigma = pte.gate(action.f[0]) > tau
            sigma_of[action.pos] = int(sigma)
            proto.gated(action.pos, sigma)
        elif isinstance(action, RunSide):
            proto.side_output(action.pos, pte.side(action.taps)[None])


async def _flush(conn, proto: DeviceProtocol, frames: FrameCodec, counters: _Counters) -> None:
    known_verified = proto.gateway_verified
    for msg in proto.flush():
        if msg["type"] in ("need_taps", "side"):
            counters.round_trips += 1
        elif msg["type"] == "accept" and msg["upto"] + 1 > known_verified + proto.window:
            counters.round_trips += 1
        data = frames.pack(msg)
        counters.up += len(data)
        counters.count(counters.messages_up, msg["type"])
        await conn.send(data)


def _record(result: SummaryResult, commit: Commit, sigma_of: dict, on_commit) -> None:
    sigma = sigma_of.get(commit.pos, 0)
    result.tokens.append(commit.token)
    result.pieces.append(commit.piece)
    result.sigmas.append(sigma)
    if on_commit is not None:
        on_commit(commit.piece, sigma)
