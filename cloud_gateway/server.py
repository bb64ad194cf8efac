"""`spa gateway`: the websocket server hosting the frozen backbone.

One process, one backbone, many sessions. Every torch call of every session
runs on a single compute thread (the `Engine`, cloud_gateway/engine.py), which
batches the decode steps of concurrent sessions into one forward.

Sessions are kept by id so that a device whose connection was lost can
resume (docs/PROTOCOL.md §6); `Gateway.sessions` holds every session that
holds memory, attached to a connection or waiting for a resume. Resume
tokens are signed with the deployment's secret (`resume_secret`; a random
one per process when none is given), so a gateway that does not hold a
session — a restarted one, another replica — rebuilds it from the resume.

`Gateway.handle_connection(connection)` serves one connection whatever carries it: the
`websockets` server here (`handle`), Ray Serve's Starlette WebSockets in
cloud_gateway/ray_serve.py.
"""

import asyncio
import ctypes
import ipaddress
import logging
import os
import signal
import ssl
from dataclasses import dataclass

import torch
from websockets.asyncio.server import serve

from cloud_gateway.engine import Engine
from cloud_gateway.session import GatewaySession, Connection, ConnectionLost, WebsocketsTransport
from spa.errors import SpaError
from spa.model.cloud_gate import gate_probability
from spa.protocol.errors import NORMAL_CLOSE, PeerError, ProtocolError
from spa.protocol.gateway import GatewayProtocol, Prefill, ProjectionCache, ResumeWanted, SessionMoved
from spa.protocol.limits import Limits
from spa.protocol.resume_tokens import REFUSED, ResumeTokens

__all__ = ["Engine", "Gateway", "is_loopback", "run_gateway", "tls_context"]

log = logging.getLogger("spa.gateway")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server TLS context for wss:// (TLS 1.2 or newer); a one-line error if the files are bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise SpaError(f"cannot load the TLS certificate {certfile} / key {keyfile or certfile}: {exc}") from None
    return ctx


def _trim_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class GatewayCounters:
    """What the gateway process counts over all its sessions (each session's own figures
    are in its protocol's GatewayStats, sent in `end`)."""

    sessions: int = 0  # sessions started
    resumes: int = 0  # resumes served
    rebuilds: int = 0  # resumes of sessions this gateway did not hold (rebuilt from the device's tokens)
    resume_refused: int = 0
    expired: int = 0  # sessions not resumed within the grace
    slow_readers: int = 0  # connections dropped because the device did not read


