"""The device fetches the backbone's states for its user's examples (docs/PROTOCOL.md §6, "Teaching").

One websocket connection: for each example a `teach` (the prompt the device builds from
the plugin's template, the summary, the plugin's taps, the codec) and the `states`
messages answering it; then `bye`. What goes up is the examples' text, the plugin's
identity (backbone fingerprint, taps, content hash) and, with the cloud-side projection,
the projection's weights (or their hash): never the weights being learned, nor a gradient.

With the projection the states come as the cloud's projections `d` ([T, r] per token
instead of [T, H]: ~18x fewer bytes), and the device then trains the side network after
them (the projections stay as they are, so the weights the gateway holds stay right).
"""

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from device_runtime.client import client_tls
from device_runtime.learning import DeviceTokens
from spa.errors import SpaError
from spa.protocol import messages as m
from spa.protocol.errors import PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits


@dataclass
class TeachStats:
    bytes_up: list[int] = field(default_factory=list)  # per example
    bytes_down: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # summary tokens (EOS included) per example
    seconds: float = 0.0
    projection_uploads: int = 0
    upload_bytes: int = 0  # of bytes_up: the teach frames that carried the projection's weights (once per gateway)

    def to_dict(self) -> dict:
        n = max(len(self.tokens), 1)
        return {"examples": len(self.tokens), "tokens": sum(self.tokens), "bytes_up": sum(self.bytes_up),
                "bytes_down": sum(self.bytes_down), "bytes_down_per_example": sum(self.bytes_down) / n,
                "bytes_up_per_example": sum(self.bytes_up) / n,
                "bytes_down_per_token": sum(self.bytes_down) / max(sum(self.tokens), 1),
                "bytes_up_per_example_without_upload": (sum(self.bytes_up) - self.upload_bytes) / n,
                "seconds": self.seconds, "projection_uploads": self.projection_uploads,
                "upload_bytes": self.upload_bytes}


async def fetch_states(url: str, plugin: m.Plugin, examples: list[tuple[str, str]], *, hidden: int, rank: int,
                       token: str = "", codec: str = "int8", outliers: int = 8, margin: bool = False,
                       projection: m.Projection | None = None, cafile: str | None = None,
                       limits: Limits = Limits(), open_timeout: float = 30.0, progress=None,
                       on_frame=None) -> tuple[list[DeviceTokens], TeachStats]:
    """The states of every (prompt, summary) example, and what it cost. `projection`: the cloud-side
    projection as uploaded (named by hash first; sent with its weights when the gateway has none).
    `progress(done, total)` after each example; `on_frame(direction, bytes)` sees every frame ("up"/"down")."""
    stats, parts = TeachStats(), []
    # The projection is named by its hash; where the gateway holds none, one teach carries the weights
    # and the gateway keeps them (in memory, by hash), so the next teaches name them again.
    sent = {"projection": projection.by_hash() if projection is not None else None}
    tls = client_tls(cafile) if url.startswith("wss://") else None
    t0 = time.perf_counter()
    while len(parts) < len(examples):
        try:
            await _connection(url, plugin, examples, parts, stats, token, codec, outliers, margin, sent,
                              hidden, rank if projection is not None else hidden, limits, open_timeout, tls,
                              progress, on_frame)
        except PeerError as exc:
            if exc.code == "upload_needed" and projection is not None and sent["projection"].weight is None:
                sent["projection"] = projection  # this gateway does not hold the weights: the next teach carries them
                stats.projection_uploads += 1
                continue
            if exc.code == "unknown_type":
                raise SpaError(f"the gateway at {url} does not serve teaching states (it predates on-device "
                               f"learning): {exc.message}") from None
            raise SpaError(f"the gateway refused to teach: {exc.code}: {exc.message}") from None
        except (OSError, InvalidURI, InvalidHandshake, asyncio.TimeoutError) as exc:
            raise SpaError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None
        except ProtocolError as exc:
            raise SpaError(f"the gateway broke the protocol: {exc}") from None
    stats.seconds = time.perf_counter() - t0
    return parts, stats


