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

Reconnect: when the connection is lost mid-generation (no close frame, or the
gateway going away), the client reconnects and resumes the session
(`hello.resume`, docs/PROTOCOL.md §6) for up to the gateway's
`resume_grace_s`, with backoff; nothing committed is lost or repeated. A
refused resume (the gateway restarted, or the session expired) is a one-line
error.
"""

import asyncio
import dataclasses
import ssl
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidURI, InvalidHandshake

from spa.errors import SpaError
from spa.protocol import messages as m
from spa.protocol.device import Commit, DeviceProtocol, RunGate, RunHead, RunSide
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits
from spa.model.output_head import find_head
from spa.model.spa_rule import gate_input


@dataclass
class SummaryResult:
    tokens: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    sigmas: list[int] = field(default_factory=list)  # 1 where the side network chose the token
    changed: list[int] = field(default_factory=list)  # 1 where it chose another token than the backbone's draft
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return b"".join(self.pieces).decode("utf-8", errors="replace")


class _Lost(Exception):
    """The connection ended before the session did, in a way a resume may repair."""


# Close codes after which a resume is worth trying: no close frame at all
# (1006: reset, cut link), a keepalive timeout (1011 with no error message),
# and 1001 (going away: the gateway process is shutting down; a restarted
# gateway or another replica with the deployment's secret rebuilds the
# session, and any other answers resume_failed, a one-line error).
_RETRYABLE_CLOSE = (None, 1006, 1011, 1001)


def upload_projection(pte) -> m.Projection:
    """The `hello.projection` of a plugin: its float16 weights and float32 biases, little-endian."""
    weight, bias = pte.projection_weights()
    return m.Projection(weight.shape[1], weight.astype("<f2").tobytes(), bias.astype("<f4").tobytes())


def upload_gate(pte, tau: float) -> m.GateUpload:
    """The `hello.gate` of a plugin at threshold tau: M_c's float32 weights and biases."""
    weight, bias = pte.gate_weights()
    return m.GateUpload(weight.astype("<f4").tobytes(), bias.astype("<f4").tobytes(), float(tau))


