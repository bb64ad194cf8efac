"""Property-based fuzzing of the live gateway (in-process, loopback websockets).

Every frame a device could send, at the handshake and in the middle of a
generation, gets either a valid answer or the documented error code with its
close code: never `internal` (a gateway bug), never a hang or a crash, and the
gateway's memory stays bounded. A good session runs concurrently the whole
time and must produce exactly the tokens it produces alone. The gateway
drafts branches (`branches=2`), so the fuzzed sessions hold branch lines too:
the generation fuzzer also asks for taps and sends a side output whose verdict
keeps the draft, turns it to a runner-up the gateway drafted a branch for (a
hit), or to another token (a miss), and asserts that its sessions really
reached branch points, forked, adopted and discarded branch lines.
"""

import os
import struct
import threading
from dataclasses import asdict

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from benchmarks.stats import rss
from cloud_gateway.process import ThreadedGateway
from spa.protocol import codec
from spa.protocol import messages as m
from spa.protocol.errors import CODES
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import DropLine, ForkLine, GatewayProtocol
from spa.protocol.limits import Limits
from tests.strategies import msgpack_values, mutated

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LIMITS = Limits(max_sessions=32, idle_timeout_s=10, resume_grace_s=0, max_message_bytes=1 << 20,
                max_frame_bytes=256 << 10)
PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
GOOD_PROMPTS = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in (
    "Name three colours.", "What is rain?", "Describe a cat.", "Why is the sky blue?", "Say something kind.")]


def _rss() -> int:
    return rss(os.getpid())


WATCHED: list[dict] = []  # one per connection the fuzz gateway served: its prompt, the actions run, its stats


