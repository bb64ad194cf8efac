"""One device session on the gateway: websocket I/O around `GatewayProtocol`.

The protocol object decides what may be sent; this adapter owns the KV cache
and asks the engine for backbone work. Draft-ahead: while `can_draft()` the
gateway keeps decoding with the backbone alone and streams `step`s; incoming
messages are drained first, so a verdict that rolls back is applied before
any further draft is computed on a stale token. While a draft is being
computed, a `need_taps` is answered at once (the taps are cached), so the side
network's round trip does not wait for the backbone; everything else waits
for the draft.

A session outlives its connection (`Link`): when the connection is lost
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

import torch
from websockets.exceptions import ConnectionClosed

from cloud_gateway.engine import kv_bytes
from spa.cloud_gate import predicts_open
from spa.generate import prefill, truncate
from spa.projection import project
from spa.protocol import messages as m
from spa.protocol.errors import CODES, NORMAL_CLOSE, PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import Accepted, Closed, GatewayProtocol, ResumeWanted, SideReceived, Start, TapsWanted

log = logging.getLogger("spa.gateway")
_CLOSED = object()  # inbox marker: the connection is gone
INBOX_FRAMES = 4  # decoded device messages buffered per connection before its reader stops reading


class LinkLost(Exception):
    """The connection ended (closed, reset, or dropped as a slow reader)."""


class _ResumeRefused(Exception):
    """A resume the session cannot honour; the session itself is unchanged."""

    def __init__(self, error: ProtocolError):
        self.error = error


class Link:
    """One websocket connection: a reader task feeding a bounded inbox, and
    sends bounded in time. The websockets library buffers at most `max_queue`
    incoming frames and `write_limit` outgoing bytes (+ one message)."""

    def __init__(self, conn, limits, socket_sndbuf: int | None = None):
        self.conn = conn
        sock = conn.transport.get_extra_info("socket")
        if socket_sndbuf and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_sndbuf)
        self.limits = limits
        self.frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes)
        self.inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX_FRAMES)
        self.slow = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Move frames from the socket to the inbox (unpacked, or the error)."""
        try:
            async for data in self.conn:
                if isinstance(data, str):
                    item = ProtocolError("bad_frame", "text frames are not allowed; send binary frames")
                else:
                    try:
                        item = self.frames.unpack(data)
                    except ProtocolError as exc:
                        item = exc
                await self.inbox.put(item)  # blocks when full: the socket is not read meanwhile
        except ConnectionClosed:
            pass
        finally:
            try:
                self.inbox.put_nowait(_CLOSED)
            except asyncio.QueueFull:  # the consumer finds the reader done once the inbox is empty
                pass

    async def recv(self, timeout: float) -> dict:
        """The next device map; ProtocolError for a bad frame or silence, LinkLost when gone."""
        if self.inbox.empty() and self.reader.done():
            raise LinkLost()
        try:
            item = await asyncio.wait_for(self.inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {timeout:g} s") from None
        return self._unwrap(item)

    async def recv_before(self, job: asyncio.Future):
        """The next device map if it arrives before `job` is done, else None.
        Errors are raised as by `recv` (the caller decides when)."""
        if self.inbox.empty() and self.reader.done():
            raise LinkLost()
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
            raise LinkLost()
        if isinstance(item, ProtocolError):
            raise item
        return item

    @property
    def pending(self) -> bool:
        return not self.inbox.empty()

    async def send(self, msg: dict) -> None:
        data = self.frames.pack(msg)
        try:
            await asyncio.wait_for(self.conn.send(data), self.limits.send_timeout_s)
        except asyncio.TimeoutError:
            self.slow = True
            raise LinkLost() from None
        except ConnectionClosed:
            raise LinkLost() from None

    @property
    def device_closed(self) -> bool:
        """True when the device sent a close frame (it left on purpose)."""
        return self.conn.protocol.close_rcvd is not None

    async def close(self, code: int, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self.conn.close(code, reason), self.limits.send_timeout_s)
        except (asyncio.TimeoutError, ConnectionClosed):
            self.abort()

    async def fail(self, code: str, message: str) -> None:
        """Send `error` and close with the code's close code (best effort)."""
        try:
            await self.send(m.Error(code, message[:4096]).to_dict())
        except LinkLost:
            pass
        await self.close(CODES[code][0], code)

    def abort(self) -> None:
        self.conn.transport.abort()

    async def drop_slow(self) -> None:
        """The device does not read: try the slow_reader close briefly, then reset."""
        try:
            await asyncio.wait_for(self.conn.close(CODES["slow_reader"][0], "slow_reader"), 1.0)
        except (asyncio.TimeoutError, ConnectionClosed):
            pass
        self.abort()

    def stop(self) -> None:
        self.reader.cancel()


class GatewaySession:
    def __init__(self, engine, limits, proto: GatewayProtocol):
        self.engine = engine
        self.limits = limits
        self.proto = proto  # has received the hello (Start)
        self.id = secrets.token_hex(16)
        self.link: Link | None = None
        self.lock = asyncio.Lock()  # one connection serves the session at a time
        self.expiry: asyncio.TimerHandle | None = None  # while waiting for a resume
        self.freed = False
        self.close_reason: str | None = None  # why the last connection ended (logs, tests)
        self.prompt_tokens = 0
        self.cache = None
        self.states: dict[int, torch.Tensor] = {}  # unverified position -> its states [L + 1, H]
        self.next_states: torch.Tensor | None = None  # states of proto.next_draft_pos, if computed
        self.next_feed: int | None = None  # token to feed to compute the next position
        self.decode_steps = 0  # one-token decode steps run for this session
        self.batched_steps = 0  # of which ran batched with other sessions' steps
        self.batch_rows = 0  # sum of the batch sizes of those steps (mean batch = batch_rows / decode_steps)
        self.max_batch = 1
        self.early_taps = 0  # taps sent while a draft was being computed (not after it)
        self.deferred = None  # a device map received during a draft, handled after it

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.cache) + sum(s.numel() * s.element_size() for s in self.states.values())

    def release(self) -> None:
        """Free the KV cache and the taps (the session is over)."""
        self.freed = True
        self.states.clear()
        self.cache = self.next_states = None
        self.proto.projection = None  # the device's weights: memory only, gone with the session

    @property
    def resumable(self) -> bool:
        """May this session wait for a resume once its connection is lost?"""
        p = self.proto
        return (
            self.limits.resume_grace_s > 0
            and not self.freed
            and (p.phase == "generating" or (p.phase == "ended" and p.end_msg is not None))
        )

    async def run(self, link: Link, event) -> bool:
        """Serve the session on `link` (after `event`: Start, or ResumeWanted
        already checked). Returns True when the session is over (free it),
        False when it waits for a resume."""
        self.link = link
        try:
            if isinstance(event, Start):
                await self._start(event.hello)
            else:
                await self._resume(event.hello)
            await self._generate()
            self.close_reason = "end"
            self.cache, self.next_states = None, None  # over: only `end` may be asked for again
            self.states.clear()
            # A device that got `end` answers our close frame; without that
            # answer it may have missed `end` and may come back for it.
            return self.proto.phase != "ended" or link.device_closed or not self.resumable
        except _ResumeRefused as exc:  # e.g. a position the session never reached: keep waiting
            log.info("session %s: resume refused: %s", self.id, exc.error)
            self.close_reason = "resume_refused"
            await link.fail(exc.error.code, exc.error.message)
            return not self.resumable
        except ProtocolError as exc:
            log.info("session %s: %s", self.id, exc)
            self.close_reason = exc.code
            await link.fail(exc.code, exc.message)
            return True
        except PeerError as exc:
            log.info("session %s: device reported %s", self.id, exc)
            self.close_reason = "peer_error"
            await link.close(NORMAL_CLOSE)
            return True
        except LinkLost:
            if link.slow:
                log.info("session %s: the device does not read; dropping the connection (slow_reader)", self.id)
                self.close_reason = "slow_reader"
                await link.drop_slow()
            else:
                self.close_reason = "lost"
            if link.device_closed:  # the device left on purpose: like bye
                return True
            return not self.resumable
        except Exception:  # a bug: tell the device, keep serving others
            log.exception("session %s failed", self.id)
            self.close_reason = "internal"
            await link.fail("internal", "the gateway failed on this session; see its log")
            return True
        finally:
            self.link = None

    async def _start(self, hello: m.Hello) -> None:
        engine, limits = self.engine, self.limits
        if len(hello.prompt) > limits.max_prompt_tokens * engine.max_token_chars:
            raise ProtocolError("limit", f"prompt of {len(hello.prompt)} characters is over "
                                         f"{limits.max_prompt_tokens} tokens")
        # Tokenizing off the event loop and off the compute thread.
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.backbone.encode, hello.prompt)
        ready = self.proto.ready(self.id, secrets.token_urlsafe(24), len(ids))  # checks the prompt limit first
        self.prompt_tokens = len(ids)
        self.cache, self.next_states = await engine.run(prefill, engine.backbone, ids)
        await self.link.send(ready)

    async def _resume(self, hello: m.Hello) -> None:
        proto = self.proto
        try:
            resumed = proto.resume(hello.resume.next, secrets.token_urlsafe(24))
        except ProtocolError as exc:
            raise _ResumeRefused(exc) from None
        self._forget_through(proto.verified - 1)
        log.info("session %s: resumed at position %d (epoch %d)", self.id, proto.verified, proto.epoch)
        await self.link.send(resumed)
        if proto.end_msg is not None:  # the device missed `end`
            await self.link.send(proto.end_msg)
            await self.link.close(NORMAL_CLOSE)
            return
        for pos, draft in list(proto.drafted):  # steps it may have missed, identical to the first time
            await self.link.send(proto.restep(pos, self.states[pos][-1].numpy()[None], self.engine.pieces[draft]))

    async def _generate(self) -> None:
        proto, link = self.proto, self.link
        if proto.phase == "ended":
            return
        while True:
            while self.deferred is not None or link.pending or not proto.can_draft():
                if proto.finish_reason:
                    steps = max(self.decode_steps, 1)
                    await link.send(proto.end(prompt_tokens=self.prompt_tokens, decode_steps=self.decode_steps,
                                              batched_steps=self.batched_steps, max_batch=self.max_batch,
                                              mean_batch=round(self.batch_rows / steps, 3),
                                              early_taps=self.early_taps))
                    await link.close(NORMAL_CLOSE)
                    return
                if self.deferred is not None:
                    d, self.deferred = self.deferred, None
                else:
                    d = await link.recv(self.limits.idle_timeout_s)
                event = proto.receive(d)
                if isinstance(event, Closed):
                    await link.close(NORMAL_CLOSE)
                    return
                await self._handle(event)
            await self._draft_one(proto.hello.options)

    async def _draft_one(self, options) -> None:
        engine = self.engine
        epoch, pos = self.proto.epoch, self.proto.next_draft_pos
        if self.next_states is None:
            job = asyncio.ensure_future(engine.draft(self.cache, self.next_feed, options.temperature, options.seed,
                                                     pos))
            try:
                await self._serve_during(job)
            except BaseException:
                # The draft has grown the KV cache: keep its states as computed-
                # but-unsent (as after a lost connection), so that a resumed
                # session continues from a consistent cache.
                self.next_states = (await job)[0]
                self.decode_steps += 1
                raise
            states, draft, batch = await job
            self.decode_steps += 1
            self.batched_steps += batch > 1
            self.batch_rows += batch
            self.max_batch = max(self.max_batch, batch)
        else:  # right after the prefill, or states computed before a lost connection
            states = self.next_states
            draft = await engine.head(states[-1], options.temperature, options.seed, pos)
        pushed = None
        if self.proto.gate is not None and epoch == self.proto.epoch and predicts_open(
                states[-1].numpy(), self.proto.gate, options.codec, options.outliers):
            pushed = await self._wire_taps(states)
        msg = self.proto.step(epoch, pos, states[-1].numpy()[None], draft, engine.pieces[draft], pushed)
        if msg is None:  # a rollback made this draft stale
            return
        self.states[pos], self.next_states, self.next_feed = states, None, draft
        await self.link.send(msg)

    async def _serve_during(self, job: asyncio.Future) -> None:
        """While the compute thread drafts, answer what needs no backbone work:
        taps (cached; projected off the compute thread) and accepts. The side
        network's round trip then starts without waiting for the draft (up to
        a decode step). Any other message waits, unparsed, until the draft is
        recorded, and so does everything received after it, to keep the order."""
        while not job.done() and self.deferred is None:
            d = await self.link.recv_before(job)
            if d is None:
                return
            if d.get("type") not in ("need_taps", "accept"):
                self.deferred = d  # not even parsed: the protocol state must not move under the draft
                return
            event = self.proto.receive(d)
            if isinstance(event, TapsWanted):
                self.early_taps += 1
                await self._send_taps(event.pos)
            else:
                self._forget_through(event.upto)

    async def _send_taps(self, pos: int) -> None:
        await self.link.send(self.proto.taps(pos, await self._wire_taps(self.states[pos])))

    async def _wire_taps(self, states: torch.Tensor):
        """The taps of one position as they go on the wire: [n_taps, H], or projected."""
        taps = states[list(self.proto.hello.plugin.taps)].numpy()
        if self.proto.projection is None:
            return taps
        # The device's weights, for this session only. Not on the compute
        # thread: it may be busy with a draft, and this needs no backbone.
        return await asyncio.get_running_loop().run_in_executor(None, project, taps, *self.proto.projection)

    async def _handle(self, event) -> None:
        if isinstance(event, Accepted):
            self._forget_through(event.upto)
        elif isinstance(event, TapsWanted):
            await self._send_taps(event.pos)
        elif isinstance(event, SideReceived):
            await self._apply_side(event)
        elif isinstance(event, (Start, ResumeWanted)):
            raise ProtocolError("out_of_order", "second hello")

    async def _apply_side(self, event: SideReceived) -> None:
        engine, options, pos = self.engine, self.proto.hello.options, event.pos
        f, s = self.states[pos][-1], torch.from_numpy(event.s[0])
        token = await engine.head(f + s, options.temperature, options.seed, pos)
        verdict = self.proto.verdict(pos, token, engine.pieces[token])
        if verdict["changed"]:
            # Drafts after pos were built on the old token: drop their KV
            # entries and states, and continue from the corrected token.
            await engine.run(truncate, self.cache, pos + 1)
            self.states = {p: st for p, st in self.states.items() if p <= pos}
            self.next_states, self.next_feed = None, token
        self._forget_through(pos)
        await self.link.send(verdict)

    def _forget_through(self, pos: int) -> None:
        """Verified positions need no taps any more."""
        for p in [p for p in self.states if p <= pos]:
            del self.states[p]
