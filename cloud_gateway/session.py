"""One device session on the gateway: websocket I/O around `GatewayProtocol`.

The protocol object decides what may be sent; this adapter owns the KV cache
and asks the engine for backbone work. Draft-ahead: while `can_draft()` the
gateway keeps decoding with the backbone alone and streams `step`s; incoming
messages are drained first, so a verdict that rolls back is applied before
any further draft is computed on a stale token. While a draft is being
computed, a `need_taps` is answered at once (the taps are cached), so the side
network's round trip does not wait for the backbone; everything else waits
for the draft.

The session's compute state is its *lines* (`Line`: a KV cache and the states
of unverified positions), keyed by the line ids the protocol chooses: the main
line and, with branch drafting (`spa gateway --branches K`), branch lines
forked from it. The protocol says which line to extend, fork, cut or drop
(spa/protocol/gateway/actions.py); this host only follows. A round of drafts
(the main line's and one per branch line) is asked of the engine in one
event-loop iteration, so they run as rows of one batched forward.

A session outlives its connection (`Connection`): when the connection is lost
mid-generation without a close frame from the device (TCP reset, a cut link,
a device that stopped reading), the session keeps its state for
`resume_grace_s` and a new connection may take it over with `hello.resume`
(docs/PROTOCOL.md §6, "Resumption"). A device that closes the websocket, says
`bye`, breaks the protocol or stays silent past `idle_timeout_s` ends the
session at once.

Backbone work runs on the engine's compute thread, never on the event loop,
and sends never wait on a slow device for more than `send_timeout_s`: one
session cannot stall another.
"""

import asyncio
import logging
import secrets
import socket
import time

import torch
from websockets.exceptions import ConnectionClosed

from cloud_gateway.engine import kv_bytes
from spa.model.generate import decode_one_token, fork_cache, truncate
from spa.model.projection import project
from spa.protocol import messages as m
from spa.protocol.errors import CODES, NORMAL_CLOSE, PeerError, ProtocolError
from spa.protocol.frames import FrameCodec, negotiate
from spa.protocol.gateway import (MAIN_LINE, CutLine, Draft, DropLine, ForgetStates, ForkLine, GatewayProtocol, Head,
                                  Prefill, SendTaps)
from spa.model.spa_rule import cloud_state

log = logging.getLogger("spa.gateway")
_CLOSED = object()  # inbox marker: the connection is gone
INBOX_FRAMES = 4  # decoded device messages buffered per connection before its reader stops reading


class ConnectionLost(Exception):
    """The connection ended (closed, reset, or dropped as a slow reader)."""


class _ResumeRefused(Exception):
    """A resume the session cannot honour; the session itself is unchanged."""

    def __init__(self, error: ProtocolError):
        self.error = error


class WebsocketsTransport:
    """A `websockets` server connection as a Connection's transport (`spa gateway`).

    A transport has `frames()` (an async iterator of the received messages,
    ending when the connection does), `send(data)` (ConnectionLost once closed),
    `close(code, reason)`, `abort()` (drop the connection at once) and
    `peer_closed` (the device sent a close frame: it left on purpose).
    cloud_gateway/ray_serve.py has the Starlette one."""

    def __init__(self, conn, socket_sndbuf: int | None = None):
        self.conn = conn
        sock = conn.transport.get_extra_info("socket")
        if socket_sndbuf and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_sndbuf)

    async def frames(self):
        try:
            async for data in self.conn:
                yield data
        except ConnectionClosed:
            pass

    async def send(self, data: bytes) -> None:
        try:
            await self.conn.send(data)
        except ConnectionClosed:
            raise ConnectionLost() from None

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await self.conn.close(code, reason)
        except ConnectionClosed:
            pass

    def abort(self) -> None:
        self.conn.transport.abort()

    @property
    def peer_closed(self) -> bool:
        return self.conn.protocol.close_rcvd is not None


