"""The sans-I/O protocol: frames, messages, and both state machines driven against
each other in memory (spa/protocol/loopback.py; a fake backbone, gate and side stand in
for the models)."""

import dataclasses
import random
import struct
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa.model.cloud_gate import gate_probability
from spa.protocol import codec
from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol, RunGate, RunSide
from spa.protocol.errors import CODES, PeerError, ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import (MAIN_LINE, CutLine, Draft, DropLine, ForgetStates, ForkLine, GatewayProtocol, Head,
                                  Prefill, ResumeWanted, SendTaps)
from spa.protocol.loopback import DeviceHost, Drafted, GatewayHost, Loopback
from spa.protocol.limits import Limits
from tests.strategies import msgpack_values, mutated

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def code_of(fn, *args) -> str:
    with pytest.raises(ProtocolError) as e:
        fn(*args)
    return e.value.code


# --- frames ------------------------------------------------------------------


def test_frame_round_trip():
    fc = FrameCodec()
    msg = {"type": "x", "b": b"\x00\xff" * 100, "s": "héllo", "n": [1, -2, 3.5, None, True], "m": {"k": 1}}
    data = fc.pack(msg)
    assert zstandard.get_frame_parameters(data).content_size > 0  # stated, as the spec requires
    assert fc.unpack(data) == msg
    assert FrameCodec().unpack(data) == msg  # frames are independent of each other


def _stream_bomb(size: int) -> bytes:
    """A real zstd frame of `size` zero bytes, built without holding them in memory."""
    c = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = bytes(1 << 20)
    parts = [c.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + c.flush()


def _rle_frame(claimed_size: int, block_len: int = 128 * 1024) -> bytes:
    """A hand-made frame: header claiming `claimed_size`, one RLE block of block_len."""
    header = struct.pack("<I", 0xFD2FB528) + bytes([0b11100000]) + struct.pack("<Q", claimed_size)
    block = (1 | (1 << 1) | (block_len << 3)).to_bytes(3, "little") + b"\x00"
    return header + block


@pytest.mark.parametrize(
    "bomb, code",
    [
        (_stream_bomb(64 << 20), "too_large"),  # 64 MiB of zeros in ~2 KB
        (_rle_frame(1 << 40), "too_large"),  # header claims 1 TiB
        (_rle_frame(1000), "bad_frame"),  # claims little, holds more
    ],
)
def test_zstd_bomb_rejected_without_allocating(bomb, code):
    fc = FrameCodec(max_message_bytes=1 << 20)
    tracemalloc.start()
    try:
        assert code_of(fc.unpack, bomb) == code
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20


def test_frame_without_content_size_is_refused():
    data = zstandard.ZstdCompressor(write_content_size=False).compress(msgpack.packb({"type": "bye"}))
    assert code_of(FrameCodec().unpack, data) == "bad_frame"


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "bad_frame"),
        (b"not zstd at all", "bad_frame"),
        ("a text frame", "bad_frame"),
        (FrameCodec().pack({"type": "bye"})[:-2], "bad_frame"),  # truncated
        (FrameCodec().pack({"type": "bye"}) * 2, "bad_frame"),  # two frames
        (zstandard.compress(msgpack.packb([1, 2])), "bad_frame"),  # not a map
        (zstandard.compress(msgpack.packb({1: 2})), "bad_frame"),  # int key
        (zstandard.compress(msgpack.packb({"a": 1}) + b"\x00"), "bad_frame"),  # trailing byte
        (zstandard.compress(b"\xdd\xff\xff\xff\xff"), "bad_frame"),  # array header of 4G items
        (zstandard.compress(b"\x91" * 5000 + b"\xc0"), "bad_frame"),  # nesting too deep
        (zstandard.compress(msgpack.packb(msgpack.Timestamp(1, 0))), "bad_frame"),  # ext type
    ],
)
def test_bad_frames(data, code):
    assert code_of(FrameCodec().unpack, data) == code


def test_oversized_frames():
    fc = FrameCodec(max_frame_bytes=1000, max_message_bytes=5000)
    assert code_of(fc.unpack, fc.pack({"b": np.random.default_rng(0).bytes(2000)})) == "too_large"
    assert code_of(fc.unpack, fc.pack({"b": bytes(6000)})) == "too_large"  # compresses, but too big inside


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data):
    for frame in (data, zstandard.compress(data)):
        try:
            FrameCodec().unpack(frame)
        except ProtocolError as e:
            assert e.code in CODES


# --- messages ----------------------------------------------------------------

H = 16
TAPS = (0, 2, 4)
BACKBONE = m.BackboneInfo("fake-lm", "fp-123", num_layers=4, hidden_size=H)
RNG = np.random.default_rng(7)
F = codec.encode(RNG.normal(0, 15, (1, H)))
T = codec.encode(RNG.normal(0, 15, (len(TAPS), H)))

EXAMPLES = [
    m.Hello(
        token="secret",
        plugin=m.Plugin("fp-123", TAPS, "sha256:abc"),
        prompt="Summarize: ...",
        options=m.Options(window=2, codec="int4", outliers=4, max_new_tokens=50, temperature=0.7, seed=2**40),
    ),
    m.Hello("", m.Plugin("fp", (1,), "h"), "p", m.Options(), resume=m.Resume("s1", "r1")),
    m.Hello("", m.Plugin("fp", (1,), "h"), "p", m.Options(), projection=m.Projection(2, b"\x00" * 8, b"\x01" * 8)),
    m.Ready("s1", "r1", BACKBONE, 12, Limits().to_dict()),
    m.Step(0, 11, F, 42, b"\xc3"),
    m.Accept(0, 11),
    m.NeedTaps(1, 12),
    m.Taps(1, 12, T),
    m.Side(1, 12, F),
    m.Verdict(2, 12, 7, b"\xa9 ", True),
    m.End("eos", {"tokens": 3, "rollbacks": 1, "seconds": 0.5}),
    m.Error("limit", "too many"),
    m.Bye(),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: msg.TYPE)
def test_message_round_trip(msg):
    fc = FrameCodec()
    assert m.parse(fc.unpack(fc.pack(msg.to_dict()))) == msg


HELLO, STEP, VERDICT = EXAMPLES[0].to_dict(), EXAMPLES[4].to_dict(), EXAMPLES[9].to_dict()
OPTIONS, PLUGIN = HELLO["options"], HELLO["plugin"]