class _WatchedProtocol(GatewayProtocol):
    """The gateway's protocol, noting for its session every kind of action its host ran."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.watch = {"prompt": None, "actions": set(), "stats": self.stats}
        WATCHED.append(self.watch)

    def next_action(self):
        action = super().next_action()
        if action is not None:
            self.watch["actions"].add(type(action))
            self.watch["prompt"] = self.hello.prompt if self.hello is not None else None
        return action


def _branching(watched: list[dict]) -> dict:
    """How many fuzzed generation sessions (PROMPT) reached a branch point, forked, adopted, discarded."""
    sessions = [w for w in watched if w["prompt"] == PROMPT]
    return {"sessions": len(sessions),
            "branch_points": sum(w["stats"].branch_points > 0 for w in sessions),
            "forked": sum(ForkLine in w["actions"] for w in sessions),
            "adopted": sum(w["stats"].branch_hits > 0 for w in sessions),  # a branch line became the main line
            "discarded": sum(DropLine in w["actions"] for w in sessions)}


@pytest.fixture(scope="module")
def fuzz_gateway(backbone):
    # Branch drafting on: a fuzzed session that asks for taps has branch lines (forked KV caches,
    # branch drafts) when its connection breaks, errs or says bye; they must go with it.
    with pytest.MonkeyPatch.context() as mp:  # every session's protocol is watched
        mp.setattr("cloud_gateway.server.GatewayProtocol", _WatchedProtocol)
        with ThreadedGateway(backbone, LIMITS, branches=2) as gw:
            yield gw


@pytest.fixture(scope="module")
def ident(backbone):
    return backbone.identity


def _hello(ident, **options) -> dict:
    opts = {"window": 2, "max_new_tokens": 8, **options}
    return m.Hello("", m.Plugin(ident.fingerprint, (1, 5, ident.num_layers), "h"), PROMPT,
                   m.Options(**opts)).to_dict()


def _talk(url, frames: list, read_first: int = 0, quiet_s: float = 1.5):
    """Send frames (after reading `read_first` messages following the first one),
    then read. A callable frame gets the maps received so far and returns a
    frame, or a list of frames and waits (a message type, or a predicate on a
    map: read until a message that matches has arrived). When the gateway goes quiet for quiet_s without
    closing (it waits for the device: the frames were valid), say bye. Read
    until the gateway closes. Returns (received maps, close code)."""
    fc, got = FrameCodec(max_frame_bytes=8 << 20, max_message_bytes=64 << 20), []
    with connect(url, compression=None, max_size=None, open_timeout=30, close_timeout=5) as ws:
        try:
            for i, frame in enumerate(frames):
                script = frame(got) if callable(frame) else frame
                for item in script if isinstance(script, list) else [script]:
                    if isinstance(item, bytes):
                        ws.send(item)
                        continue
                    match = item if callable(item) else lambda d, t=item: d.get("type") == t
                    while not any(map(match, got)):
                        got.append(fc.unpack(ws.recv(timeout=60)))
                if i == 0:
                    for _ in range(read_first):
                        got.append(fc.unpack(ws.recv(timeout=60)))
            while True:
                try:
                    got.append(fc.unpack(ws.recv(timeout=quiet_s)))
                except TimeoutError:
                    ws.send(fc.pack({"type": "bye"}))
                    break
        except ConnectionClosed:
            pass
        try:  # whatever is left, until the close; an unanswered bye is a hang
            while True:
                got.append(fc.unpack(ws.recv(timeout=30)))
        except ConnectionClosed:
            pass
        except TimeoutError:
            pytest.fail(f"the gateway neither answered nor closed; got {[g.get('type') for g in got]}")
    return got, ws.close_code


def _check(got, close_code):
    """Either the documented error code and its close code, or a normal close; never `internal`."""
    errors = [g for g in got if g.get("type") == "error"]
    if errors:
        code = errors[-1]["code"]
        assert code in CODES and code != "internal", errors[-1]
        assert close_code == CODES[code][0], (code, close_code)
    else:  # a normal close, or a frame over max_frame_bytes refused by the websocket layer itself
        assert close_code in (1000, CODES["too_large"][0]), (close_code, [g.get("type") for g in got])
    return errors[-1]["code"] if errors else None


# --- strategies -------------------------------------------------------------------------

def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _claimed_size_frame(claimed: int, payload: bytes) -> bytes:
    """A zstd frame whose header claims `claimed` bytes, holding one raw block of payload."""
    header = struct.pack("<I", 0xFD2FB528) + bytes([0b11100000]) + struct.pack("<Q", claimed)
    return header + (1 | (len(payload) << 3)).to_bytes(3, "little") + payload


def raw_frames(valid: bytes):
    """Frame-level garbage around one valid frame."""
    huge_str = b"\xdb\xff\xff\xff\xf0" + b"x" * 8  # msgpack str32 declaring ~4 GiB
    huge_map = b"\xdf\xff\xff\xff\xff"  # map32 declaring 4G entries
    deep = b"\x91" * 5000 + b"\xc0"  # 5000 nested arrays
    return st.one_of(
        st.binary(max_size=200),  # not zstd at all
        st.binary(max_size=200).map(_zstd),  # zstd of not-msgpack
        msgpack_values.map(lambda v: _zstd(msgpack.packb(v))),  # msgpack of anything
        st.integers(1, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
        st.integers(0, len(valid) - 1).flatmap(  # one byte flipped
            lambda i: st.integers(1, 255).map(lambda x: valid[:i] + bytes([valid[i] ^ x]) + valid[i + 1:])),
        st.sampled_from([huge_str, huge_map, deep, b"\xc1"]).map(_zstd),
        st.integers(LIMITS.max_message_bytes + 1, 1 << 62).map(lambda n: _claimed_size_frame(n, b"\x80")),
        st.just(_claimed_size_frame(4, msgpack.packb({"type": "hello", "version": 1}))),  # claims less than it holds
        st.just(b"\x00" * (LIMITS.max_frame_bytes + 1)),  # over the frame limit
        st.just(_zstd(b"\x00" * (LIMITS.max_message_bytes + 1))),  # a real zstd bomb
    )


# --- the handshake ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_session(fuzz_gateway, pte_path, backbone):
    """A well-behaved device generating in a loop while the fuzzers run, and its solo reference."""
    import asyncio

    from device_runtime.client import run_session
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate

    pte = PtePlugin(pte_path)
    # Concurrent sessions may share batched forwards, so equality needs margin
    # (docs/DESIGN.md §2): use the first prompt whose every choice has it.
    for prompt in GOOD_PROMPTS:
        ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=12)
        if min(ref.logit_gap) > 1e-3 and min(abs(p - pte.tau) for p in ref.gate_p) > 1e-3:
            break
    else:
        pytest.fail("no prompt with margin")
    results, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            results.append(asyncio.run(run_session(fuzz_gateway.url, pte, prompt,
                                                   m.Options(window=0, max_new_tokens=12))))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield results
    stop.set()
    thread.join(120)
    assert results and all(r.tokens == ref.tokens and r.sigmas == ref.sigmas for r in results), \
        [(r.tokens, ref.tokens) for r in results]


@pytest.fixture(scope="module")
def rss_before(fuzz_gateway):
    return _rss()


def _projection(ident, rank: int = 2, by_hash: bool = False) -> m.Projection:
    """A cloud-side projection for _hello's 3 taps: its weights, or their hash alone."""
    weight = np.random.default_rng(rank).normal(0, 0.02, (3, rank, ident.hidden_size)).astype("<f2").tobytes()
    projection = m.Projection(rank, weight, np.zeros((3, rank), "<f4").tobytes())
    return projection.by_hash() if by_hash else projection