class Gateway:
    def __init__(self, backbone, limits: Limits = Limits(), auth_token: str | None = None,
                 max_batch: int = 64, batching: bool = True, write_limit: int = 1 << 16,
                 socket_sndbuf: int | None = None, resume_secret: bytes | None = None, branches: int = 0,
                 settle: bool = True, projection_cache: int = 32):
        self.engine = Engine(backbone, max_batch=max_batch, batching=batching)
        if branches < 0:
            raise SpaError(f"branches must be >= 0 (got {branches})")
        self.branches = branches  # branch drafting: alternatives drafted at a pending side position (0: off)
        # Settlement (devices prove their side tokens, docs/PROTOCOL.md §6): offered where the logits are
        # float32 (a device's proof bounds float32 rounding); `settle=False` turns it off.
        self.settle = settle and backbone.dtype == torch.float32
        # Cloud-side projection weights kept across sessions by hash (memory only; 0 plugins: none):
        # a device then names them instead of uploading ~1 MB in every hello.
        self.projections = ProjectionCache(projection_cache)
        # Resume tokens signed with the deployment's shared secret (None: this process's own).
        self.tokens = ResumeTokens(resume_secret)
        # Outgoing bytes one connection may buffer before a send waits for the
        # device: the websockets write limit, and optionally the kernel's
        # SO_SNDBUF (else the OS default, which autotunes up to MiBs).
        self.write_limit = write_limit
        self.socket_sndbuf = socket_sndbuf
        self.limits = limits
        self.auth_token = auth_token
        self.sessions: set[GatewaySession] = set()  # every session holding memory
        self._by_id: dict[str, GatewaySession] = {}
        self.connections = 0
        self.stats = GatewayCounters()

    def kv_bytes(self) -> int:
        """Bytes of KV caches and kept taps over all sessions."""
        return sum(s.kv_bytes for s in self.sessions)

    async def handle(self, conn) -> None:
        """The `websockets` server's handler: one connection."""
        await self.handle_connection(Connection(WebsocketsTransport(conn, self.socket_sndbuf), self.limits))

    async def handle_connection(self, connection: Connection) -> None:
        """Serve one device connection until it ends."""
        self.connections += 1
        try:
            if self.connections > 2 * self.limits.max_sessions + 16:  # connections that never say hello
                raise ProtocolError("busy", "too many connections; retry later")
            proto = GatewayProtocol(self.engine.identity, self.engine.eos_ids, self.limits, self.auth_token,
                                    resumable=self.limits.resume_grace_s > 0, resume_tokens=self.tokens,
                                    branches=self.branches, predict_gate=gate_probability, settle=self.settle,
                                    pieces=self.engine.pieces, projections=self.projections)
            first = await connection.recv(self.limits.idle_timeout_s)
            if first.get("type") == "teach":  # on-device learning: states for a device's examples
                from cloud_gateway.teaching import serve_teaching

                return await serve_teaching(self, connection, first)
            if first.get("type") == "hello" and connection.frames.first_form == "none":
                connection.frames.answer_in("none")  # a device without zstd reads our answers, errors included
            proto.receive(first)
            action = proto.next_action()
            if isinstance(action, (Prefill, ResumeWanted)):
                connection.negotiate(action.hello.compression)  # frame compression: ready names it (PROTOCOL.md §2)
            if isinstance(action, Prefill):
                from cloud_gateway.teaching import teaching_connections

                if len(self.sessions) + teaching_connections(self) >= self.limits.max_sessions:
                    raise ProtocolError("busy", f"the gateway serves {self.limits.max_sessions} sessions already; "
                                                "retry later")
                session = GatewaySession(self.engine, self.limits, proto)
                self.sessions.add(session)
                self._by_id[session.id] = session
                self.stats.sessions += 1
                await self._serve(session, connection, action)
            elif isinstance(action, ResumeWanted):
                await self._resume(connection, proto, action)
            else:
                raise ProtocolError("out_of_order", "the first message must be hello")
        except ProtocolError as exc:
            log.info("connection refused: %s", exc)
            await connection.fail(exc.code, exc.message)
        except PeerError as exc:
            log.info("device reported %s", exc)
            await connection.close(NORMAL_CLOSE)
        except ConnectionLost:
            pass
        finally:
            connection.stop()
            self.connections -= 1

    async def _resume(self, connection: Connection, proto: GatewayProtocol, action: ResumeWanted) -> None:
        """A resume hello: continue the session this gateway holds, or rebuild
        it from the hello (`proto`, the connection's fresh protocol) when it
        holds none: its replica died, this gateway restarted, or the device
        reached another replica."""
        hello = action.hello
        session = self._by_id.get(hello.resume.session)
        rebuild = False
        try:
            if session is not None:
                try:
                    session.proto.check_resume(hello)
                except SessionMoved:  # resumed elsewhere since: this copy is stale
                    log.info("session %s: resumed on another replica since; dropping this copy", session.id)
                    self._drop(session)
                    session = None
            if session is None:
                proto.check_rebuild(hello)  # the signed token (same answer as a wrong secret); spent here
                if len(self.sessions) >= self.limits.max_sessions:
                    raise ProtocolError("busy", f"the gateway serves {self.limits.max_sessions} sessions already; "
                                                "retry later")
                session = GatewaySession(self.engine, self.limits, proto, session_id=hello.resume.session)
                self.sessions.add(session)
                self._by_id[session.id] = session
                self.stats.rebuilds += 1
                rebuild = True
        except ProtocolError:
            self.stats.resume_refused += 1
            raise
        if session.connection is not None:  # its old connection is still open (half-open TCP): take over
            session.connection.abort()
        await self._serve(session, connection, action, rebuild)

    def _drop(self, session: GatewaySession) -> None:
        """Forget a session resumed elsewhere since (its state here is stale)."""
        session.moved = True
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if session.connection is not None:
            session.connection.abort()
        if not session.lock.locked():
            self._free(session)

    async def _serve(self, session: GatewaySession, connection: Connection, action, rebuild: bool = False) -> None:
        async with session.lock:
            if isinstance(action, ResumeWanted) and not rebuild:
                if session.freed or session.moved:  # expired (or moved) while we waited
                    raise ProtocolError("resume_failed", REFUSED)
                try:  # again: a concurrent resume may have rotated it
                    session.proto.check_resume(action.hello)
                except SessionMoved:
                    raise ProtocolError("resume_failed", REFUSED) from None
                if session.expiry is not None:
                    session.expiry.cancel()
                    session.expiry = None
                self.stats.resumes += 1
            over = await session.run(connection, action)
            self.stats.slow_readers += session.close_reason == "slow_reader"
            self.stats.resume_refused += session.close_reason == "resume_refused"
            if over and not session.moved:  # ended means ended: its tokens resume it nowhere here again
                self.tokens.end(session.id, 2 * self.limits.resume_grace_s)
            if over or session.moved:
                self._free(session)
            else:
                log.info("session %s: connection lost; kept %g s for a resume", session.id,
                         self.limits.resume_grace_s)
                session.expiry = asyncio.get_running_loop().call_later(
                    self.limits.resume_grace_s, self._expire, session)

    def _expire(self, session: GatewaySession) -> None:
        if session.connection is None and not session.lock.locked():
            log.info("session %s: not resumed within %g s; freed", session.id, self.limits.resume_grace_s)
            self.stats.expired += 1
            self._free(session)

    def _free(self, session: GatewaySession) -> None:
        session.release()
        self.sessions.discard(session)
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
        if not self.sessions:
            _trim_memory()

    def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None):
        """The websockets server (an async context manager)."""
        return serve(
            self.handle, host, port,
            ssl=ssl_context,
            compression=None,  # zstd per message instead: deflate costs much CPU for little
            max_size=self.limits.max_frame_bytes,
            max_queue=4,  # frames buffered per connection before the reader stops reading (backpressure)
            write_limit=self.write_limit,  # outgoing bytes buffered before a send waits for the device
            ping_interval=20, ping_timeout=20,  # a dead TCP connection is noticed within ~40 s
            close_timeout=5,
        )

    def close(self) -> None:
        for session in list(self.sessions):
            self._free(session)
        self.engine.close()