@pytest.mark.parametrize(
    "d, code, where",
    [
        ({"epoch": 0, "upto": 1}, "bad_field", "message.type"),
        ({"type": 5}, "bad_field", "message.type"),
        ({"type": "teleport"}, "unknown_type", ""),
        ({"type": "accept", "epoch": 0}, "bad_field", "accept.upto"),
        ({"type": "accept", "epoch": True, "upto": 1}, "bad_field", "accept.epoch"),
        ({"type": "accept", "epoch": -1, "upto": 1}, "bad_field", "accept.epoch"),
        ({"type": "accept", "epoch": 0, "upto": 2**31}, "bad_field", "accept.upto"),
        ({"type": "accept", "epoch": 0, "upto": 1.0}, "bad_field", "accept.upto"),
        ({**STEP, "piece": "text"}, "bad_field", "step.piece"),
        ({**STEP, "f": {**F, "q": b""}}, "bad_field", "step.f"),
        ({**VERDICT, "changed": 1}, "bad_field", "verdict.changed"),
        ({"type": "end", "reason": "tired", "stats": {"tokens": 1}}, "bad_field", "end.reason"),
        ({"type": "end", "reason": "eos", "stats": {"rollbacks": 1}}, "bad_field", "end.stats.tokens"),
        ({"type": "end", "reason": "eos", "stats": {"tokens": float("nan")}}, "bad_field", "end.stats"),
        ({**HELLO, "version": 1, "plugin": None}, "version", ""),  # the old version: a clear error
        ({**HELLO, "options": {**OPTIONS, "codec": "int2"}}, "bad_field", "hello.options.codec"),
        ({**HELLO, "options": {**OPTIONS, "temperature": -1}}, "bad_field", "hello.options.temperature"),
        ({**HELLO, "plugin": {**PLUGIN, "taps": [2, 1]}}, "bad_field", "hello.plugin.taps"),
        ({**HELLO, "resume": {"session": "s"}}, "bad_field", "hello.resume.secret"),
    ],
)
def test_bad_messages(d, code, where):
    with pytest.raises(ProtocolError) as e:
        m.parse(d)
    assert e.value.code == code
    assert e.value.message.startswith(where)


def test_unknown_keys_are_ignored():
    assert m.parse({**m.Accept(0, 3).to_dict(), "future": [1, 2]}) == m.Accept(0, 3)


FIELD_NAMES = sorted({k for ex in EXAMPLES for k in ex.to_dict()} | set(codec.FIELDS))


random_maps = st.tuples(
    st.sampled_from(sorted(m.MESSAGES)), st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_values, max_size=8)
).map(lambda t: {**t[1], "type": t[0]})


@FAST
@given(st.sampled_from(EXAMPLES).flatmap(lambda ex: mutated(ex.to_dict())) | random_maps)
def test_random_maps_only_raise_protocol_errors(d):
    frame = FrameCodec().pack(d)
    for receive in (m.parse, _generating_gateway().receive, _generating_device().receive):
        try:
            receive(FrameCodec().unpack(frame))
        except (ProtocolError, PeerError):
            pass


@FAST
@given(msgpack_values)
def test_random_values_only_raise_protocol_errors(v):
    try:
        m.parse(FrameCodec().unpack(FrameCodec().pack(v)))
    except ProtocolError:
        pass


# --- state machines: unit rules ----------------------------------------------


def _hello(window=0, max_new_tokens=30, token="tok", **kw) -> m.Hello:
    opts = m.Options(window=window, max_new_tokens=max_new_tokens, **kw)
    return m.Hello(token, m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt", opts)


def _generating_gateway(window=2, prompt_tokens=5) -> GatewayProtocol:
    gp = GatewayProtocol(BACKBONE, eos_ids=[0], auth_token="tok")
    gp.receive(_hello(window).to_dict())
    assert isinstance(gp.next_action(), Prefill)
    gp.started("s", "r", prompt_tokens)
    gp.data_to_send()  # ready
    return gp


def _work(gp: GatewayProtocol):
    """The next action that is not bookkeeping (ForgetStates)."""
    while isinstance(action := gp.next_action(), ForgetStates):
        pass
    return action


def _sent(gp: GatewayProtocol) -> dict | None:
    """The one map the last call queued (None if none)."""
    out = gp.data_to_send()
    assert len(out) <= 1, out
    return out[0] if out else None


def _draft(gp: GatewayProtocol, pos: int, token: int, piece=b"x", f=None, taps=None) -> dict | None:
    """Play the host for the Draft at pos; returns the step sent."""
    action = _work(gp)
    assert isinstance(action, Draft) and action.pos == pos and action.epoch == gp.epoch, action
    gp.draft_ready(pos, _f() if f is None else f, token, piece)
    if taps is not None:
        assert _work(gp) == SendTaps(0, pos)
        gp.taps_ready(pos, taps)
    return _sent(gp)


def _generating_device(window=2, prompt_tokens=5) -> DeviceProtocol:
    dp = DeviceProtocol(_hello(window))
    dp.receive(m.Ready("s", "r", BACKBONE, prompt_tokens, {}).to_dict())
    return dp


def _f() -> np.ndarray:
    return RNG.normal(0, 15, (1, H)).astype(np.float32)


RESUME = m.Resume("a", "b")


@pytest.mark.parametrize(
    "gp_kwargs, hello, code",
    [
        ({"auth_token": "tok"}, _hello(token="nope"), "unauthorized"),
        ({}, m.Hello("", m.Plugin("other", TAPS, "h"), "p", m.Options()), "backbone_mismatch"),
        ({}, m.Hello("", m.Plugin(BACKBONE.fingerprint, (0, 5), "h"), "p", m.Options()), "backbone_mismatch"),
        ({"limits": Limits(max_window=4)}, _hello(window=5), "limit"),
        ({"limits": Limits(max_new_tokens=10)}, _hello(max_new_tokens=11), "limit"),
        ({}, m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "p", m.Options(), RESUME), "resume_failed"),
    ],
)
def test_gateway_handshake_refusals(gp_kwargs, hello, code):
    gp = GatewayProtocol(BACKBONE, eos_ids=[0], **gp_kwargs)
    assert code_of(gp.receive, hello.to_dict()) == code


def test_gateway_refuses_long_prompts_and_early_messages():
    gp = GatewayProtocol(BACKBONE, eos_ids=[0], limits=Limits(max_prompt_tokens=8))
    assert code_of(gp.receive, m.Accept(0, 0).to_dict()) == "out_of_order"
    gp.receive(_hello().to_dict())
    assert code_of(gp.receive, _hello().to_dict()) == "out_of_order"
    assert code_of(gp.started, "s", "r", 9) == "limit"