def first_messages(ident) -> list[dict]:
    """Every kind of first message a device sends: hellos of versions 2 and 3, with settlement,
    with the projection's weights or only their hash (a gateway that lacks them answers
    upload_needed), and a teaching connection's teach."""
    from spa.protocol.teach_messages import Teach

    plugin = m.Plugin(ident.fingerprint, (1, 5, ident.num_layers), "h")
    with_projection = _hello(ident)
    with_projection["projection"] = _projection(ident).to_dict()
    by_hash = _hello(ident)
    by_hash["projection"] = _projection(ident, rank=3, by_hash=True).to_dict()  # never uploaded: upload_needed
    return [_hello(ident), {**_hello(ident), "version": 2}, _hello(ident, settle=True), with_projection, by_hash,
            Teach("", plugin, PROMPT, "Hello.").to_dict()]


@FUZZ
@given(data=st.data())
def test_fuzzed_handshake_frames(fuzz_gateway, good_session, rss_before, ident, data):
    first = data.draw(st.sampled_from(first_messages(ident)))
    valid = FrameCodec().pack(first)
    frame = data.draw(st.one_of(raw_frames(valid), mutated(first).map(lambda d: FrameCodec().pack(d))))
    got, close_code = _talk(fuzz_gateway.url, [frame])
    if _check(got, close_code) is None and close_code == 1000:  # a mutation that is still a valid first message
        assert got[0]["type"] == ("states" if first["type"] == "teach" else "ready"), got[:1]


def test_a_hello_naming_an_unknown_projection_gets_upload_needed_and_then_uploads(fuzz_gateway, ident):
    """The projection by hash: unknown to the gateway, upload_needed (4010); sent with its
    weights, ready; named by hash again on a new connection, ready without the weights."""
    fc, projection = FrameCodec(), _projection(ident, rank=4)
    hello = _hello(ident)
    hello["projection"] = projection.by_hash().to_dict()
    got, close_code = _talk(fuzz_gateway.url, [fc.pack(hello)])
    assert _check(got, close_code) == "upload_needed"
    hello["projection"] = projection.to_dict()
    got, close_code = _talk(fuzz_gateway.url, [fc.pack(hello)])
    assert _check(got, close_code) is None and got[0]["type"] == "ready"
    hello["projection"] = projection.by_hash().to_dict()
    got, close_code = _talk(fuzz_gateway.url, [fc.pack(hello)])
    assert _check(got, close_code) is None and got[0]["type"] == "ready"


# --- every message type during a generation ----------------------------------------------------


def _act(scheme="f32", rows=1, cols=576):
    return codec.encode(np.random.default_rng(0).normal(0, 1, (rows, cols)).astype(np.float32), scheme)


def _bad_float_acts():
    """Activations holding NaN/inf: in the f32 payload, a scale, an fp16 outlier."""
    nan_f32 = {**_act("f32"), "q": np.full(576, np.nan, "<f4").tobytes()}
    inf_f32 = {**_act("f32"), "q": np.r_[np.zeros(575), np.inf].astype("<f4").tobytes()}
    inf_scale = {**_act("int8"), "scale": np.array([np.inf], "<f4").tobytes()}
    nan_outlier = {**_act("int8"), "oval": np.r_[np.full(7, 1.0), np.nan].astype("<f2").tobytes()}
    overflow = {**_act("int8"), "scale": np.array([3e38], "<f4").tobytes()}  # q * scale overflows to inf
    return [nan_f32, inf_f32, inf_scale, nan_outlier, overflow]


