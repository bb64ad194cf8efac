"""Faults: lost connections, resumption, slow readers, killed clients, a restarted gateway.

Everything on loopback. A tiny websocket-aware TCP proxy (`FaultProxy`) sits
between the device and an in-process gateway; on the connection it is told to,
it drops one chosen message (or forwards half of it) and resets both TCP
connections, the way a phone losing its radio link does. The device runtime
reconnects and resumes; its tokens must equal the uninterrupted reference,
token for token.
"""

import asyncio
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest
import zstandard
from websockets.asyncio.client import connect

from cloud_gateway.process import GatewayProcess, ThreadedGateway
from device_runtime.client import run_session
from spa.protocol import messages as m
from spa.protocol.errors import CODES
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import ROOT

MAX_NEW = 16
PROMPT_DOC = "aclsum:test:4"


# --- a websocket-aware fault proxy ------------------------------------------------


class Fault:
    """On connection number `conn` (0 = the first), when the `nth` message of
    `kind` goes `direction` ("down": gateway -> device, "up": device ->
    gateway): "drop" it, or forward only "half" of its bytes, then reset both
    TCP connections."""

    def __init__(self, direction: str, kind: str, nth: int = 1, mode: str = "drop", conn: int = 0):
        self.direction, self.kind, self.nth, self.mode, self.conn = direction, kind, nth, mode, conn
        self.fired = False

    def __repr__(self):
        return f"{self.mode}-{self.direction}-{self.kind}{self.nth}@{self.conn}"