def test_gateway_ordering_rules():
    gp = _generating_gateway(window=2)  # first position 4
    assert gp.can_draft() and gp.next_draft_pos == 4
    assert _work(gp) == Draft(0, 4, None)  # the prefill's states: no token to feed
    gp.draft_ready(4, _f(), 14, b"x")
    assert _sent(gp)["pos"] == 4
    for pos in (5, 6):
        assert _draft(gp, pos, 10 + pos) is not None
    assert not gp.can_draft() and _work(gp) is None  # W + 1 = 3 unverified
    assert code_of(gp.receive, m.Accept(0, 7).to_dict()) == "out_of_order"  # never drafted
    assert code_of(gp.receive, m.Accept(1, 5).to_dict()) == "out_of_order"  # future epoch
    assert code_of(gp.receive, m.Side(0, 5, F).to_dict()) == "out_of_order"  # not asked
    assert code_of(gp.receive, m.Step(0, 4, F, 1, b"").to_dict()) == "unknown_type"  # wrong way
    gp.receive(m.Accept(0, 4).to_dict())
    assert gp.verified == 5 and gp.next_action() == ForgetStates(0, 4)
    assert code_of(gp.receive, m.Accept(0, 4).to_dict()) == "out_of_order"  # already verified
    gp.receive(m.NeedTaps(0, 6).to_dict())  # accepts 5 too
    assert _work(gp) == SendTaps(0, 6)
    assert gp.verified == 6 and gp.drafted == [(6, 16)]
    assert code_of(gp.receive, m.Accept(0, 6).to_dict()) == "out_of_order"  # 6 awaits its side
    assert code_of(gp.receive, m.Side(0, 6, F).to_dict()) == "out_of_order"  # taps not sent yet
    gp.taps_ready(6, RNG.normal(0, 15, (3, H)))
    assert _sent(gp)["type"] == "taps"
    wrong = codec.encode(np.zeros((1, H + 1), np.float32))
    assert code_of(gp.receive, m.Side(0, 6, wrong).to_dict()) == "bad_field"
    # A draft is computed (7) while the side arrives: the side waits for the draft.
    assert _work(gp) == Draft(0, 7, 16)
    gp.receive(m.Side(0, 6, F).to_dict())
    assert gp.next_action() is None  # nothing moves under the draft
    gp.draft_ready(7, _f(), 5, b"z")
    assert _sent(gp)["type"] == "step"
    head = _work(gp)
    assert isinstance(head, Head) and head.pos == 6 and head.s.shape == (H,)
    gp.verdict_ready(6, 99, b"y")
    assert _sent(gp)["changed"] is True and gp.epoch == 1
    assert gp.stats.discarded == 1 and gp.drafted == []  # the draft of 7 was built on the old token
    assert _work(gp) == CutLine(0, 7)  # before any further draft
    assert gp.next_draft_pos == 7 and _work(gp) == Draft(1, 7, 99)
    with pytest.raises(RuntimeError):
        gp.draft_ready(9, _f(), 5, b"z")  # caller bug: a position not asked for
    gp.draft_ready(7, _f(), 5, b"z")
    assert _sent(gp)["epoch"] == 1
    gp.receive(m.Bye().to_dict())
    assert gp.closing and gp.phase == "ended"


def test_gateway_ends_on_eos_and_max_tokens():
    gp = _generating_gateway(window=3)
    _draft(gp, 4, 3, b"a")
    _draft(gp, 5, 0, b"")  # EOS: no drafting past it
    assert not gp.can_draft()
    gp.receive(m.Accept(0, 5).to_dict())
    assert gp.finish_reason == "eos" and gp.closing
    assert m.parse(_sent(gp)) == m.End("eos", {**gp.stats.to_dict(), "tokens": 2})
    assert code_of(gp.receive, m.Accept(0, 5).to_dict()) == "out_of_order"

    gp = GatewayProtocol(BACKBONE, eos_ids=[0])
    gp.receive(_hello(window=8, max_new_tokens=2).to_dict())
    assert isinstance(gp.next_action(), Prefill)
    gp.started("s", "r", 1)
    gp.data_to_send()
    _draft(gp, 0, 3, b"a")
    _draft(gp, 1, 4, b"b")
    assert not gp.can_draft()
    gp.receive(m.Accept(0, 1).to_dict())
    assert gp.finish_reason == "max_tokens"


def test_device_ordering_rules():
    dp = _generating_device(window=1)  # first position 4
    step = lambda epoch, pos, draft=3: m.Step(epoch, pos, F, draft, b"a").to_dict()  # noqa: E731
    assert code_of(dp.receive, step(0, 5)) == "out_of_order"  # gap
    assert code_of(dp.receive, step(1, 4)) == "out_of_order"  # wrong epoch
    dp.receive(step(0, 4))
    dp.receive(step(0, 5))
    assert code_of(dp.receive, step(0, 6)) == "out_of_order"  # beyond W + 1
    assert isinstance(dp.next_action(), RunGate)
    dp.gated(4, True)
    assert dp.next_action() is None
    assert dp.flush() == [m.NeedTaps(0, 4).to_dict()]
    assert code_of(dp.receive, m.Verdict(0, 4, 3, b"a", False).to_dict()) == "out_of_order"  # no side yet
    assert code_of(dp.receive, m.Taps(0, 4, F).to_dict()) == "bad_field"  # 1 row, 3 taps
    dp.receive(m.Taps(0, 4, T).to_dict())
    action = dp.next_action()
    assert isinstance(action, RunSide) and action.taps.shape == (3, H)
    dp.side_output(4, _f())
    assert dp.flush()[0]["type"] == "side"
    assert code_of(dp.receive, m.Verdict(0, 4, 9, b"b", False).to_dict()) == "out_of_order"  # changed lies
    assert code_of(dp.receive, m.Verdict(0, 4, 9, b"b", True).to_dict()) == "out_of_order"  # epoch not bumped
    dp.receive(m.Verdict(1, 4, 9, b"b", True).to_dict())
    assert (dp.stats.rollbacks, dp.stats.dropped, dp.epoch) == (1, 1, 1)  # step 5 was void
    assert code_of(dp.receive, step(0, 5)) == "out_of_order"  # old epoch after the verdict
    dp.receive(step(1, 5, draft=0))
    dp.gated(5, False)
    assert dp.flush() == [m.Accept(1, 5).to_dict()]
    assert code_of(dp.receive, m.End("eos", {"tokens": 3}).to_dict()) == "out_of_order"  # 2 committed
    dp.receive(m.End("eos", {"tokens": 2}).to_dict())
    assert dp.ended and [c.token for c in dp.committed] == [9, 0] and dp.text() == "ba"
    with pytest.raises(PeerError):
        _generating_device().receive(m.Error("internal", "boom").to_dict())


R = 2  # rank of the test projection


def _projection(weight=None, bias=None) -> m.Projection:
    weight = RNG.normal(0, 0.1, (len(TAPS), R, H)) if weight is None else weight
    bias = RNG.normal(0, 0.1, (len(TAPS), R)) if bias is None else bias
    return m.Projection(R, np.asarray(weight, "<f2").tobytes(), np.asarray(bias, "<f4").tobytes())