@pytest.mark.parametrize("act", _bad_float_acts(), ids=["nan_f32", "inf_f32", "inf_scale", "nan_outlier", "overflow"])
def test_non_finite_side_outputs_are_bad_field(fuzz_gateway, ident, act):
    fc = FrameCodec()
    frames = [fc.pack(_hello(ident, window=0)),
              lambda got: fc.pack({"type": "need_taps", "epoch": 0, "pos": got[-1]["pos"]}),
              lambda got: fc.pack({"type": "side", "epoch": 0, "pos": got[-1]["pos"], "s": act})]
    got, close_code = _talk_scripted(fuzz_gateway.url, frames, reads=[2, 1])
    assert got[-2]["type"] == "taps"
    assert _check(got, close_code) == "bad_field" and got[-1]["message"].startswith("side.s")


def _talk_scripted(url, frames, reads):
    """Like _talk, reading reads[i] messages after frame i (before the last frame)."""
    fc, got = FrameCodec(), []
    with connect(url, compression=None, max_size=None, open_timeout=30, close_timeout=5) as ws:
        try:
            for i, frame in enumerate(frames):
                ws.send(frame(got) if callable(frame) else frame)
                for _ in range(reads[i] if i < len(reads) else 0):
                    got.append(fc.unpack(ws.recv(timeout=60)))
            while True:  # until the gateway closes (after its error)
                got.append(fc.unpack(ws.recv(timeout=30)))
        except ConnectionClosed:
            pass
        except TimeoutError:
            pytest.fail(f"no answer; got {[g.get('type') for g in got]}")
    return got, ws.close_code


@pytest.fixture(scope="module")
def first_position(fuzz_gateway, backbone, ident):
    """The exact f of a PROMPT session's first position (a session with codec f32) and the
    tokens a verdict there can lead to: "unchanged" (the draft), "runner_up_1"/"runner_up_2"
    (a runner-up of the draft: the token of a branch line), "miss" (a token no branch line
    drafted)."""
    import torch

    got, _ = _talk(fuzz_gateway.url, [FrameCodec().pack(_hello(ident, codec="f32"))], read_first=2)
    step = got[1]
    assert step["type"] == "step", got
    f = torch.from_numpy(codec.decode(step["f"]))
    logits = backbone.logits(f)[0]
    order = torch.argsort(logits, descending=True).tolist()
    assert order[0] == step["draft"]
    # The draft and the K = 2 runners-up the gateway branches on stand clear of the rest.
    assert logits[order[0]] - logits[order[1]] > 0.05 and logits[order[2]] - logits[order[3]] > 0.05, logits[order[:4]]
    eos = backbone.eos_token_ids
    return f, {"unchanged": order[0], "runner_up_1": order[1], "runner_up_2": order[2],
               "miss": next(t for t in order[3:] if t not in eos)}


@pytest.fixture(scope="module")
def verdict_sides(first_position, backbone) -> dict:
    """Side outputs for the first position of a PROMPT session, by the verdict
    they lead to (first_position's names), with margin."""
    import torch

    f, tokens = first_position
    eos = backbone.eos_token_ids
    targets = {name: token for name, token in tokens.items() if name != "unchanged"}
    sides = {"unchanged": np.zeros((1, f.shape[1]), np.float32)}
    for name, token in targets.items():
        if token in eos:  # no branch line for an EOS runner-up
            continue
        direction = backbone.lm_head.weight[token].detach().float().cpu()[None]
        for scale in (2.0 ** k for k in range(-4, 12)):
            s = direction * scale * f.norm() / direction.norm()
            top2 = torch.topk(backbone.logits(f, s)[0], 2)
            if top2.indices[0] == token and top2.values[0] - top2.values[1] > 1.0:
                sides[name] = s.numpy().astype(np.float32)
                break
        else:
            pytest.fail(f"no side output turns the draft to {name} {token}")
    assert "runner_up_1" in sides or "runner_up_2" in sides, targets
    return sides