class FaultProxy:
    def __init__(self, target_port: int, faults=()):
        self.target_port = target_port
        self.faults = list(faults)
        self.connections = 0
        self.seen: list[tuple[int, str, str]] = []  # (connection, direction, message type)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, dev_r, dev_w):
        conn = self.connections
        self.connections += 1
        gw_r, gw_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        writers = (dev_w, gw_w)

        def reset():
            for w in writers:
                sock = w.get_extra_info("socket")
                if sock is not None:  # RST, not FIN: no close frame, no goodbye
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

        await asyncio.gather(self._pump(conn, "up", dev_r, gw_w, reset),
                             self._pump(conn, "down", gw_r, dev_w, reset), return_exceptions=True)

    async def _pump(self, conn, direction, reader, writer, reset):
        counts: dict[str, int] = {}
        try:
            head = await reader.readuntil(b"\r\n\r\n")  # the HTTP upgrade request / response
            writer.write(head)
            while True:
                frame, payload = await _read_ws_frame(reader)
                kind = _message_type(payload) if frame[0] & 0x0F == 2 else None
                if kind is not None:
                    self.seen.append((conn, direction, kind))
                    counts[kind] = counts.get(kind, 0) + 1
                    for f in self.faults:
                        if (f.conn, f.direction, f.kind, f.nth) == (conn, direction, kind, counts[kind]):
                            f.fired = True
                            if f.mode == "half":
                                writer.write(frame[: len(frame) // 2])
                                await writer.drain()
                            reset()
                            return
                writer.write(frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            reset()

    def close(self):
        self.server.close()


async def _read_ws_frame(reader) -> tuple[bytes, bytes]:
    """(the raw frame bytes, the unmasked payload)."""
    b = await reader.readexactly(2)
    n, masked = b[1] & 0x7F, b[1] & 0x80
    ext = b""
    if n == 126:
        ext = await reader.readexactly(2)
        n = struct.unpack(">H", ext)[0]
    elif n == 127:
        ext = await reader.readexactly(8)
        n = struct.unpack(">Q", ext)[0]
    mask = await reader.readexactly(4) if masked else b""
    data = await reader.readexactly(n)
    payload = bytes(x ^ mask[i % 4] for i, x in enumerate(data)) if masked else data
    return b + ext + mask + data, payload


def _message_type(payload: bytes) -> str | None:
    try:
        return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(payload)).get("type")
    except Exception:
        return None


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


@pytest.fixture(scope="module")
def prompt(pte):
    from device_runtime.documents import device_prompt, load_document

    return device_prompt(pte.config, load_document(PROMPT_DOC, pte.config.max_doc_tokens))


@pytest.fixture(scope="module")
def reference(backbone, pte, prompt):
    return reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def local_gateway(backbone):
    with ThreadedGateway(backbone, Limits(max_sessions=16, resume_grace_s=20)) as gw:
        yield gw


def _through_proxy(gw, pte, prompt, faults, window=2, **kw):
    async def main():
        proxy = FaultProxy(gw.port, faults)
        port = await proxy.start()
        try:
            result = await run_session(f"ws://127.0.0.1:{port}", pte, prompt,
                                       m.Options(window=window, max_new_tokens=MAX_NEW), **kw)
        finally:
            proxy.close()
        return result, proxy

    return asyncio.run(main())


# --- resumption -----------------------------------------------------------------------

FAULTS = [
    Fault("down", "step", 2),  # a draft never arrives
    Fault("down", "taps", 1),
    Fault("down", "verdict", 1),  # the device sent its side output; the verdict is lost
    Fault("down", "verdict", 2, mode="half"),  # cut in the middle of a message
    Fault("down", "end", 1),  # everything arrived but the end
    Fault("up", "need_taps", 1),
    Fault("up", "side", 1),
    Fault("up", "side", 2, mode="half"),
    Fault("up", "accept", 2),  # with the gate closed (tau = 1): accepts only
]
# The same cuts on a settling session (PROTOCOL.md §6, "Settlement"): the device
# proves its side tokens, so `settled` goes up where `side` did and no verdict
# comes down for them.
SETTLE_FAULTS = [
    Fault("down", "step", 2),  # a draft, with its exact f_t, never arrives
    Fault("down", "taps", 1),
    Fault("up", "settled", 1),  # the device settled a token; the gateway never hears it
    Fault("up", "settled", 2, mode="half"),
    Fault("down", "end", 1),
]


def test_reference_has_side_tokens_and_rollbacks(reference):
    # The faults below need verdicts (sigma = 1), accepts (sigma = 0) and a rollback to hit.
    assert 0 < sum(reference.sigmas) < len(reference.sigmas), reference.sigmas


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_lost_connection_resumes_with_identical_tokens(local_gateway, backbone, pte, prompt, reference, fault):
    """The verdict path (`settle=False`): every side output goes up and its verdict comes down."""
    if fault.kind == "accept":
        reference = reference_generate(backbone, pte, prompt, tau=1.0, max_new_tokens=MAX_NEW)
    tau = 1.0 if fault.kind == "accept" else None
    result, proxy = _through_proxy(local_gateway, pte, prompt, [fault], tau=tau, settle=False)
    _assert_resumed_once_as_the_reference(local_gateway, fault, result, proxy, reference)


@pytest.mark.parametrize("fault", SETTLE_FAULTS, ids=repr)
def test_lost_connection_of_a_settling_session_resumes_with_identical_tokens(local_gateway, pte, prompt, reference,
                                                                             fault):
    """The settling path: the device proves its side tokens and sends `settled`; a cut anywhere resumes to the
    reference's tokens, and tokens were settled (the path ran)."""
    result, proxy = _through_proxy(local_gateway, pte, prompt, [fault], settle=True)
    assert result.stats["settled"] > 0, result.stats
    _assert_resumed_once_as_the_reference(local_gateway, fault, result, proxy, reference)


def _assert_resumed_once_as_the_reference(gw, fault, result, proxy, reference):
    assert fault.fired, (fault, proxy.seen)
    assert result.tokens == reference.tokens
    assert result.sigmas == reference.sigmas
    assert result.finish_reason == reference.finish_reason
    assert result.stats["resumes"] == 1 and proxy.connections == 2
    assert gw.wait_until(lambda g: not g.sessions)  # the resumed session ended and was freed


def test_several_cuts_in_one_session_lock_step_and_draft_ahead(local_gateway, pte, prompt, reference):
    for window in (0, 4):
        faults = [Fault("down", "step", 3, conn=0), Fault("up", "side", 1, conn=1),
                  Fault("down", "verdict", 1, conn=2), Fault("down", "step", 2, mode="half", conn=3)]
        result, proxy = _through_proxy(local_gateway, pte, prompt, faults, window=window, settle=False)
        assert all(f.fired for f in faults), faults
        assert result.tokens == reference.tokens, window
        assert result.stats["resumes"] == 4


def _raw_session(url, hello: dict, read: int):
    """Connect, send hello, read `read` messages, then reset the TCP connection."""
    async def main():
        codec = FrameCodec()
        conn = await connect(url, compression=None)
        await conn.send(codec.pack(hello))
        got = [codec.unpack(await asyncio.wait_for(conn.recv(), 60)) for _ in range(read)]
        conn.transport.abort()
        return got

    return asyncio.run(main())


async def _exchange(url, msg: dict):
    """Send one message; everything received until the gateway closes, and the close code."""
    codec, got = FrameCodec(), []
    async with connect(url, compression=None) as conn:
        await conn.send(codec.pack(msg))
        try:
            async for data in conn:
                got.append(codec.unpack(data))
        except Exception:
            pass
    return got, conn.close_code


def _hello(pte, prompt, resume=None, window=2, token="") -> dict:
    plugin = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    return m.Hello(token, plugin, prompt, m.Options(window=window, max_new_tokens=MAX_NEW), resume).to_dict()


def test_resume_needs_the_sessions_current_secret(backbone, pte, prompt):
    with ThreadedGateway(backbone, Limits(resume_grace_s=5)) as gw:
        _resume_security(gw, pte, prompt)


def _resume_security(gw, pte, prompt):
    ready = _raw_session(gw.url, _hello(pte, prompt), read=2)[0]  # ready + the first step, then the link dies
    other = _raw_session(gw.url, _hello(pte, prompt), read=2)[0]
    sid, secret, start = ready["session"], ready["secret"], ready["prompt_tokens"] - 1
    assert len(secret) >= 32 and sid != other["session"] and secret != other["secret"]
    assert gw.wait_until(lambda g: len(g.sessions) == 2)

    def refused(resume):
        got, close_code = asyncio.run(_exchange(gw.url, _hello(pte, prompt, resume)))
        assert [msg["type"] for msg in got] == ["error"], got  # nothing of the session is revealed
        assert got[0]["code"] == "resume_failed" and close_code == CODES["resume_failed"][0]
        return got[0]["message"]

    wrong = refused(m.Resume(sid, secret[:-1] + ("A" if secret[-1] != "A" else "B"), start))
    unknown = refused(m.Resume("0" * 32, secret, start))
    assert wrong == unknown  # an unknown id and a wrong secret look the same
    refused(m.Resume(other["session"], secret, start))  # my secret does not open another session
    refused(m.Resume(sid, secret, start + 5))  # a position the gateway never drafted
    # The right secret resumes, once: the secret rotates.
    got = _raw_session(gw.url, _hello(pte, prompt, m.Resume(sid, secret, start)), read=2)
    assert got[0]["type"] == "resumed" and got[0]["session"] == sid and got[0]["pos"] == start
    assert got[0]["secret"] != secret and got[1]["type"] == "step" and got[1]["pos"] == start
    refused(m.Resume(sid, secret, start))
    # A resume must ask for the same generation.
    changed = _hello(pte, prompt + " and more", m.Resume(sid, got[0]["secret"], start))
    got2, _ = asyncio.run(_exchange(gw.url, changed))
    assert got2[-1]["code"] == "resume_failed" and "differs" in got2[-1]["message"]
    assert gw.call(lambda: gw.gateway.stats.resume_refused) >= 6


def test_sessions_not_resumed_are_freed_after_the_grace(backbone, pte, prompt):
    with ThreadedGateway(backbone, Limits(resume_grace_s=0.5)) as gw:
        _raw_session(gw.url, _hello(pte, prompt), read=3)  # generation under way, then the link dies
        assert gw.call(lambda: len(gw.gateway.sessions)) == 1  # kept for a resume...
        assert gw.wait_until(lambda g: not g.sessions and g.kv_bytes() == 0, timeout=10)  # ...then freed
        assert gw.call(lambda: gw.gateway.stats.expired) == 1


def test_client_killed_mid_message_leaves_no_state(backbone, pte, prompt):
    """A raw TCP client writes half a websocket frame and dies (RST), before and during a session."""
    with ThreadedGateway(backbone, Limits(resume_grace_s=0.5)) as gw:
        hello = FrameCodec().pack(_hello(pte, prompt))

        def kill_mid_frame(after_ready: bool):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            assert b"101" in sock.recv(4096).split(b"\r\n")[0]
            if after_ready:
                sock.sendall(_client_frame(hello))
                sock.settimeout(60)
                sock.recv(1 << 16)  # ready (and maybe steps): the session exists
                assert gw.call(lambda: len(gw.gateway.sessions)) == 1
            frame = _client_frame(hello)
            sock.sendall(frame[: len(frame) // 2])
            time.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        kill_mid_frame(after_ready=False)
        kill_mid_frame(after_ready=True)
        assert gw.wait_until(lambda g: not g.sessions and g.connections == 0 and g.kv_bytes() == 0, timeout=10)
        # and it still serves
        result = asyncio.run(run_session(gw.url, pte, prompt, m.Options(window=2, max_new_tokens=4)))
        assert len(result.tokens) == 4


def _client_frame(payload: bytes) -> bytes:
    """A masked binary websocket frame (client to server)."""
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else
                            bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                            bytes([0x80 | 127]) + struct.pack(">Q", n))
    mask = b"\x01\x02\x03\x04"
    return head + mask + bytes(x ^ mask[i % 4] for i, x in enumerate(payload))


# --- backpressure -----------------------------------------------------------------------


def test_a_device_that_stops_reading_stalls_no_one(backbone, pte, prompt, reference):
    limits = Limits(max_sessions=8, send_timeout_s=1.0, resume_grace_s=1.0, max_window=64)
    # Small send buffers (4 KiB in the kernel, 4 KiB in websockets) so that the
    # stalled client's ~150 KB of drafts cannot all vanish into buffers.
    with ThreadedGateway(backbone, limits, write_limit=4096, socket_sndbuf=4096) as gw:
        async def stalled():
            # A small receive buffer and a one-message queue: this client reads almost nothing.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.connect(("127.0.0.1", gw.port))
            conn = await connect(gw.url, sock=sock, compression=None, max_queue=1, ping_interval=None)
            plugin = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
            opts = m.Options(window=64, codec="f32", max_new_tokens=200)
            counting = "<|im_start|>user\nCount from 1 to 500.<|im_end|>\n<|im_start|>assistant\n1, 2, 3, 4,"
            await conn.send(FrameCodec().pack(m.Hello("", plugin, counting, opts).to_dict()))
            return conn

        async def main():
            conn = await stalled()
            t0 = time.perf_counter()
            good = await run_session(gw.url, pte, prompt, m.Options(window=2, max_new_tokens=MAX_NEW))
            return conn, good, time.perf_counter() - t0

        conn, good, seconds = asyncio.run(main())
        assert good.tokens == reference.tokens  # the normal session was served, correctly
        # The stalled one was dropped as a slow reader, and its state freed after the grace.
        assert gw.wait_until(lambda g: g.stats.slow_readers == 1, timeout=30)
        assert gw.wait_until(lambda g: not g.sessions, timeout=10)


# --- a gateway restart ------------------------------------------------------------------------


def test_gateway_restart_gives_the_device_a_one_line_error(pte_path):
    gw = GatewayProcess("--resume-grace", "120")
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        device = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "summarize", PROMPT_DOC, "--plugin", str(pte_path), "--gateway", gw.url,
             "--tau", "1", "--window", "0", "--max-new-tokens", "400", "--highlight", "none"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert device.stdout.read(1)  # generation has started
            gw.proc.kill()  # no goodbye: the device's connection is reset
            gw.proc.wait()
            gw = GatewayProcess(port=port)
            out, err = device.communicate(timeout=300)
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()
        lines = err.decode().strip().splitlines()
        assert device.returncode == 2, err.decode()
        assert lines == [lines[0]] and "Traceback" not in err.decode()
        assert lines[0].startswith("spa summarize: error: the gateway no longer has this session"), lines
        assert "resume_failed" in lines[0]
    finally:
        gw.stop()