async def _connection(url, plugin, examples, parts, stats, token, codec, outliers, margin, sent, hidden, cols,
                      limits, open_timeout, tls, progress, on_frame) -> None:
    """Teach the examples not yet answered, on one connection."""
    frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes)
    async with connect(url, compression=None, max_size=limits.max_frame_bytes, open_timeout=open_timeout,
                       ssl=tls) as conn:
        try:
            while len(parts) < len(examples):
                prompt, summary = examples[len(parts)]
                up = frames.pack(m.Teach(token, plugin, prompt, summary, codec, outliers, margin,
                                         sent["projection"]).to_dict())
                on_frame and on_frame("up", up)
                await conn.send(up)
                received, down = [], 0
                while True:
                    data = await conn.recv()
                    if not isinstance(data, bytes):
                        raise ProtocolError("bad_frame", "text frames are not allowed")
                    on_frame and on_frame("down", data)
                    down += len(data)
                    msg = m.parse(frames.unpack(data), "device")
                    if isinstance(msg, m.Error):
                        raise PeerError(msg.code, msg.message)
                    if not isinstance(msg, m.States):
                        raise ProtocolError("out_of_order", f"expected states, got {msg.TYPE}")
                    received.append(msg)
                    if check_states(received, len(plugin.taps), hidden, cols, margin):
                        break
                parts.append(join_states(received, len(plugin.taps)))
                if sent["projection"] is not None and sent["projection"].weight is not None:
                    stats.upload_bytes += len(up)
                    sent["projection"] = sent["projection"].by_hash()  # the gateway holds the weights now
                stats.bytes_up.append(len(up))
                stats.bytes_down.append(down)
                stats.tokens.append(received[0].total)
                if progress is not None:
                    progress(len(parts), len(examples))
            bye = frames.pack(m.Bye().to_dict())
            on_frame and on_frame("up", bye)
            await conn.send(bye)
        except ConnectionClosed:
            rcvd = conn.protocol.close_rcvd
            raise SpaError(f"the gateway closed the teaching connection (close code "
                           f"{None if rcvd is None else rcvd.code})") from None


def check_states(received: list[m.States], n_taps: int, hidden: int, cols: int, margin: bool) -> bool:
    """Check the newest states message against the ones before it; True when the answer is complete."""
    msg = received[-1]
    rows = len(msg.target_ids)
    done = sum(len(r.target_ids) for r in received[:-1])
    if msg.first != done or msg.total != received[0].total or msg.prompt_tokens != received[0].prompt_tokens:
        raise ProtocolError("out_of_order", f"states.first {msg.first} after {done} rows (total {msg.total})")
    if rows < 1 or done + rows > msg.total:
        raise ProtocolError("bad_field", f"states.targets: {rows} rows where {msg.total - done} remain")
    if msg.f_array.shape != (rows, hidden):
        raise ProtocolError("bad_field", f"states.f: shape {list(msg.f_array.shape)}, expected [{rows}, {hidden}]")
    if msg.taps_array.shape != (rows * n_taps, cols):
        raise ProtocolError("bad_field", f"states.taps: shape {list(msg.taps_array.shape)}, "
                                         f"expected [{rows * n_taps}, {cols}]")
    if margin != (msg.margins is not None) or (margin and len(msg.margin_values) != rows):
        raise ProtocolError("bad_field", "states.margins: one per row with teach.margin, else none")
    return done + rows == msg.total


def join_states(received: list[m.States], n_taps: int) -> DeviceTokens:
    x = np.concatenate([r.taps_array.reshape(-1, n_taps, r.taps_array.shape[1]) for r in received])
    f = np.concatenate([r.f_array for r in received])
    targets = np.concatenate([r.target_ids for r in received])
    margins = None if received[0].margins is None else np.concatenate([r.margin_values for r in received])
    return DeviceTokens(x.astype(np.float32), f.astype(np.float32), targets, np.zeros(len(targets), np.int64),
                        margins)
