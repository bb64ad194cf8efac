"""Frame compression negotiated in the handshake (docs/PROTOCOL.md §2): `zstd` or `none`.

A phone may have no zstd (zstd-jni has no Android library in the APK built
here), so the device offers what it can load and the gateway answers in
`ready.compression`. The Python client, against the real gateway, commits the
same tokens whatever is negotiated; frames of the wrong form after the choice
are refused; an offer the gateway cannot serve is refused in the form the
hello came in. (The Java client's runs are in tests/android/test_java_client_live.py.)
"""

import asyncio

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.frames import ZSTD_MAGIC, FrameCodec, frame_form, negotiate
from spa.model.pte_plugin import PtePlugin
from tests.conftest import GATEWAY_TOKEN

MAX_NEW = 16


def test_frames_of_both_forms_and_the_negotiation_rule():
    msg = {"type": "accept", "epoch": 0, "upto": 7}
    zstd, raw = FrameCodec().pack(msg), FrameCodec(compression="none").pack(msg)
    assert zstd[:4] == ZSTD_MAGIC and raw == msgpack.packb(msg, use_bin_type=True)
    assert frame_form(zstd) == "zstd" and frame_form(raw) == "none"
    either = FrameCodec(compression=None)
    assert either.unpack(raw) == either.unpack(zstd) == msg
    assert FrameCodec(compression="none").unpack(raw) == msg
    for strict, wrong in ((FrameCodec(), raw), (FrameCodec(compression="none"), zstd)):
        with pytest.raises(ProtocolError) as e:
            strict.unpack(wrong)
        assert e.value.code == "bad_frame"
    # before the choice a gateway writes zstd, unless told to answer an uncompressed hello in kind
    gateway = FrameCodec(compression=None)
    with pytest.raises(ProtocolError):
        gateway.unpack(b"plain bytes")
    gateway.unpack(raw)
    assert gateway.first_form == "none" and gateway.writes == "zstd"
    gateway.answer_in("none")
    assert gateway.writes == "none"
    assert negotiate(None) == "zstd" and negotiate(["none", "zstd"]) == "none" and negotiate(["lz4", "zstd"]) == "zstd"
    with pytest.raises(ProtocolError) as e:
        negotiate(["lz4"])
    assert e.value.code == "bad_field"


def test_hello_offer_and_ready_choice_round_trip_and_validate():
    plugin = m.Plugin("fp", (0, 2), "h")
    h = m.Hello("", plugin, "p", m.Options(), compression=("none", "zstd"))
    assert h.to_dict()["compression"] == ["none", "zstd"] and m.parse(h.to_dict()) == h
    assert "compression" not in m.Hello("", plugin, "p", m.Options()).to_dict()  # no offer: zstd, as before
    for bad in ([], "zstd", [1], ["x" * 33], ["zstd"] * 9):
        with pytest.raises(ProtocolError) as e:
            m.parse({**h.to_dict(), "compression": bad})
        assert e.value.code == "bad_field"
    r = m.Ready("s", "k", m.BackboneInfo("b", "fp", num_layers=2, hidden_size=8), 3, {}, "none")
    assert m.parse(r.to_dict()).compression == "none"
    old = {k: v for k, v in r.to_dict().items() if k != "compression"}  # an older gateway's ready
    assert m.parse(old).compression == "zstd"


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


@pytest.fixture(scope="module")
def prompt(pte):
    return device_prompt(pte.config, load_document("aclsum:test:1", pte.config.max_doc_tokens))


def test_python_client_commits_the_same_tokens_with_and_without_compression(gateway, pte, prompt):
    runs = {}
    for offer, chosen in ((None, "zstd"), (("zstd", "none"), "zstd"), (("none",), "none"), (("none", "zstd"), "none")):
        for window in (0, 4):
            r = asyncio.run(run_session(gateway.url, pte, prompt, m.Options(window=window, max_new_tokens=MAX_NEW),
                                        token=GATEWAY_TOKEN, compression=offer))
            assert r.stats["compression"] == chosen, (offer, r.stats["compression"])
            runs[offer, window] = r
    for window in (0, 4):
        tokens = {offer: r.tokens for (offer, w), r in runs.items() if w == window}
        assert len({tuple(t) for t in tokens.values()}) == 1, tokens
        assert len(tokens[None]) == MAX_NEW
    lockstep_zstd, lockstep_none = runs[None, 0], runs[("none",), 0]
    # uncompressed frames: the same messages, more bytes (taps and f compress a little)
    assert lockstep_none.stats["messages_down"] == lockstep_zstd.stats["messages_down"]
    assert lockstep_none.stats["bytes_down"] > lockstep_zstd.stats["bytes_down"]


async def _raw(url, frames: list[bytes]) -> tuple[list[bytes], int]:
    received = []
    async with connect(url, compression=None, max_size=None) as conn:
        try:
            for frame in frames:
                await conn.send(frame)
                if frame is frames[0]:
                    received.append(await asyncio.wait_for(conn.recv(), 120))
        except ConnectionClosed:
            pass
        try:
            async for data in conn:
                received.append(data)
        except ConnectionClosed:
            pass
        await conn.wait_closed()
        return received, conn.close_code


def _hello(pte, prompt, offer) -> dict:
    plugin = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    return m.Hello(GATEWAY_TOKEN, plugin, prompt, m.Options(max_new_tokens=4), compression=offer).to_dict()


def test_gateway_answers_an_uncompressed_hello_uncompressed_and_holds_the_choice(gateway, pte, prompt):
    raw = FrameCodec(compression="none")
    hello = raw.pack(_hello(pte, prompt, ["none"]))
    zstd_bye = FrameCodec().pack({"type": "bye"})
    received, close = asyncio.run(_raw(gateway.url, [hello, zstd_bye]))
    assert frame_form(received[0]) == "none"
    ready = raw.unpack(received[0])
    assert ready["type"] == "ready" and ready["compression"] == "none"
    # a zstd frame after `none` was chosen is refused, uncompressed
    errors = [raw.unpack(d) for d in received[1:] if frame_form(d) == "none"]
    assert any(e["type"] == "error" and e["code"] == "bad_frame" for e in errors), errors
    assert close == 4000


def test_an_offer_the_gateway_cannot_serve_is_refused_in_the_hellos_form(gateway, pte, prompt):
    raw = FrameCodec(compression="none")
    received, close = asyncio.run(_raw(gateway.url, [raw.pack(_hello(pte, prompt, ["brotli"]))]))
    error = raw.unpack(received[0])
    assert error["type"] == "error" and error["code"] == "bad_field" and "compression" in error["message"]


def test_a_device_without_zstd_can_read_why_its_hello_was_refused(gateway, pte, prompt):
    raw = FrameCodec(compression="none")
    hello = {**_hello(pte, prompt, ["none"]), "token": "wrong-token"}
    received, close = asyncio.run(_raw(gateway.url, [raw.pack(hello)]))
    assert frame_form(received[0]) == "none"
    assert raw.unpack(received[0])["code"] == "unauthorized"
    # anything that is not a hello is answered in zstd
    received, close = asyncio.run(_raw(gateway.url, [raw.pack({"type": "bye"})]))
    assert frame_form(received[0]) == "zstd" and FrameCodec().unpack(received[0])["type"] == "error"
