"""One device session on the gateway: websocket I/O around `GatewayProtocol`.

The protocol object decides what may be sent; this adapter owns the socket,
the KV cache and the backbone calls. Draft-ahead: while `can_draft()` the
gateway keeps decoding with the backbone alone and streams `step`s; incoming
messages are drained first, so a verdict that rolls back is applied before
any further draft is computed on a stale token.

Backbone work runs on the engine's compute thread, never on the event loop,
so one session's forward pass does not stall another session's I/O.
"""

import asyncio
import logging
import secrets

import torch
from websockets.exceptions import ConnectionClosed

from spa.generate import choose_token, decode_one_token, prefill, truncate
from spa.protocol import messages as m
from spa.protocol.errors import CODES, NORMAL_CLOSE, PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import Accepted, Closed, GatewayProtocol, SideReceived, Start, TapsWanted

log = logging.getLogger("spa.gateway")
_CLOSED = object()  # inbox marker: the connection is gone


class GatewaySession:
    def __init__(self, conn, engine, limits, auth_token):
        self.conn = conn
        self.engine = engine
        self.limits = limits
        self.frames = FrameCodec(limits.max_frame_bytes, limits.max_message_bytes)
        self.proto = GatewayProtocol(engine.identity, engine.eos_ids, limits, auth_token)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.cache = None
        self.states: dict[int, torch.Tensor] = {}  # unverified position -> its states [L + 1, H]
        self.next_states: torch.Tensor | None = None  # states of proto.next_draft_pos, if computed
        self.next_feed: int | None = None  # token to feed to compute the next position
        self.id = secrets.token_hex(8)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            await self._serve()
        except ProtocolError as exc:
            log.info("session %s: %s", self.id, exc)
            await self._fail(exc.code, exc.message)
        except PeerError as exc:
            log.info("session %s: device reported %s", self.id, exc)
            await self.conn.close(NORMAL_CLOSE)
        except ConnectionClosed:
            pass
        except Exception:  # a bug: tell the device, keep serving others
            log.exception("session %s failed", self.id)
            await self._fail("internal", "the gateway failed on this session; see its log")
        finally:
            reader.cancel()
            self.states.clear()
            self.cache = None

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
                await self.inbox.put(item)
        except ConnectionClosed:
            pass
        finally:
            await self.inbox.put(_CLOSED)

    async def _next(self):
        try:
            item = await asyncio.wait_for(self.inbox.get(), self.limits.idle_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {self.limits.idle_timeout_s:g} s") from None
        if item is _CLOSED:
            raise ConnectionClosed(None, None)
        if isinstance(item, ProtocolError):
            raise item
        return self.proto.receive(item)

    async def _send(self, msg: dict) -> None:
        await self.conn.send(self.frames.pack(msg))

    async def _fail(self, code: str, message: str) -> None:
        try:
            await self._send(m.Error(code, message).to_dict())
            await self.conn.close(CODES[code][0], code)
        except ConnectionClosed:
            pass

    async def _serve(self) -> None:
        event = await self._next()
        if not isinstance(event, Start):
            raise ProtocolError("out_of_order", "the first message must be hello")
        hello = event.hello
        ids = self.engine.backbone.encode(hello.prompt)
        ready = self.proto.ready(self.id, secrets.token_urlsafe(16), len(ids))  # checks the prompt limit first
        self.cache, self.next_states = await self.engine.run(prefill, self.engine.backbone, ids)
        await self._send(ready)
        while True:
            while not self.inbox.empty() or not self.proto.can_draft():
                if self.proto.finish_reason:
                    await self._send(self.proto.end(prompt_tokens=len(ids)))
                    await self.conn.close(NORMAL_CLOSE)
                    return
                if isinstance(await self._handle(await self._next()), Closed):
                    return
            await self._draft_one(hello.options)

    async def _draft_one(self, options) -> None:
        engine = self.engine
        if self.next_states is None:
            self.next_states = await engine.run(decode_one_token, engine.backbone, self.cache, self.next_feed)
        epoch, pos, states = self.proto.epoch, self.proto.next_draft_pos, self.next_states
        draft = await engine.run(lambda: choose_token(engine.backbone.logits(states[-1]), options.temperature,
                                                      options.seed, pos))
        msg = self.proto.step(epoch, pos, states[-1].numpy()[None], draft, engine.pieces[draft])
        if msg is None:  # a rollback made this draft stale
            return
        self.states[pos], self.next_states, self.next_feed = states, None, draft
        await self._send(msg)

    async def _handle(self, event):
        if isinstance(event, Accepted):
            self._forget_through(event.upto)
        elif isinstance(event, TapsWanted):
            taps = self.states[event.pos][list(self.proto.hello.plugin.taps)].numpy()
            await self._send(self.proto.taps(event.pos, taps))
        elif isinstance(event, SideReceived):
            await self._apply_side(event)
        elif isinstance(event, Start):
            raise ProtocolError("out_of_order", "second hello")
        return event

    async def _apply_side(self, event: SideReceived) -> None:
        engine, options, pos = self.engine, self.proto.hello.options, event.pos
        f, s = self.states[pos][-1], torch.from_numpy(event.s[0])
        token = await engine.run(lambda: choose_token(engine.backbone.logits(f + s), options.temperature,
                                                      options.seed, pos))
        verdict = self.proto.verdict(pos, token, engine.pieces[token])
        if verdict["changed"]:
            # Drafts after pos were built on the old token: drop their KV
            # entries and states, and continue from the corrected token.
            await engine.run(truncate, self.cache, pos + 1)
            self.states = {p: st for p, st in self.states.items() if p <= pos}
            self.next_states, self.next_feed = None, token
        self._forget_through(pos)
        await self._send(verdict)

    def _forget_through(self, pos: int) -> None:
        """Verified positions need no taps any more."""
        for p in [p for p in self.states if p <= pos]:
            del self.states[p]