def client_tls(cafile: str | None) -> ssl.SSLContext:
    """TLS for wss://: the system's CAs, or only the CA bundle `cafile` (e.g. a self-signed gateway)."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise SpaError(f"cannot load the CA bundle {cafile}: {exc}") from None


class _Counters:
    def __init__(self):
        self.up = self.down = self.handshake_up = self.handshake_down = 0
        self.round_trips = 0
        self.resumes_seen = 0
        self.uploads = 0  # hellos sent again with the projection's weights (upload_needed)
        self.compression = None  # the frame compression the gateway chose (ready/resumed)
        self.messages_down: dict[str, int] = {}  # message type -> count
        self.messages_up: dict[str, int] = {}

    @staticmethod
    def count(table: dict, msg_type: str) -> None:
        table[msg_type] = table.get(msg_type, 0) + 1


async def run_session(url: str, pte, prompt: str, options: m.Options, *, tau: float | None = None,
                      token: str = "", on_commit=None, limits: Limits = Limits(),
                      open_timeout: float = 30.0, cafile: str | None = None,
                      reconnect: bool = True, cloud_projection: bool = False,
                      push_taps: bool = False, max_in_flight: int = 1,
                      compression: tuple[str, ...] | None = None, settle: bool = True) -> SummaryResult:
    """Generate one summary through the gateway at `url`; `on_commit(piece, sigma)` streams it.

    `cafile`: CA bundle to trust for wss:// (default: the system's). `reconnect`:
    resume the session after a lost connection (within the gateway's grace).
    `cloud_projection`: upload the side network's per-tap projections with the
    hello (~1.1 MB for 31 taps) so that taps come down as r values per tap
    instead of H (spa/model/projection.py: fewer bytes, but the cloud holds those
    weights). The hello names them by hash first: a gateway that kept them from an
    earlier session needs no upload; one that did not answers `upload_needed`, and
    the device connects again with the weights (once per plugin and gateway). `push_taps`: upload the gate (4.6 KB) and tau so
    that the gateway sends the taps with the step where the gate will open:
    one round trip per side token instead of two (spa/model/cloud_gate.py).
    `max_in_flight`: side outputs that may await their verdict at once (1: gate
    the next draft only after the verdict; more lets the device gate the drafts
    already here and send their side outputs without waiting, docs/PROTOCOL.md §6).
    `compression`: the frame compressions offered in `hello`, preferred first, e.g.
    ("zstd", "none") or ("none",) (PROTOCOL.md §2); None sends no offer, which
    means zstd. `stats["compression"]` says what the gateway chose. `settle`: prove
    side tokens on the device where possible (PROTOCOL.md §6, "Settlement"): needs the
    backbone's output head on this machine (`spa export` writes it) and greedy
    decoding; the side output of a settled token never leaves the device."""
    if pte.config.combination != "add":
        raise SpaError(f"{pte.path}: a {pte.config.combination!r} plugin (the paper's S2/S3 evaluation rows) does "
                       f"not run in the split; the gateway adds the side output (retrain without --combination)")
    tau = pte.tau if tau is None else tau
    # The plugin's gate decides whether steps carry the backbone's logit margin.
    head = find_head(pte.config.backbone["fingerprint"]) if settle and options.temperature == 0 else None
    options = dataclasses.replace(options, gate_margin=pte.config.gate_margin, settle=head is not None)
    plugin = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    projection = upload_projection(pte) if cloud_projection else None
    proto = DeviceProtocol(m.Hello(token, plugin, prompt, options,
                                   projection=projection.by_hash() if projection is not None else None,
                                   gate=upload_gate(pte, tau) if push_taps else None,
                                   compression=tuple(compression) if compression else None), max_in_flight)
    counters, result = _Counters(), SummaryResult()
    tls = client_tls(cafile) if url.startswith("wss://") else None
    clock = {"start": time.perf_counter(), "first": None, "last": None}
    lost_since, backoff, reason = None, 0.05, ""
    while not proto.ended:
        resuming = proto.ready is not None
        try:
            await _connection(url, proto, pte, tau, head, counters, result, on_commit, limits, open_timeout,
                              tls, clock)
        except _Lost as exc:
            reason = str(exc)
        except (OSError, InvalidURI, InvalidHandshake, asyncio.TimeoutError) as exc:
            if not resuming:
                raise SpaError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None
            reason = f"cannot reconnect: {exc or type(exc).__name__}"
        except PeerError as exc:
            if exc.code == "upload_needed" and projection is not None and proto.hello.projection.weight is None:
                proto.upload(projection)  # this gateway does not hold the weights: the next hello carries them
                counters.uploads += 1
                continue
            if exc.code == "resume_failed":
                raise SpaError(f"the gateway no longer has this session (it restarted, or the session expired): "
                               f"resume_failed: {exc.message}") from None
            raise SpaError(f"the gateway refused the session: {exc.code}: {exc.message}") from None
        except ProtocolError as exc:
            raise SpaError(f"the gateway broke the protocol: {exc}") from None
        else:
            continue
        grace = float(proto.ready.limits.get("resume_grace_s", 0)) if proto.ready is not None else 0.0
        if not reconnect or grace <= 0 or proto.session is None:
            raise SpaError(f"lost the connection to the gateway mid-generation ({reason})")
        if proto.stats.resumes > counters.resumes_seen:  # the last resume worked: this is a new outage
            lost_since, backoff, counters.resumes_seen = None, 0.05, proto.stats.resumes
        now = time.monotonic()
        lost_since = lost_since or now
        if now - lost_since > grace:
            raise SpaError(f"lost the connection to the gateway mid-generation and could not resume within "
                           f"{grace:g} s ({reason})")
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 1.0)

    result.finish_reason = proto.end.reason
    n = max(len(result.tokens), 1)
    t_start, t_first, t_last = clock["start"], clock["first"], clock["last"]
    wall = time.perf_counter() - t_start
    result.stats = {
        "tokens": len(result.tokens),
        "side_tokens": sum(result.sigmas),
        "side_usage": sum(result.sigmas) / n,
        "rollbacks": proto.stats.rollbacks,
        "change_rate": proto.stats.rollbacks / max(sum(result.sigmas), 1),
        "dropped_drafts": proto.stats.dropped,
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
        "cloud_projection": cloud_projection,
        "push_taps": push_taps,
        "pushed_taps_used": proto.stats.pushed_used,
        "max_in_flight": proto.stats.max_in_flight,
        "settle": options.settle and bool(proto.settles),
        "settled": proto.stats.settled,
        "unproven": proto.stats.unproven,
        "branch_adopted": proto.stats.branch_adopted,
        "tau": tau,
        "gateway": proto.end.stats,
        "resumes": proto.stats.resumes,
        "projection_uploads": counters.uploads,
        "compression": counters.compression,
    }
    return result


async def _connection(url, proto: DeviceProtocol, pte, tau, head, counters, result, on_commit, limits,
                      open_timeout, tls, clock) -> None:
    """One websocket connection: hello (or the resume hello), then messages until
    the end. Raises _Lost when the connection ends early in a repairable way."""
    offer = proto.hello.compression or ("zstd",)
    # one per connection; reads either form until ready/resumed names the choice
    frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes, compression=None, write=offer[0])
    ctx = connect(url, compression=None, max_size=limits.max_frame_bytes, open_timeout=open_timeout, ssl=tls)
    async with ctx as conn:
        hello = frames.pack(proto.resume_hello() if proto.ready is not None else proto.hello_message())
        counters.handshake_up += len(hello)
        inbox: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(_read(conn, inbox))
        try:
            await conn.send(hello)
            while not proto.ended:
                data = await inbox.get()
                if data is None:
                    raise _closed(conn)
                if proto.phase != "generating":  # ready, or resumed
                    counters.handshake_down += len(data)
                else:
                    counters.down += len(data)
                msg = frames.unpack(data)
                if msg.get("type") in ("ready", "resumed"):  # the connection's frame compression from here on
                    choice = msg.get("compression", "zstd")
                    if choice not in offer:
                        raise ProtocolError("bad_field", f"{msg['type']}.compression: {choice!r} was not offered ({list(offer)})")
                    frames.negotiated(choice)
                    counters.compression = choice
                counters.count(counters.messages_down, str(msg.get("type")))
                proto.receive(msg)  # a verdict (or a resumed's commit) commits a token
                _compute(proto, pte, tau, head)  # a sigma = 0 gate (or a proven token) commits
                for commit in proto.committed[len(result.tokens):]:
                    clock["last"] = time.perf_counter()
                    clock["first"] = clock["first"] or clock["last"]
                    _record(result, commit, commit.pos in proto.changed_positions, on_commit)
                if inbox.empty():
                    await _flush(conn, proto, frames, counters)
        except ProtocolError as exc:  # the gateway broke the protocol: tell it, close with the code's close code (§7)
            try:
                await conn.send(frames.pack(m.Error.of(exc).to_dict()))
                await conn.close(exc.close_code, exc.code)
            except ConnectionClosed:
                pass
            raise
        except ConnectionClosed:
            raise _closed(conn) from None
        finally:
            reader.cancel()


def _closed(conn) -> Exception:
    """What a connection that ended before the session did means."""
    rcvd = conn.protocol.close_rcvd
    code = None if rcvd is None else rcvd.code
    if code in _RETRYABLE_CLOSE:
        return _Lost("no close frame" if code is None else f"close code {code}")
    return SpaError(f"the gateway closed the connection before the summary ended (close code {code})")


async def _read(conn, inbox: asyncio.Queue) -> None:
    try:
        async for data in conn:
            await inbox.put(data if isinstance(data, bytes) else b"")
    except ConnectionClosed:
        pass
    finally:
        await inbox.put(None)


def _compute(proto: DeviceProtocol, pte, tau: float, head) -> None:
    """Answer every action the protocol has for us: gates, side outputs, proofs."""
    while (action := proto.next_action()) is not None:
        if isinstance(action, RunGate):
            sigma = pte.gate(gate_input(pte, action.f, action.margin)) > tau
            proto.gated(action.pos, sigma)
        elif isinstance(action, RunSide):
            side = pte.side_projected if action.projected else pte.side
            proto.side_output(action.pos, side(action.taps)[None])
        elif isinstance(action, RunHead):
            token = head.certify(action.f, action.s).token
            proto.certified(action.pos, token, head.pieces[token] if token is not None else b"")


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


def _record(result: SummaryResult, commit: Commit, changed: bool, on_commit) -> None:
    sigma = int(bool(commit.sigma))
    result.tokens.append(commit.token)
    result.pieces.append(commit.piece)
    result.sigmas.append(sigma)
    result.changed.append(int(changed))
    if on_commit is not None:
        on_commit(commit.piece, sigma)