async def run_gateway(backbone, host: str, port: int, limits: Limits, auth_token: str | None,
                      announce=print, ssl_context: ssl.SSLContext | None = None, max_batch: int = 64,
                      resume_secret: bytes | None = None, branches: int = 0, settle: bool = True) -> None:
    """Serve until SIGINT/SIGTERM. `resume_secret`: the deployment's shared
    secret for resume tokens (None: this process's own). `branches`: branch
    drafting's K (0: off). `settle`: let devices settle their side tokens."""
    if not is_loopback(host) and not auth_token:
        raise SpaError(f"refusing to listen on {host} without an auth token: pass --token or set SPA_GATEWAY_TOKEN")
    gateway = Gateway(backbone, limits, auth_token, max_batch=max_batch, resume_secret=resume_secret,
                      branches=branches, settle=settle)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with gateway.serve(host, port, ssl_context) as server:
        bound = server.sockets[0].getsockname()
        ident = backbone.identity
        scheme = "wss" if ssl_context is not None else "ws"
        announce(f"spa gateway: serving {ident.name} ({ident.fingerprint}) on {scheme}://{bound[0]}:{bound[1]} "
                 f"(auth {'on' if auth_token else 'off'}, max {limits.max_sessions} sessions, "
                 f"resume grace {limits.resume_grace_s:g} s, "
                 f"{f'{branches} branches, ' if branches else ''}"
                 f"{'shared' if resume_secret else 'per-process'} resume secret, pid {os.getpid()})")
        await stop
    gateway.close()