@st.composite
def generation_messages(draw, step: dict, hello: dict, sides: dict) -> dict | tuple:
    """A device message for a session whose first step is `step` (epoch 0): valid,
    out of order, or mutated; or a side exchange: (need_taps, the side output
    to send once its taps are here), a side from `sides` (verdict_sides)."""
    pos = step["pos"]
    s = _act(draw(st.sampled_from(["f32", "int8", "int4"])))
    near = st.integers(0, pos + 80) | st.integers(0, 2**31 - 1)
    kind = draw(st.sampled_from(["accept", "need_taps", "side", "bye", "hello", "error", "ready", "step", "resumed",
                                 "exchange", "exchange"]))
    if kind == "exchange":  # a branch point: hit, miss or unchanged
        verdict = draw(st.sampled_from(sorted(sides)))
        return ({"type": "need_taps", "epoch": 0, "pos": pos},
                {"type": "side", "epoch": 0, "pos": pos, "s": codec.encode(sides[verdict], "f32")})
    base = {
        "accept": {"type": "accept", "epoch": draw(st.sampled_from([0, 0, 1, 7])), "upto": draw(near)},
        "need_taps": {"type": "need_taps", "epoch": draw(st.sampled_from([0, 0, 3])), "pos": draw(near)},
        "side": {"type": "side", "epoch": 0, "pos": draw(near), "s": s},
        "bye": {"type": "bye"},
        "hello": hello,
        "error": {"type": "error", "code": draw(st.text(max_size=8)), "message": "device error"},
        "ready": {"type": "ready"},
        "step": {**step},
        "resumed": {"type": "resumed", "session": "x", "secret": "y", "epoch": 0, "pos": pos},
    }[kind]
    return draw(st.one_of(st.just(base), mutated(base))) if kind != "bye" else base


@FUZZ
@given(data=st.data())
def _fuzz_generation(fuzz_gateway, ident, verdict_sides, data):
    fc = FrameCodec()
    hello = fc.pack(_hello(ident))
    box = {}

    def fuzzed(got):
        box["msg"] = data.draw(generation_messages(got[-1], _hello(ident), verdict_sides))
        box["exchange"] = isinstance(box["msg"], tuple)
        if box["exchange"]:  # need_taps, then the side once the taps are here
            need_taps, box["msg"] = box["msg"]
            # and once the main line holds its W + 1 steps: the gateway has forked its branch
            # lines by then and drafts them (a side output sooner is answered before any fork)
            last = need_taps["pos"] + _hello(ident)["options"]["window"]
            return [fc.pack(need_taps), "taps", lambda d: d.get("type") == "step" and d.get("pos") == last,
                    fc.pack(box["msg"])]
        return fc.pack(box["msg"])

    got, close_code = _talk(fuzz_gateway.url, [hello, fuzzed], read_first=2)
    assert got[0]["type"] == "ready" and got[1]["type"] == "step"
    code = _check(got, close_code)
    msg = box["msg"]
    if box["exchange"]:  # a valid side output, answered with its verdict
        assert code is None and "verdict" in [g.get("type") for g in got], got
    elif code is None:  # a valid message at a valid time, bye, or the device's own error (the gateway just closes)
        assert msg["type"] in ("accept", "need_taps", "bye", "error"), msg


def test_fuzzed_messages_during_generation(fuzz_gateway, good_session, rss_before, ident, verdict_sides):
    """The fuzzer; its sessions drafted branches: reached branch points, forked
    branch lines, adopted one (a hit) and discarded them (unchanged or a miss)."""
    first = len(WATCHED)
    _fuzz_generation(fuzz_gateway, ident, verdict_sides)
    counts = _branching(WATCHED[first:])
    print("fuzzed sessions' branching:", counts)
    zero = [k for k in ("branch_points", "forked", "adopted", "discarded") if counts[k] == 0]
    assert not zero, f"no fuzzed session {', '.join(zero)}: {counts}"


