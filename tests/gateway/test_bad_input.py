"""Bad input gets the documented error code, and never disturbs other sessions."""

import asyncio

import msgpack
import pytest
import zstandard
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cloud_gateway.server import Gateway
from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from spa.errors import SpaError
from spa.protocol import messages as m
from spa.protocol.errors import CODES
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits
from spa.model.pte_plugin import PtePlugin
from tests.conftest import GATEWAY_TOKEN, run_spa

DOC = "aclsum:test:3"


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


@pytest.fixture(scope="module")
def prompt(pte):
    return device_prompt(pte.config, load_document(DOC, pte.config.max_doc_tokens))


def hello(pte, prompt, token=GATEWAY_TOKEN, fingerprint=None, window=2) -> dict:
    plugin = m.Plugin(fingerprint or pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    return m.Hello(token, plugin, prompt, m.Options(window=window, max_new_tokens=16)).to_dict()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


async def exchange(url, frames: list, wait_for: int = 0):
    """Send raw frames (after receiving `wait_for` messages in between as scripted),
    then read until the gateway closes. Returns (received maps, close code)."""
    codec, received = FrameCodec(), []
    async with connect(url, compression=None, max_size=None) as conn:
        try:
            for frame in frames:
                if callable(frame):  # a frame built from what was received so far
                    frame = frame(received)
                await conn.send(frame)
                for _ in range(wait_for):
                    received.append(codec.unpack(await asyncio.wait_for(conn.recv(), 60)))
        except ConnectionClosed:  # the gateway may close before we finish sending
            pass
        try:
            async for data in conn:  # what is buffered is still delivered after a close
                received.append(codec.unpack(data))
        except ConnectionClosed:
            pass
        await conn.wait_closed()
        return received, conn.close_code


def expect_error(result, code):
    received, close_code = result
    errors = [msg for msg in received if msg["type"] == "error"]
    assert errors and errors[-1]["code"] == code, received[-3:]
    assert close_code == CODES[code][0]


BAD_FRAMES = {
    "malformed_msgpack": ([zstd(b"\xc1\xc1 not msgpack")], "bad_frame"),
    "not_zstd": ([b"plain bytes, no zstd frame"], "bad_frame"),
    "text_frame": (["a text frame"], "bad_frame"),
    "not_a_map": ([zstd(msgpack.packb([1, 2, 3]))], "bad_frame"),
    "unknown_type": ([zstd(msgpack.packb({"type": "launch"}))], "unknown_type"),
    "wrong_field_type": ([zstd(msgpack.packb({"type": "hello", "version": "1"}))], "bad_field"),
    "accept_before_hello": ([zstd(msgpack.packb({"type": "accept", "epoch": 0, "upto": 5}))], "out_of_order"),
    "zstd_bomb": ([zstd(msgpack.packb({"type": "hello", "prompt": "A" * (64 << 20)}))], "too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frames_get_their_error_code(gateway, case):
    frames, code = BAD_FRAMES[case]
    expect_error(asyncio.run(exchange(gateway.url, frames)), code)


def test_wrong_auth_is_refused(gateway, pte, prompt):
    codec = FrameCodec()
    expect_error(asyncio.run(exchange(gateway.url, [codec.pack(hello(pte, prompt, token="wrong"))])), "unauthorized")


def test_plugin_for_another_backbone_is_refused(gateway, pte, prompt):
    frame = FrameCodec().pack(hello(pte, prompt, fingerprint="0123456789abcdef"))
    expect_error(asyncio.run(exchange(gateway.url, [frame])), "backbone_mismatch")


def test_out_of_order_position_is_refused(gateway, pte, prompt):
    codec = FrameCodec()
    # After hello: ready and the first steps arrive; then accept a position never drafted.
    frames = [codec.pack(hello(pte, prompt)),
              lambda got: codec.pack({"type": "accept", "epoch": 0, "upto": got[-1]["pos"] + 50})]
    expect_error(asyncio.run(exchange(gateway.url, frames, wait_for=2)), "out_of_order")


def test_side_output_never_asked_for_is_refused(gateway, pte, prompt):
    codec = FrameCodec()
    s = {"scheme": "f32", "shape": [1, 576], "q": b"\0" * 4 * 576, "scale": b"", "oidx": b"", "oval": b"", "odtype": "f16"}
    frames = [codec.pack(hello(pte, prompt)),
              lambda got: codec.pack({"type": "side", "epoch": 0, "pos": got[-1]["pos"], "s": s})]
    expect_error(asyncio.run(exchange(gateway.url, frames, wait_for=2)), "out_of_order")


def test_oversized_frame_closes_with_1009(gateway):
    received, close_code = asyncio.run(exchange(gateway.url, [b"\0" * (Limits().max_frame_bytes + 1)]))
    assert close_code == 1009


def test_device_reports_refusals_in_one_line(gateway, pte, prompt, pte_path):
    options = m.Options(window=2, max_new_tokens=8)
    with pytest.raises(SpaError, match="refused the session: unauthorized"):
        asyncio.run(run_session(gateway.url, pte, prompt, options, token="wrong"))
    with pytest.raises(SpaError, match="cannot reach the gateway"):
        asyncio.run(run_session("ws://127.0.0.1:9", pte, prompt, options))
    proc = run_spa("summarize", DOC, "--plugin", pte_path, "--gateway", gateway.url, "--token", "wrong", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "spa summarize: error: the gateway refused the session: unauthorized: wrong or missing auth token"]


def test_a_concurrent_session_is_unaffected_by_bad_clients(gateway, pte, prompt):
    options = m.Options(window=2, max_new_tokens=16)
    solo = asyncio.run(run_session(gateway.url, pte, prompt, options, token=GATEWAY_TOKEN))

    async def together():
        good = asyncio.create_task(run_session(gateway.url, pte, prompt, options, token=GATEWAY_TOKEN))
        bad = [exchange(gateway.url, frames) for frames, _ in BAD_FRAMES.values()]
        bad.append(exchange(gateway.url, [FrameCodec().pack(hello(pte, prompt, token="wrong"))]))
        outcomes = await asyncio.gather(*bad)
        return await good, outcomes

    good, outcomes = asyncio.run(together())
    assert good.tokens == solo.tokens and good.sigmas == solo.sigmas
    assert all(close_code != 1000 for _, close_code in outcomes)


def test_gateway_refuses_to_listen_beyond_loopback_without_a_token():
    proc = run_spa("gateway", "--host", "0.0.0.0", "--port", "0", check=False, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an auth token" in proc.stderr


# --- session state and limits, observed on an in-process gateway ----------------


async def _in_process(backbone, limits, body):
    gateway = Gateway(backbone, limits)
    async with gateway.serve("127.0.0.1", 0) as server:
        url = "ws://127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        try:
            return await body(gateway, url)
        finally:
            gateway.engine.close()


async def _sessions_drained(gateway, seconds: float = 10.0) -> bool:
    """The gateway drops a session just after its socket closes: give it a moment."""
    for _ in range(int(seconds / 0.05)):
        if not gateway.sessions:
            return True
        await asyncio.sleep(0.05)
    return False


def test_disconnect_mid_generation_frees_the_session(backbone, pte, prompt):
    async def body(gateway, url):
        codec = FrameCodec()
        async with connect(url, compression=None) as conn:
            await conn.send(codec.pack(hello(pte, prompt, token="")))
            for _ in range(3):  # ready + two steps: generation is under way
                await conn.recv()
            assert len(gateway.sessions) == 1
            session = next(iter(gateway.sessions))
            assert session.lines and all(line.states for line in session.lines.values())
        assert await _sessions_drained(gateway)  # the client is gone; its state must go too
        assert not session.lines and session.kv_bytes == 0
        # and the gateway still serves
        result = await run_session(url, pte, prompt, m.Options(window=2, max_new_tokens=8))
        assert len(result.tokens) > 0

    asyncio.run(_in_process(backbone, Limits(), body))


def test_session_limit_answers_busy_and_idle_sessions_time_out(backbone, pte, prompt):
    async def body(gateway, url):
        codec = FrameCodec()
        async with connect(url, compression=None) as first:
            await first.send(codec.pack(hello(pte, prompt, token="")))
            await first.recv()
            busy = await exchange(url, [codec.pack(hello(pte, prompt, token=""))])
            expect_error(busy, "busy")
            received = []
            with pytest.raises(ConnectionClosed):  # we never answer: idle timeout
                async for data in first:
                    received.append(codec.unpack(data))
            assert received[-1]["type"] == "error" and received[-1]["code"] == "idle_timeout"
            assert first.close_code == CODES["idle_timeout"][0]

    asyncio.run(_in_process(backbone, Limits(max_sessions=1, idle_timeout_s=1.0), body))


def test_prompt_over_the_limit_is_refused_before_any_compute(backbone, pte, prompt):
    async def body(gateway, url):
        received, close_code = await exchange(url, [FrameCodec().pack(hello(pte, prompt, token=""))])
        expect_error((received, close_code), "limit")
        assert "prompt has" in received[-1]["message"]
        assert await _sessions_drained(gateway)

    asyncio.run(_in_process(backbone, Limits(max_prompt_tokens=32), body))