class Connection:
    """One device connection: a reader task feeding a bounded inbox, and
    sends bounded in time, over a transport (`WebsocketsTransport`, or the
    Starlette one of cloud_gateway/ray_serve.py). The websockets library
    buffers at most `max_queue` incoming frames and `write_limit` outgoing
    bytes (+ one message)."""

    def __init__(self, transport, limits):
        self.transport = transport
        self.limits = limits
        # Reads zstd or uncompressed frames, and answers in the hello's form, until the hello's
        # offer is settled (`negotiate`); then one form both ways (PROTOCOL.md §2).
        self.frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes, compression=None)
        self.compression: str | None = None  # the choice, announced in ready/resumed
        self.inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX_FRAMES)
        self.slow = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Move frames from the socket to the inbox (unpacked, or the error)."""
        try:
            async for data in self.transport.frames():
                if isinstance(data, str):
                    item = ProtocolError("bad_frame", "text frames are not allowed; send binary frames")
                elif len(data) > self.limits.max_frame_bytes:  # transports that do not enforce it themselves
                    item = ProtocolError("too_large", f"frame of {len(data)} bytes > {self.limits.max_frame_bytes}")
                else:
                    try:
                        item = self.frames.unpack(data)
                    except ProtocolError as exc:
                        item = exc
                await self.inbox.put(item)  # blocks when full: the socket is not read meanwhile
        finally:
            try:
                self.inbox.put_nowait(_CLOSED)
            except asyncio.QueueFull:  # the consumer finds the reader done once the inbox is empty
                pass

    async def recv(self, timeout: float) -> dict:
        """The next device map; ProtocolError for a bad frame or silence, ConnectionLost when gone."""
        if self.inbox.empty() and self.reader.done():
            raise ConnectionLost()
        try:
            item = await asyncio.wait_for(self.inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {timeout:g} s") from None
        return self._unwrap(item)

    async def recv_before(self, job: asyncio.Future):
        """The next device map if it arrives before `job` is done, else None.
        Errors are raised as by `recv` (the caller decides when)."""
        if self.inbox.empty() and self.reader.done():
            raise ConnectionLost()
        getter = asyncio.ensure_future(self.inbox.get())
        try:
            await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            getter.cancel()
            raise
        if not getter.done():
            getter.cancel()  # a cancelled Queue.get takes nothing from the inbox
            return None
        return self._unwrap(getter.result())

    @staticmethod
    def _unwrap(item) -> dict:
        if item is _CLOSED:
            raise ConnectionLost()
        if isinstance(item, ProtocolError):
            raise item
        return item

    @property
    def pending(self) -> bool:
        return not self.inbox.empty()

    def negotiate(self, offer) -> None:
        """Settle this connection's frame compression from a hello's offer (ProtocolError if none fits)."""
        self.compression = negotiate(offer)

    async def send(self, msg: dict) -> None:
        if self.compression is not None and msg.get("type") in ("ready", "resumed"):
            msg = {**msg, "compression": self.compression}  # this message is the first in the chosen form
            self.frames.negotiated(self.compression)
        data = self.frames.pack(msg)
        try:
            await asyncio.wait_for(self.transport.send(data), self.limits.send_timeout_s)
        except asyncio.TimeoutError:
            self.slow = True
            raise ConnectionLost() from None

    @property
    def device_closed(self) -> bool:
        """True when the device sent a close frame (it left on purpose)."""
        return self.transport.peer_closed

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self.transport.close(code, reason), self.limits.send_timeout_s)
        except (asyncio.TimeoutError, ConnectionLost):
            self.abort()

    async def fail(self, code: str, message: str) -> None:
        """Send `error` and close with the code's close code (best effort)."""
        try:
            await self.send(m.Error(code, message[:4096]).to_dict())
        except ConnectionLost:
            pass
        await self.close(CODES[code][0], code)

    def abort(self) -> None:
        self.transport.abort()

    async def drop_slow(self) -> None:
        """The device does not read: try the slow_reader close briefly, then reset."""
        try:
            await asyncio.wait_for(self.transport.close(CODES["slow_reader"][0], "slow_reader"), 1.0)
        except (asyncio.TimeoutError, ConnectionLost):
            pass
        self.abort()

    def stop(self) -> None:
        self.reader.cancel()