@pytest.mark.parametrize("projection, why", [
    (_projection(weight=np.zeros((len(TAPS), R, H + 1))), "hello.projection.weight: 204 bytes, expected 192"),
    (_projection(bias=np.zeros((len(TAPS), R + 1))), "hello.projection.bias: 36 bytes, expected 24"),
    (_projection(weight=np.full((len(TAPS), R, H), np.inf)), "hello.projection.weight: non-finite values"),
    (_projection(bias=np.full((len(TAPS), R), np.nan)), "hello.projection.bias: non-finite values"),
])
def test_gateway_refuses_a_malformed_projection(projection, why):
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "p", m.Options(), projection=projection)
    with pytest.raises(ProtocolError) as exc:
        GatewayProtocol(BACKBONE, eos_ids=[0]).receive(hello.to_dict())
    assert exc.value.code == "bad_field" and exc.value.message.startswith(why)


def test_projected_taps_travel_as_r_columns_and_the_device_runs_side_projected():
    proj = _projection()
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "p", m.Options(), projection=proj)
    gp = GatewayProtocol(BACKBONE, eos_ids=[0])
    gp.receive(hello.to_dict())
    weight, bias = gp.projection
    assert weight.dtype == np.float32 and weight.shape == (len(TAPS), R, H) and bias.shape == (len(TAPS), R)
    assert np.array_equal(weight, np.frombuffer(proj.weight, "<f2").reshape(weight.shape))  # exact widening
    assert isinstance(gp.next_action(), Prefill)
    gp.started("s", "r", 5)
    gp.data_to_send()
    _draft(gp, 4, 3, b"a")
    gp.receive(m.NeedTaps(0, 4).to_dict())
    assert _work(gp) == SendTaps(0, 4)
    with pytest.raises(RuntimeError):  # unprojected taps are a caller bug once a projection was uploaded
        gp.taps_ready(4, RNG.normal(0, 15, (len(TAPS), H)).astype(np.float32))
    gp.taps_ready(4, RNG.normal(0, 1, (len(TAPS), R)).astype(np.float32))
    taps = _sent(gp)

    dp = DeviceProtocol(hello)
    dp.receive(m.Ready("s", "r", BACKBONE, 5, {}).to_dict())
    dp.receive(m.Step(0, 4, F, 3, b"a").to_dict())
    dp.gated(4, True)
    assert code_of(dp.receive, m.Taps(0, 4, T).to_dict()) == "bad_field"  # H columns where r were agreed
    dp.receive(taps)
    action = dp.next_action()
    assert isinstance(action, RunSide) and action.projected and action.taps.shape == (len(TAPS), R)
    # A resume hello uploads the weights again (a replica that does not hold the session rebuilds it with them).
    assert dp.resume_hello()["projection"] == proj.to_dict()


_GATE_WEIGHT = RNG.normal(0, 1, (2, H)).astype("<f4")


def _gate_upload(weight_shape=(2, H)) -> m.GateUpload:
    weight = _GATE_WEIGHT if weight_shape == (2, H) else RNG.normal(0, 1, weight_shape).astype("<f4")
    return m.GateUpload(weight.tobytes(), np.zeros(2, "<f4").tobytes(), 0.5)


def _f_gated(sigma: bool) -> np.ndarray:
    """An f on which the uploaded gate is sure: p near 1 (sigma) or near 0."""
    direction = (_GATE_WEIGHT[1] - _GATE_WEIGHT[0])[None]
    return (direction if sigma else -direction) * 30.0


def test_gateway_refuses_a_malformed_gate():
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "p", m.Options(), gate=_gate_upload((2, H + 1)))
    with pytest.raises(ProtocolError) as exc:
        GatewayProtocol(BACKBONE, eos_ids=[0]).receive(hello.to_dict())
    assert exc.value.code == "bad_field" and exc.value.message.startswith("hello.gate.weight: 136 bytes")


def test_pushed_taps_save_the_need_taps_round_trip():
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "p", m.Options(window=2), gate=_gate_upload())
    gp, dp = GatewayProtocol(BACKBONE, eos_ids=[0], predict_gate=gate_probability), DeviceProtocol(hello)
    gp.receive(hello.to_dict())
    assert gp.uploads.gate.weight.shape == (2, H) and gp.uploads.gate.tau == 0.5
    assert isinstance(gp.next_action(), Prefill)
    gp.started("s", "r", 5)
    dp.receive(_sent(gp))
    taps = RNG.normal(0, 15, (len(TAPS), H)).astype(np.float32)
    step = _draft(gp, 4, 3, b"a", f=_f_gated(False))  # predicted closed: no taps
    assert "taps" not in step
    dp.receive(step)
    dp.receive(_draft(gp, 5, 7, b"b", f=_f_gated(True), taps=taps))  # predicted open: taps pushed
    assert gp.stats.pushed == 1 and gp.pushed == {5}
    dp.gated(4, False)
    assert isinstance(dp.next_action(), RunGate)
    dp.gated(5, True)
    action = dp.next_action()
    assert isinstance(action, RunSide) and action.pos == 5 and action.taps.shape == (len(TAPS), H)
    assert dp.flush() == []  # no accept (the side implies it) and no need_taps
    dp.side_output(5, _f())
    (side,) = dp.flush()
    assert side["type"] == "side" and dp.stats.pushed_used == 1
    gp.receive(side)
    assert isinstance(_work(gp), Head) and gp.verified == 5 and gp.stats.pushed_used == 1
    gp.verdict_ready(5, 7, b"b")
    dp.receive(_sent(gp))
    assert [c.token for c in dp.committed] == [3, 7]
    # Unasked-for pushed taps are a protocol error on the device.
    plain = _generating_device()
    assert code_of(plain.receive, m.Step(0, 4, F, 3, b"a", T).to_dict()) == "out_of_order"
    # A side for a position whose taps were neither pushed nor asked for is out of order.
    gp2 = _generating_gateway()
    _draft(gp2, 4, 3, b"a")
    assert code_of(gp2.receive, m.Side(0, 4, F).to_dict()) == "out_of_order"


def test_device_rejects_other_backbone():
    dp = DeviceProtocol(_hello())
    other = m.BackboneInfo("x", "other-fp", 4, H)
    assert code_of(dp.receive, m.Ready("s", "r", other, 5, {}).to_dict()) == "backbone_mismatch"


# --- state machines against each other ----------------------------------------

VOCAB, EOS, PROMPT = 64, 0, [5, 9, 2, 33, 17]


