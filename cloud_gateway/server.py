"""`spa gateway`: the websocket server hosting the frozen backbone.

One process, one backbone, many sessions. Every torch call of every session
runs on a single compute thread (the `Engine`): torch already spreads one
forward over the cores, and one thread keeps sessions from fighting over them.
"""

import asyncio
import ipaddress
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

from websockets.asyncio.server import serve

from cloud_gateway.session import GatewaySession
from spa.errors import SpaError
from spa.generate import decode_one_token, prefill
from spa.protocol import messages as m
from spa.protocol.errors import CODES
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits
from spa.tokens import token_pieces

log = logging.getLogger("spa.gateway")


class Engine:
    """The backbone plus the one thread that runs it."""

    def __init__(self, backbone):
        self.backbone = backbone
        ident = backbone.identity
        self.identity = m.Backbone(ident.name, ident.fingerprint, ident.num_layers, ident.hidden_size)
        self.eos_ids = backbone.eos_token_ids
        self.pieces = token_pieces(backbone.tokenizer)
        # torch initializes lazily on the first forward (~seconds): pay it before
        # the first device does, so time to first token measures the session.
        cache, _ = prefill(backbone, backbone.encode("warm up the backbone"))
        decode_one_token(backbone, cache, 0)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-compute")

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateway:
    def __init__(self, backbone, limits: Limits = Limits(), auth_token: str | None = None):
        self.engine = Engine(backbone)
        self.limits = limits
        self.auth_token = auth_token
        self.sessions: set[GatewaySession] = set()

    async def handle(self, conn) -> None:
        if len(self.sessions) >= self.limits.max_sessions:
            frames = FrameCodec(self.limits.max_frame_bytes, self.limits.max_message_bytes)
            await conn.send(frames.pack(m.Error("busy", f"the gateway serves {self.limits.max_sessions} "
                                                        "sessions already; retry later").to_dict()))
            await conn.close(CODES["busy"][0], "busy")
            return
        session = GatewaySession(conn, self.engine, self.limits, self.auth_token)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    def serve(self, host: str, port: int):
        """The websockets server (an async context manager)."""
        return serve(
            self.handle, host, port,
            compression=None,  # zstd per message instead: deflate costs much CPU for little
            max_size=self.limits.max_frame_bytes,
            max_queue=16,  # frames buffered per connection before the reader stops reading (backpressure)
            ping_interval=20, ping_timeout=20,
        )


async def run_gateway(backbone, host: str, port: int, limits: Limits, auth_token: str | None,
                      announce=print) -> None:
    """Serve until SIGINT/SIGTERM."""
    if not is_loopback(host) and not auth_token:
        raise SpaError(f"refusing to listen on {host} without an auth token: pass --token or set SPA_GATEWAY_TOKEN")
    gateway = Gateway(backbone, limits, auth_token)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with gateway.serve(host, port) as server:
        bound = server.sockets[0].getsockname()
        ident = backbone.identity
        announce(f"spa gateway: serving {ident.name} ({ident.fingerprint}) on ws://{bound[0]}:{bound[1]} "
                 f"(auth {'on' if auth_token else 'off'}, max {limits.max_sessions} sessions, pid {os.getpid()})")
        await stop
    gateway.engine.close()