class Line:
    """One line of a session: its KV cache, and the states [L + 1, H] of its unverified positions."""

    def __init__(self, cache, states: dict | None = None):
        self.cache = cache
        self.states: dict[int, torch.Tensor] = states or {}

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.cache) + sum(s.numel() * s.element_size() for s in self.states.values())


class GatewaySession:
    """The host of one session's `GatewayProtocol`: it runs the backbone work
    the protocol asks for and moves maps between the protocol and the connection.
    It keeps compute state only (KV cache, states of unverified positions)."""

    def __init__(self, engine, limits, proto: GatewayProtocol, session_id: str | None = None):
        self.engine = engine
        self.limits = limits
        self.proto = proto  # has received the hello (Prefill), or passed check_rebuild (a resume elsewhere)
        self.id = session_id or secrets.token_hex(16)
        self.moved = False  # resumed on another replica since: this copy is dropped
        self.rebuild_s: float | None = None  # seconds the last rebuild took (prefill + committed tokens)
        self.connection: Connection | None = None
        self.lock = asyncio.Lock()  # one connection serves the session at a time
        self.expiry: asyncio.TimerHandle | None = None  # while waiting for a resume
        self.freed = False
        self.close_reason: str | None = None  # why the last connection ended (logs, tests)
        self.lines: dict[int, Line] = {}  # by the protocol's line ids

    @property
    def kv_bytes(self) -> int:
        return sum(line.kv_bytes for line in self.lines.values())

    def release(self) -> None:
        """Free the lines and what the device uploaded (the session is over)."""
        self.freed = True
        self.lines.clear()
        self.proto.release()

    @property
    def resumable(self) -> bool:
        """May this session wait for a resume once its connection is lost?"""
        p = self.proto
        return (
            self.limits.resume_grace_s > 0
            and not self.freed
            and (p.phase == "generating" or (p.phase == "ended" and p.end_msg is not None))
        )

    async def run(self, connection: Connection, action) -> bool:
        """Serve the session on `connection`, starting with `action` (Prefill, or
        ResumeWanted already checked). Returns True when the session is over
        (free it), False when it waits for a resume."""
        self.connection = connection
        try:
            if isinstance(action, Prefill):
                await self._prefill(action.hello)
            elif self.proto.phase == "ready":  # a session held elsewhere: rebuild it here
                await self._rebuild(action.hello)
            else:
                self._resume(action.hello)
            await self._serve()
            self.close_reason = "end"
            if self.proto.phase == "ended":  # over: only `end` may be asked for again
                self.lines.clear()
            # A device that got `end` answers our close frame; without that
            # answer it may have missed `end` and may come back for it.
            return self.proto.phase != "ended" or connection.device_closed or not self.resumable
        except _ResumeRefused as exc:  # e.g. a position the session never reached: keep waiting
            log.info("session %s: resume refused: %s", self.id, exc.error)
            self.close_reason = "resume_refused"
            await connection.fail(exc.error.code, exc.error.message)
            return not self.resumable
        except ProtocolError as exc:
            log.info("session %s: %s", self.id, exc)
            self.close_reason = exc.code
            await connection.fail(exc.code, exc.message)
            return True
        except PeerError as exc:
            log.info("session %s: device reported %s", self.id, exc)
            self.close_reason = "peer_error"
            await connection.close(NORMAL_CLOSE)
            return True
        except ConnectionLost:
            self.proto.connection_lost()
            if connection.slow:
                log.info("session %s: the device does not read; dropping the connection (slow_reader)", self.id)
                self.close_reason = "slow_reader"
                await connection.drop_slow()
            else:
                self.close_reason = "lost"
            if connection.device_closed:  # the device left on purpose: like bye
                return True
            return not self.resumable
        except Exception:  # a bug: tell the device, keep serving others
            log.exception("session %s failed", self.id)
            self.close_reason = "internal"
            await connection.fail("internal", "the gateway failed on this session; see its log")
            return True
        finally:
            self.connection = None

    async def _prefill(self, hello: m.Hello) -> None:
        engine, limits = self.engine, self.limits
        if len(hello.prompt) > limits.max_prompt_tokens * engine.max_token_chars:
            raise ProtocolError("limit", f"prompt of {len(hello.prompt)} characters is over "
                                         f"{limits.max_prompt_tokens} tokens")
        # Tokenizing off the event loop and off the compute thread.
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.backbone.encode, hello.prompt)
        self.proto.started(self.id, self._secret(), len(ids))  # checks the prompt limit first
        cache, states = await engine.prefill(ids)  # batched with other sessions' prefills
        self.lines = {MAIN_LINE: Line(cache, {len(ids) - 1: states})}

    def _secret(self) -> str | None:
        """An opaque random secret, or None where the protocol signs resume tokens itself."""
        return None if self.proto.resumption.tokens is not None else secrets.token_urlsafe(24)

    async def _rebuild(self, hello: m.Hello) -> None:
        """Resume a session this gateway does not hold (its replica died, the
        gateway restarted, the device reached another replica): prefill the
        prompt, then feed the device's committed tokens as one-token steps,
        as the uninterrupted session did (docs/DESIGN.md §2: never a longer
        prefill), so a solo session continues bit-identically."""
        engine, limits = self.engine, self.limits
        if len(hello.prompt) > limits.max_prompt_tokens * engine.max_token_chars:
            raise ProtocolError("limit", f"prompt of {len(hello.prompt)} characters is over "
                                         f"{limits.max_prompt_tokens} tokens")
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.backbone.encode, hello.prompt)
        tokens = hello.resume.tokens
        if any(t >= len(engine.pieces) for t in tokens):
            raise ProtocolError("resume_failed", "a committed token id is beyond the vocabulary")
        first = len(ids) - 1
        self.proto.rebuilt(self.id, len(ids), [m.Commit(first + i, t, engine.pieces[t]) for i, t in enumerate(tokens)])
        if self.proto.phase != "generating":  # the device's tokens end the generation: only `end` is left
            return
        t0 = time.perf_counter()
        cache, states = await engine.prefill(ids)
        self.lines = {MAIN_LINE: Line(cache, {} if tokens else {first: states})}
        for t in tokens[:-1]:  # one compute job each: other sessions' rounds run in between
            await engine.run(decode_one_token, engine.backbone, cache, t)
        self.rebuild_s = time.perf_counter() - t0
        log.info("session %s: rebuilt from %d prompt and %d committed tokens in %.2f s", self.id, len(ids),
                 len(tokens), self.rebuild_s)

    def _resume(self, hello: m.Hello) -> None:
        try:
            self.proto.resume(hello.resume.next, self._secret())
        except ProtocolError as exc:
            raise _ResumeRefused(exc) from None
        log.info("session %s: resumed at position %d (epoch %d)", self.id, self.proto.verified, self.proto.epoch)

    async def _serve(self) -> None:
        """Until the protocol closes: send what it queued, run the work it asks
        for, and feed it what the device sends. Messages already received are
        handled before another draft starts, so a verdict that rolls back is
        applied before a draft is computed on a stale token."""
        proto, connection = self.proto, self.connection
        draft: tuple[list[Draft], asyncio.Future] | None = None  # the round of drafts being computed
        try:
            while True:
                for msg in proto.data_to_send():
                    await connection.send(msg)
                if proto.closing:
                    await connection.close(NORMAL_CLOSE)
                    return
                action = None if draft is None and connection.pending else proto.next_action()
                if action is None:
                    if draft is None:
                        proto.receive(await connection.recv(self.limits.idle_timeout_s))
                        continue
                    d = await connection.recv_before(draft[1])
                    if d is not None:
                        proto.receive(d)
                        continue
                    done, draft = draft, None
                    self._report_round(*done)
                elif isinstance(action, Draft):
                    # A round: the drafts the protocol hands out together (main and branch lines),
                    # asked for in this loop iteration so that the engine runs them as one forward.
                    drafts = [action]
                    while isinstance(more := proto.next_action(), Draft):
                        drafts.append(more)
                    draft = (drafts, asyncio.ensure_future(self._compute_round(drafts)))
                    if more is not None:
                        await self._run(more)
                else:
                    await self._run(action)
        except BaseException:
            if draft is not None:
                # The draft has grown the KV cache: record it, so that a
                # resumed session continues from a consistent cache.
                proto.connection_lost()
                await asyncio.shield(draft[1])
                self._report_round(*draft)
            raise

    async def _compute_round(self, drafts: list[Draft]) -> list:
        return await asyncio.gather(*(self._compute_draft(d) for d in drafts))

    async def _compute_draft(self, action: Draft):
        """(states of action.pos, the Choice of its draft token with its runners-up, the rows of
        the decode step or None): a decode step on the action's line, or only the head where the
        states exist (right after the prefill or a rebuild)."""
        opts, engine, k = self.proto.hello.options, self.engine, self.proto.branching.k
        line = self.lines[action.line]
        if action.feed is None:
            states = line.states[action.pos]
            return states, await engine.head(states[-1], opts.temperature, opts.seed, action.pos, alternatives=k), None
        return await engine.draft(line.cache, action.feed, opts.temperature, opts.seed, action.pos, alternatives=k)

    def _report_round(self, drafts: list[Draft], job: asyncio.Future) -> None:
        for action, (states, choice, batch) in zip(drafts, job.result()):
            if self.proto.draft_ready(action.pos, states[-1].numpy()[None], choice.token,
                                      self.engine.pieces[choice.token], choice.alternatives, line=action.line,
                                      margin=choice.margin, batch=batch):
                # (a stale draft's states are void: its line is cut back or dropped)
                self.lines[action.line].states[action.pos] = states

    async def _run(self, action) -> None:
        engine, proto = self.engine, self.proto
        if isinstance(action, SendTaps):
            proto.taps_ready(action.pos, await self._wire_taps(self.lines[action.line].states[action.pos]))
        elif isinstance(action, Head):
            opts = proto.hello.options
            x = cloud_state(self.lines[action.line].states[action.pos][-1], action.s)
            token = (await engine.head(x, opts.temperature, opts.seed, action.pos)).token
            proto.verdict_ready(action.pos, token, engine.pieces[token])
        elif isinstance(action, CutLine):  # a rollback: drafts from action.keep on were built on the old token
            line = self.lines[action.line]
            await engine.run(truncate, line.cache, action.keep)
            line.states = {p: st for p, st in line.states.items() if p < action.keep}
        elif isinstance(action, ForgetStates):  # verified positions need no taps any more
            line = self.lines[action.line]
            line.states = {p: st for p, st in line.states.items() if p > action.upto}
        elif isinstance(action, ForkLine):  # on the compute thread: no round may grow the cache meanwhile
            self.lines[action.line] = Line(await engine.run(fork_cache, self.lines[action.parent].cache, action.keep))
        elif isinstance(action, DropLine):
            del self.lines[action.line]
        else:  # Prefill or ResumeWanted on a running session
            raise ProtocolError("out_of_order", "second hello")

    async def _wire_taps(self, states: torch.Tensor):
        """The taps of one position as they go on the wire: [n_taps, H], or projected."""
        taps = states[list(self.proto.hello.plugin.taps)].numpy()
        if self.proto.projection is None:
            return taps
        # The device's weights, for this session only. Not on the compute
        # thread: it may be busy with a draft, and this needs no backbone.
        return await asyncio.get_running_loop().run_in_executor(None, project, taps, *self.proto.projection)