def fake_backbone(seq: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(f_t, T_t, draft) for the last position of seq: a pure function of seq."""
    h = zlib.crc32(np.array(seq, np.int32).tobytes())
    rng = np.random.default_rng(h)
    f = rng.normal(0, 15, (1, H)).astype(np.float32)
    f[0, 3] = 2000.0  # an outlier channel, as in real states
    taps = rng.normal(0, 15, (len(TAPS), H)).astype(np.float32)
    draft = EOS if h % 40 == 0 else 1 + h % (VOCAB - 1)
    return f, taps, draft


def fake_alternatives(seq: list[int], draft: int, k: int) -> tuple[int, ...]:
    """The backbone's runners-up after `draft`: with the side's token (a branch hit when the side
    changes it) at most positions, without it at others (a miss), EOS first at a few."""
    h = zlib.crc32(np.array(seq, np.int32).tobytes())
    changed, others = 1 + (draft + 6) % (VOCAB - 1), [1 + (draft + 20) % (VOCAB - 1), 1 + (draft + 33) % (VOCAB - 1)]
    alternatives = others if h % 3 == 0 else [EOS, changed] if h % 7 == 0 else [changed, *others]
    return tuple(a for a in alternatives if a != draft)[:k]


def fake_gate(f: np.ndarray) -> bool:
    return bool(f[0, 0] > 8.0)


def fake_side(taps: np.ndarray) -> np.ndarray:
    return taps[:1] * 0.5


def fake_combine(f: np.ndarray, s: np.ndarray, draft: int) -> int:
    """The side-corrected token: a different one about half the time."""
    return draft if (f + s)[0, 1] < 0 else 1 + (draft + 6) % (VOCAB - 1)


def piece(token: int) -> bytes:
    return "aé€😀"[token % 4].encode()[: 1 + token % 3]  # partial UTF-8 on purpose


def lock_step_reference(opts: m.Options, prompt: list[int]) -> list[int]:
    """The semantics, with no protocol: what every window must commit."""
    q = lambda x: codec.quantize(x, opts.codec, opts.outliers)  # noqa: E731
    seq, out = list(prompt), []
    while len(out) < opts.max_new_tokens and (not out or out[-1] != EOS):
        f, taps, draft = fake_backbone(seq)
        token = fake_combine(f, q(fake_side(q(taps))), draft) if fake_gate(q(f)) else draft
        seq.append(token)
        out.append(token)
    return out


class FakeModel:
    """The fake backbone as the gateway host's model (spa/protocol/loopback.py): each line's
    token sequence stands for its KV cache."""

    def __init__(self, prompt: list[int], branches: int = 0):
        self.prompt, self.branches = list(prompt), branches
        self.lines: dict[int, list[int]] = {}
        self.forked_at: dict[int, int] = {}  # branch line -> its fork's keep

    def prefill(self) -> int:
        self.lines[MAIN_LINE] = list(self.prompt)
        return len(self.prompt)

    def draft(self, line: int, pos: int, feed) -> Drafted:
        seq = self.lines.get(line, list(self.prompt))  # a dropped line: any answer (it is stale)
        if feed is not None:
            seq.append(feed)
        if line in self.lines:
            assert len(seq) == pos + 1
        f, _, draft = fake_backbone(seq)
        return Drafted(f, draft, piece(draft), fake_alternatives(seq, draft, self.branches))

    def taps(self, line: int, pos: int) -> np.ndarray:
        return fake_backbone(self.lines[line][: pos + 1])[1]

    def head(self, line: int, pos: int, s: np.ndarray) -> tuple[int, bytes]:
        f, _, draft = fake_backbone(self.lines[line][: pos + 1])
        token = fake_combine(f, s[None], draft)
        return token, piece(token)

    def fork(self, line: int, parent: int, keep: int) -> None:
        self.lines[line] = self.lines[parent][:keep]
        self.forked_at[line] = keep

    def cut(self, line: int, keep: int) -> None:
        del self.lines[line][keep:]

    def drop(self, line: int) -> None:
        del self.lines[line]

    def forget(self, line: int, upto: int) -> None:
        pass


def fake_pair(hello: m.Hello, prompt: list[int], max_in_flight: int = 1, branches: int = 0,
              resumable: bool = False) -> Loopback:
    gateway = GatewayHost(GatewayProtocol(BACKBONE, eos_ids=[EOS], branches=branches, resumable=resumable),
                          FakeModel(prompt, branches))
    device = DeviceHost(DeviceProtocol(hello, max_in_flight), lambda pos, f, margin: fake_gate(f),
                        lambda pos, taps, projected: fake_side(taps))
    return Loopback(gateway, device)


def simulate(opts: m.Options, prompt: list[int], seed: int, max_in_flight: int = 1,
             branches: int = 0) -> Loopback:
    """Both sides over two in-order queues, interleaved at random."""
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt", opts)
    pair = fake_pair(hello, prompt, max_in_flight, branches)
    pair.run(random.Random(seed), max_moves=100_000)
    return pair


def test_fake_world_is_interesting():
    """The fake data has sigma = 1 positions whose side output changes the token."""
    opts = m.Options(max_new_tokens=40)
    seq, changes = list(PROMPT), 0
    for token in lock_step_reference(opts, PROMPT):
        f, taps, draft = fake_backbone(seq)
        changes += token != draft
        seq.append(token)
    assert changes >= 3


@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("window", [0, 2, 8])
@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_draft_ahead_commits_exactly_the_lock_step_tokens(window, codec_name, in_flight):
    totals = {"rollbacks": 0, "dropped": 0, "max_in_flight": 0, "stale": 0}
    reasons = set()
    for seed in range(6):
        opts = m.Options(window=window, codec=codec_name, outliers=2, max_new_tokens=40)
        prompt = PROMPT + [seed]  # some end on EOS, some run to max_new_tokens
        pair = simulate(opts, prompt, seed, in_flight)
        gp, dev = pair.gateway.proto, pair.device
        assert [c.token for c in dev.proto.committed] == lock_step_reference(opts, prompt), f"seed {seed}"
        assert [c.pos for c in dev.proto.committed] == list(range(len(prompt) - 1, gp.verified))
        assert dev.proto.end.stats["tokens"] == len(dev.proto.committed)
        assert dev.proto.end.stats["rollbacks"] == dev.proto.stats.rollbacks
        assert dev.proto.end.stats["discarded"] == dev.proto.stats.dropped
        reasons.add(dev.proto.end.reason)
        totals["rollbacks"] += dev.proto.stats.rollbacks
        totals["dropped"] += dev.proto.stats.dropped
        totals["max_in_flight"] = max(totals["max_in_flight"], dev.proto.stats.max_in_flight)
        totals["stale"] += dev.proto.end.stats["stale"]
    assert totals["rollbacks"] > 0
    assert (totals["dropped"] > 0) == (window > 0)  # rollbacks void drafts only when drafting ahead
    assert reasons == {"eos", "max_tokens"}
    # Several side outputs in flight need drafts to gate ahead of the verdicts.
    assert (totals["max_in_flight"] > 1) == (in_flight > 1 and window > 0), totals
    if in_flight > 1 and window >= 8:  # decisions sent before a rollback reached the gateway after it
        assert totals["stale"] > 0, totals


def test_a_draft_computed_across_a_rollback_is_dropped():
    """A host may start a draft while a verdict is computed (the protocol
    allows it); if that verdict rolls back, the draft is stale and never sent."""
    gp = _generating_gateway(window=4)
    _draft(gp, 4, 3, b"a")
    _draft(gp, 5, 4, b"b")
    gp.receive(m.NeedTaps(0, 4).to_dict())
    assert _work(gp) == SendTaps(0, 4)
    gp.taps_ready(4, RNG.normal(0, 15, (3, H)))
    assert _sent(gp)["type"] == "taps"
    gp.receive(m.Side(0, 4, F).to_dict())
    head = gp.next_action()
    assert isinstance(head, Head) and head.pos == 4
    draft = gp.next_action()  # the host drafts 6 while it computes the head of 4
    assert draft == Draft(0, 6, 4)
    gp.verdict_ready(4, 9, b"z")  # changed: epoch 1, drafts after 4 void
    assert _sent(gp)["changed"] is True and gp.epoch == 1
    gp.draft_ready(6, _f(), 7, b"s")  # stale: dropped
    assert gp.data_to_send() == [] and gp.drafted == []
    assert _work(gp) == CutLine(0, 5)
    assert _work(gp) == Draft(1, 5, 9)


def test_a_side_output_voided_by_a_change_to_eos_is_dropped():
    """Side outputs in flight: the device sent side(5) before the verdict of 4 reached it; that
    verdict changed 4 to EOS, which ends the generation. side(5) arrives in the old epoch: it is
    dropped (stale, G8) and `end` goes out, not an out_of_order error."""
    gp = _generating_gateway(window=4)
    _draft(gp, 4, 3, b"a")
    _draft(gp, 5, 4, b"b")
    for pos in (4, 5):
        gp.receive(m.NeedTaps(0, pos).to_dict())
        assert _work(gp) == SendTaps(0, pos)
        gp.taps_ready(pos, RNG.normal(0, 15, (3, H)))
        assert _sent(gp)["type"] == "taps"
    gp.receive(m.Side(0, 4, F).to_dict())
    head = _work(gp)
    assert isinstance(head, Head) and head.pos == 4
    gp.verdict_ready(4, 0, b"")  # changed to EOS (eos_ids=[0]): epoch 1, the generation ends
    assert gp.finish_reason == "eos" and gp.epoch == 1
    gp.receive(m.Side(0, 5, F).to_dict())  # sent before the device knew: stale
    assert gp.stats.stale == 1
    while gp.next_action() is not None:  # the line work of the change
        pass
    assert [d["type"] for d in gp.data_to_send()][-1] == "end"


# --- branch drafting ----------------------------------------------------------


@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("window", [0, 2, 8])
def test_branch_drafting_commits_exactly_the_lock_step_tokens(window, in_flight):
    """With K = 2 branch lines the device sees the same tokens; the branches
    really ran (rounds of several drafts), were adopted (hits: the verdict's
    token among the runners-up), missed, and were dropped."""
    totals = dict.fromkeys(("branch_points", "branch_hits", "branch_misses", "branch_drafts", "branch_wasted",
                            "rollbacks"), 0)
    widest = 0
    for seed in range(6):
        opts = m.Options(window=window, codec="int8", outliers=2, max_new_tokens=40)
        prompt = PROMPT + [seed]
        pair = simulate(opts, prompt, seed, in_flight, branches=2)
        dev = pair.device
        assert [c.token for c in dev.proto.committed] == lock_step_reference(opts, prompt), f"seed {seed}"
        stats = dev.proto.end.stats
        assert stats["rollbacks"] == dev.proto.stats.rollbacks
        assert stats["branch_hits"] + stats["branch_misses"] <= stats["rollbacks"]
        assert stats["branch_wasted"] <= stats["branch_drafts"]
        for key in totals:
            totals[key] += stats[key]
        widest = max(widest, *pair.gateway.rounds)
    assert totals["branch_hits"] > 0 and totals["branch_misses"] > 0, totals
    assert totals["branch_wasted"] > 0, totals
    # The main draft and two branch drafts handed out as one round (lock-step: the main line waits).
    assert widest == (3 if window > 0 else 2), widest


def _branching_gateway(window=2, branches=2, resumable=False):
    """A generating gateway with drafts at 4 and 5 (runners-up (8, 9) at 4) and need_taps(4) received."""
    gp = GatewayProtocol(BACKBONE, eos_ids=[0], auth_token="tok", branches=branches, resumable=resumable)
    gp.receive(_hello(window).to_dict())
    assert isinstance(gp.next_action(), Prefill)
    gp.started("s", "r", 5)
    gp.data_to_send()
    assert _work(gp) == Draft(0, 4, None)
    gp.draft_ready(4, _f(), 3, b"a", (8, 9))
    assert _work(gp) == Draft(0, 5, 3)
    gp.draft_ready(5, _f(), 4, b"b", (10, 11))
    assert [s["pos"] for s in gp.data_to_send()] == [4, 5]
    gp.receive(m.NeedTaps(0, 4).to_dict())
    assert _work(gp) == SendTaps(0, 4)
    gp.taps_ready(4, RNG.normal(0, 15, (3, H)))
    assert _sent(gp)["type"] == "taps"
    return gp


def _branch_round(gp, main=None):
    """Fork the two branch lines of position 4 and hand out a round; returns its drafts."""
    assert _work(gp) == ForkLine(1, 0, 5) and _work(gp) == ForkLine(2, 0, 5)
    round_ = [gp.next_action() for _ in range(3 if main else 2)]
    assert round_ == ([main] if main else []) + [Draft(0, 5, 8, 1), Draft(0, 5, 9, 2)]
    assert gp.next_action() is None  # nothing more until the round is reported
    return round_


def test_a_branch_hit_streams_the_branch_drafts_at_once():
    gp = _branching_gateway(window=2)
    _branch_round(gp, main=Draft(0, 6, 4))
    gp.draft_ready(6, _f(), 5, b"c", (1, 2))
    gp.draft_ready(5, _f(), 20, b"p", (21, 22), line=1)
    gp.receive(m.Side(0, 4, F).to_dict())  # waits: the round is not reported yet
    assert [s["pos"] for s in gp.data_to_send()] == [6]  # the main line's step only
    gp.draft_ready(5, _f(), 30, b"q", (31, 32), line=2)
    assert gp.data_to_send() == []  # branch drafts are not sent
    # Second round: both branch lines go on (the main line holds W + 1 = 3 unverified).
    head = _work(gp)
    assert isinstance(head, Head) and head.pos == 4
    assert [gp.next_action() for _ in range(2)] == [Draft(0, 6, 20, 1), Draft(0, 6, 30, 2)]
    gp.draft_ready(6, _f(), 23, b"r", (), line=1)
    gp.draft_ready(6, _f(), 33, b"s", (), line=2)
    gp.verdict_ready(4, 9, b"z")  # the second runner-up: branch 2 is adopted
    verdict, *steps = gp.data_to_send()
    assert verdict["type"] == "verdict" and verdict["changed"] and verdict["epoch"] == 1
    assert [(s["epoch"], s["pos"], s["draft"], s["piece"]) for s in steps] == [(1, 5, 30, b"q"), (1, 6, 33, b"s")]
    assert gp.drafted == [(5, 30), (6, 33)] and gp.next_draft_pos == 7
    # No CutLine: line 2's cache is the main line's now; line 1 and the old main line are dropped.
    assert _work(gp) == DropLine(1) and _work(gp) == DropLine(0) and gp.main == 2
    assert _work(gp) == Draft(1, 7, 33, 2)  # drafting goes on from the branch's last token
    st = gp.stats
    assert (st.branch_points, st.branch_hits, st.branch_misses, st.rollbacks) == (1, 1, 0, 1)
    assert st.branch_drafts == 4 and st.branch_wasted == 2  # branch 1's two drafts
    assert st.discarded == 2  # the main line's 5 and 6


def test_a_branch_miss_rolls_back_and_discards_the_branches():
    gp = _branching_gateway(window=2)
    _branch_round(gp, main=Draft(0, 6, 4))
    gp.draft_ready(6, _f(), 5, b"c")
    gp.draft_ready(5, _f(), 20, b"p", line=1)
    gp.draft_ready(5, _f(), 30, b"q", line=2)
    gp.data_to_send()
    gp.receive(m.Side(0, 4, F).to_dict())
    assert isinstance(_work(gp), Head)
    gp.verdict_ready(4, 13, b"z")  # changed, to a token no branch drafted
    assert [d["type"] for d in gp.data_to_send()] == ["verdict"]
    assert _work(gp) == DropLine(1) and _work(gp) == DropLine(2) and _work(gp) == CutLine(0, 5)
    assert _work(gp) == Draft(1, 5, 13)
    st = gp.stats
    assert (st.branch_hits, st.branch_misses, st.branch_drafts, st.branch_wasted) == (0, 1, 2, 2)


def test_an_unchanged_verdict_discards_the_branches():
    gp = _branching_gateway(window=2)
    _branch_round(gp, main=Draft(0, 6, 4))
    for branch, token in ((0, 5), (1, 20), (2, 30)):
        gp.draft_ready(6 if branch == 0 else 5, _f(), token, b"x", line=branch)
    gp.data_to_send()
    gp.receive(m.Side(0, 4, F).to_dict())
    assert isinstance(_work(gp), Head)
    gp.verdict_ready(4, 3, b"a")  # the draft: nothing changes
    assert _sent(gp)["changed"] is False and gp.epoch == 0
    assert _work(gp) == DropLine(1) and _work(gp) == DropLine(2)
    st = gp.stats
    assert (st.branch_hits, st.branch_misses, st.branch_wasted) == (0, 0, 2)


def _two_sides_in_flight() -> GatewayProtocol:
    """A gateway with branches=1 that drafted 4..7 (runner-up 40 + pos each) and sent the taps
    of 4 and 6: two side outputs in flight, none received yet."""
    gp = GatewayProtocol(BACKBONE, eos_ids=[0], auth_token="tok", branches=1)
    gp.receive(_hello(3).to_dict())
    gp.next_action()
    gp.started("s", "r", 5)
    gp.data_to_send()
    for pos in (4, 5, 6, 7):
        assert _work(gp) == Draft(0, pos, None if pos == 4 else pos - 1)
        gp.draft_ready(pos, _f(), pos, b"x", (40 + pos,))
    for pos in (4, 6):
        gp.receive(m.NeedTaps(0, pos).to_dict())
        assert _work(gp) == SendTaps(0, pos)
        gp.taps_ready(pos, RNG.normal(0, 15, (3, H)))
    gp.data_to_send()
    return gp


def test_a_rollback_before_the_branch_point_discards_the_branches():
    """In flight: 4 and 6 are sigma = 1; the branches are drafted for 4 first,
    then (4 unchanged) for 6; a changed verdict at 4 in another run drops them."""
    gp = _two_sides_in_flight()
    assert _work(gp) == ForkLine(1, 0, 5)  # the earliest pending side position
    assert gp.next_action() == Draft(0, 5, 44, 1)
    gp.draft_ready(5, _f(), 50, b"y", line=1)
    gp.receive(m.Side(0, 6, F).to_dict())  # kept until 4 is verified
    gp.receive(m.Side(0, 4, F).to_dict())
    assert isinstance(_work(gp), Head)
    gp.verdict_ready(4, 4, b"x")  # unchanged: branch 1 dropped, 5 decided sigma = 0, then 6 is verified
    assert _work(gp) == DropLine(1)
    head = _work(gp)
    assert isinstance(head, Head) and head.pos == 6  # 6's side output is here: its verdict is computed, no branch
    gp.verdict_ready(6, 77, b"w")  # changed, no branch: an ordinary rollback
    assert _work(gp) == CutLine(0, 7)
    assert (gp.stats.branch_points, gp.stats.branch_hits, gp.stats.branch_misses) == (1, 0, 0)
    # A rollback at an earlier position than the branch point drops the branches too.
    gp = _two_sides_in_flight()
    gp.receive(m.Side(0, 4, F).to_dict())  # 4's verdict is being computed: the branches go to 6
    assert isinstance(_work(gp), Head)
    assert _work(gp) == ForkLine(1, 0, 7)
    assert gp.next_action() == Draft(0, 7, 46, 1)
    gp.draft_ready(7, _f(), 60, b"y", line=1)
    gp.verdict_ready(4, 99, b"z")  # changed before the branch point: its branches are void
    assert _work(gp) == DropLine(1) and _work(gp) == CutLine(0, 5)
    assert gp.stats.branch_wasted == 1 and gp.stats.branch_misses == 0
    assert _work(gp) == Draft(1, 5, 99)  # no branch until a side position is pending again
    assert _work(gp) is None


def test_branches_are_dropped_on_resume():
    gp = _branching_gateway(window=2, resumable=True)
    _branch_round(gp, main=Draft(0, 6, 4))
    for branch, token in ((0, 5), (1, 20), (2, 30)):
        gp.draft_ready(6 if branch == 0 else 5, _f(), token, b"x", line=branch)
    gp.resume(4, "new")
    assert [d["type"] for d in gp.data_to_send()] == ["resumed", "step", "step", "step"]
    assert {DropLine(1), DropLine(2)} <= set(gp.next_action() for _ in range(4))
    assert gp.stats.branch_wasted == 2


def _branch_point_open(pair: Loopback) -> bool:
    """The protocol holds branch lines, the host forked them, and every one has drafts of its own."""
    lines = pair.gateway.proto.branching.lines
    return bool(lines) and all(b.line in pair.gateway.model.lines and b.drafts for b in lines.values())


def _branch_drafts_held(pair: Loopback) -> int:
    """The drafts the protocol's open branch lines hold (their 'KV caches' agree)."""
    model, held = pair.gateway.model, 0
    for b in pair.gateway.proto.branching.lines.values():
        assert len(model.lines[b.line]) - model.forked_at[b.line] == len(b.drafts)
        held += len(b.drafts)
    return held


def _resume(pair: Loopback) -> None:
    """The device resumes on a new connection; what the gateway sends on it goes down."""
    fresh = GatewayProtocol(BACKBONE, eos_ids=[EOS], resumable=True)
    fresh.receive(pair.device.proto.resume_hello())
    wanted = fresh.next_action()
    assert isinstance(wanted, ResumeWanted)
    gp = pair.gateway.proto
    gp.check_resume(wanted.hello)
    gp.resume(wanted.hello.resume.next, "secret-2")
    pair.gateway.work()
    pair.gateway_sends()


@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("window", [0, 2, 8])
def test_a_resume_with_branches_alive_discards_them_and_commits_the_lock_step_tokens(window, in_flight):
    """The link dies while a branch point is open (branch lines forked, their
    drafts computed); the device resumes. The branch lines are dropped (their
    drafts counted wasted), no committed token is lost or repeated, and the
    session ends with exactly the lock-step tokens. With several side outputs in
    flight, some sessions are cut while a verdict (of a position before the
    branch point) is on its way: `resumed` brings it."""
    cuts, lost_verdicts = 0, 0
    for seed in range(8):
        opts = m.Options(window=window, codec="int8", outliers=2, max_new_tokens=40)
        prompt = PROMPT + [seed]
        hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt", opts)
        pair = fake_pair(hello, prompt, in_flight, branches=2, resumable=True)
        gw, dev, model = pair.gateway, pair.device.proto, pair.gateway.model
        rng, before = random.Random(seed), None
        lose_a_verdict = in_flight > 1 and window > 0 and seed % 2 == 0  # cut as a verdict goes down, if ever
        for _ in range(100_000):
            if dev.ended:
                break
            if before is None and _branch_point_open(pair):
                coin = rng.random() < 0.5
                verdict_on_its_way = any(d["type"] == "verdict" for d in pair.down)
                cut = verdict_on_its_way if lose_a_verdict else coin
            else:
                cut = False
            if cut:
                # The link dies: what is in flight either way is lost. The host reports the
                # drafts it was computing (as cloud_gateway does) and runs nothing else.
                before = [(c.pos, c.token) for c in dev.committed]
                pair.down.clear()
                pair.up.clear()
                gw.proto.connection_lost()
                while gw.busy:
                    gw.finish(then_work=False)
                held = _branch_drafts_held(pair)
                wasted = gw.proto.stats.branch_wasted
                assert held > 0 and gw.proto.stats.resumes == 0
                _resume(pair)
                resumed = pair.down[0]
                assert resumed["type"] == "resumed" and bool(resumed.get("commits")) == verdict_on_its_way
                lost_verdicts += verdict_on_its_way
                # The branch lines are gone, and every draft they held is wasted.
                assert set(model.lines) == {gw.proto.main}
                assert gw.proto.stats.branch_wasted == wasted + held
                assert gw.proto.stats.resumes == 1
                continue
            # (a resuming device sends nothing before `resumed`: what it held back is void)
            rng.choice(pair.moves(device_may_send=dev.phase != "resuming"))()
        else:
            raise AssertionError("the simulation stalled")
        committed = [(c.pos, c.token) for c in dev.committed]
        assert [t for _, t in committed] == lock_step_reference(opts, prompt), f"seed {seed}"
        # Nothing lost, nothing repeated: one commit per position, in order, and the
        # commits made before the cut are where they were.
        assert [p for p, _ in committed] == list(range(len(prompt) - 1, gw.proto.verified)), f"seed {seed}"
        assert dev.end.stats["tokens"] == len(committed)
        if before is not None:
            cuts += 1
            assert committed[: len(before)] == before
            assert dev.stats.resumes == 1 and dev.end.stats["resumes"] == 1
    assert cuts >= 3, cuts
    if in_flight > 1 and window == 8:
        assert lost_verdicts > 0


# --- settlement: the device proves its side tokens (version 3) ------------------------------------


def _settling_pair(opts: m.Options, prompt: list[int], max_in_flight: int, branches: int) -> Loopback:
    """The fake world with settlement: the gateway sends exact f with taps and streams its branch
    lines; the device's 'proof' is the fake combination itself, refused at every fifth position
    (there the side output goes up and the verdict decides, as a real proof refuses a near-tie)."""
    hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt", dataclasses.replace(opts, settle=True))
    gp = GatewayProtocol(BACKBONE, eos_ids=[EOS], branches=branches, settle=True,
                         pieces=[piece(t) for t in range(VOCAB)])
    dp = DeviceProtocol(hello, max_in_flight)

    def head(pos, f, s):
        if pos % 5 == 0:
            return None, b""
        token = fake_combine(f[None], s[None], dp.steps[pos][0].draft)
        return token, piece(token)

    device = DeviceHost(dp, lambda pos, f, margin: fake_gate(f), lambda pos, taps, projected: fake_side(taps), head)
    return Loopback(GatewayHost(gp, FakeModel(prompt, branches)), device)


@pytest.mark.parametrize("branches", [0, 2])
@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("window", [0, 2, 8])
def test_settlement_commits_exactly_the_lock_step_tokens(window, in_flight, branches):
    """Settled tokens, fallbacks to the verdict, rollbacks the device starts itself, streamed branch
    lines adopted without a round trip: in every interleaving the tokens are the lock-step ones."""
    totals = dict.fromkeys(("settled", "unproven", "adopted", "settled_changed", "streamed", "heads"), 0)
    for seed in range(8):
        opts = m.Options(window=window, codec="int8", outliers=2, max_new_tokens=40)
        prompt = PROMPT + [seed]
        pair = _settling_pair(opts, prompt, in_flight, branches)
        pair.run(random.Random(seed), max_moves=100_000)
        dev, stats = pair.device.proto, pair.device.proto.end.stats
        assert [c.token for c in dev.committed] == lock_step_reference(opts, prompt), f"seed {seed}"
        # (a proof of a position an earlier verdict voided reaches the gateway stale: dropped)
        assert stats["settled"] <= dev.stats.settled and stats["tokens"] == len(dev.committed)
        assert not [d for way, d, _ in pair.sent if way == "up" and d["type"] == "side"
                    and d["pos"] % 5 != 0], "a side output left the device for a position it settled"
        totals["settled"] += dev.stats.settled
        totals["unproven"] += dev.stats.unproven
        totals["adopted"] += dev.stats.branch_adopted
        totals["settled_changed"] += stats["settled_changed"]
        totals["streamed"] += stats["branch_streamed"]
        totals["heads"] += stats["heads"]
    assert totals["settled"] > 0 and totals["settled_changed"] > 0, totals  # settled, changes included
    assert totals["unproven"] > 0 and totals["heads"] == totals["unproven"], totals  # a head only for a fallback
    if branches and window > 0:
        assert totals["streamed"] > 0 and totals["adopted"] > 0, totals  # a change continued on a streamed line