@st.composite
def settling_messages(draw, step: dict, tokens: dict, vocab: int) -> dict | tuple:
    """A device message for a settling session (version 3, options.settle) whose first step
    is `step`: a settled exchange (need_taps, then `settled` with the draft, a runner-up the
    gateway streams a branch line for, or another token), or a `settled` valid, out of order,
    beyond the vocabulary or mutated, or any other device message."""
    pos = step["pos"]
    kind = draw(st.sampled_from(["exchange", "exchange", "exchange", "settled", "settled", "other"]))
    if kind == "exchange":
        verdict = draw(st.sampled_from(sorted(tokens)))
        return {"type": "need_taps", "epoch": 0, "pos": pos}, {"type": "settled", "epoch": 0, "pos": pos,
                                                               "token": tokens[verdict]}
    if kind == "settled":
        base = {"type": "settled", "epoch": draw(st.sampled_from([0, 0, 1])),
                "pos": draw(st.integers(0, pos + 80) | st.integers(0, 2**31 - 1)),
                "token": draw(st.sampled_from(sorted(tokens.values())) | st.integers(0, vocab - 1)
                              | st.integers(vocab, 2**31 - 1))}
        return draw(st.one_of(st.just(base), mutated(base)))
    other = {"type": draw(st.sampled_from(["accept", "need_taps", "side"])), "epoch": 0, "pos": pos, "upto": pos,
             "s": _act("int8")}
    return draw(mutated(other))


@FUZZ
@given(data=st.data())
def _fuzz_settlement(fuzz_gateway, ident, first_position, data):
    fc = FrameCodec()
    hello = _hello(ident, settle=True)
    box = {}
    _, tokens = first_position

    def fuzzed(got):
        assert got[0].get("settle") is True, got[0]  # the gateway agreed to settlement
        box["msg"] = data.draw(settling_messages(got[1], tokens, ident.vocab_size))
        box["exchange"] = isinstance(box["msg"], tuple)
        if box["exchange"]:  # the taps come with exact f; settle once the branch lines are streaming
            need_taps, box["msg"] = box["msg"]
            last = need_taps["pos"] + hello["options"]["window"]
            return [fc.pack(need_taps), lambda d: d.get("type") == "taps" and "exact" in d,
                    lambda d: d.get("type") == "step" and d.get("pos") == last and "branch" not in d,
                    fc.pack(box["msg"])]
        return fc.pack(box["msg"])

    got, close_code = _talk(fuzz_gateway.url, [fc.pack(hello), fuzzed], read_first=2)
    code = _check(got, close_code)
    if box["exchange"]:  # a settled token is taken as the device proved it: no verdict, no error
        assert code is None and "verdict" not in [g.get("type") for g in got], got
        session = [w for w in WATCHED if w["prompt"] == PROMPT][-1]["stats"]
        assert session.settled == 1 and session.heads == 0, session


def test_fuzzed_messages_in_a_settling_session(fuzz_gateway, good_session, rss_before, ident, first_position):
    """The fuzzer, settling (protocol version 3): every new message and field, and sessions
    that settled an unchanged token, a changed one that adopted a streamed branch line, and a
    changed one that no branch line continued."""
    first = len(WATCHED)
    _fuzz_settlement(fuzz_gateway, ident, first_position)
    sessions = [w["stats"] for w in WATCHED[first:] if w["prompt"] == PROMPT]
    counts = {"settled": sum(s.settled > 0 for s in sessions),
              "changed": sum(s.settled_changed > 0 for s in sessions),
              "streamed": sum(s.branch_streamed > 0 for s in sessions),
              "adopted": sum(s.branch_hits > 0 for s in sessions),
              "missed": sum(s.branch_misses > 0 for s in sessions)}
    print("fuzzed settling sessions:", counts)
    assert all(counts.values()), counts


def test_gateway_memory_is_bounded_and_returned(fuzz_gateway, good_session, rss_before):
    """After the fuzzers: no session left, no KV cache held, bounded process growth."""
    # Only the good session (looping) may hold state now.
    assert fuzz_gateway.wait_until(lambda g: len(g.sessions) <= 1 and g.kv_bytes() < 64 << 20, timeout=30)
    growth = _rss() - rss_before
    assert growth < 400 << 20, f"process grew by {growth >> 20} MiB"
    stats = fuzz_gateway.call(lambda: asdict(fuzz_gateway.gateway.stats))
    assert stats["sessions"] > 60, stats  # the fuzzers really opened sessions
