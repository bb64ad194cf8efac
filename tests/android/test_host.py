"""The Android demo, on a host without a phone.

* The pure-Java protocol module's JUnit tests (android_demo/scripts/host_test.sh):
  codec vectors, frame limits, message validation, the device state machine,
  the host plugin executor against the shared plugin vectors.
* Every app source compiles against android.jar (API 23) and ExecuTorch's Java
  API (android_demo/scripts/compile_app.sh).
* Python checks the same plugin vectors as Java, so a drift on either side shows.
* Java and Python talk through real frames: activations the Java encoder
  produced decode in Python exactly as Python's own, and every message type
  round-trips through the Java parser (and invalid ones are refused with the
  same error code); parsed as the device receives them, Java refuses what
  Python's `parse(d, "device")` refuses with the same code and text (`type` of
  any length, the direction); plain documents are the same (the spec's
  whitespace, Python's str.split()).

Live sessions of the Java client against `spa gateway` live elsewhere.
"""

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from spa.protocol import codec
from spa.model.plugin import load_plugin
from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "android_demo"
VECTORS = ROOT / "tests" / "vectors"


def _run(cmd: list, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def junit_run(java_ready) -> subprocess.CompletedProcess:
    """Builds the protocol module and its tests, runs JUnit; leaves build/host/test-classpath."""
    return _run([DEMO / "scripts" / "host_test.sh"])


def test_java_protocol_module_passes_its_junit_tests(junit_run):
    assert junit_run.returncode == 0, _explain(junit_run)
    assert "OK (" in junit_run.stdout, _explain(junit_run)


def test_all_app_sources_compile_against_android_and_executorch(java_ready):
    proc = _run([DEMO / "scripts" / "compile_app.sh"])
    assert proc.returncode == 0, _explain(proc)
    classes = DEMO / "build" / "app-classes"
    for name in ("org/spa/demo/MainActivity", "org/spa/demo/BenchmarkActivity",
                 "org/spa/demo/ExecuTorchPluginExecutor", "org/spa/protocol/GatewayClient"):
        assert (classes / f"{name}.class").is_file(), name


# --- the shared plugin vectors, from the Python side ---------------------------------


def test_plugin_vectors_match_eager_torch():
    """The file the Java executor is checked against still says what spa/model/plugin.py computes."""
    doc = json.loads((VECTORS / "plugin_vectors.json").read_text())
    plugin = load_plugin(VECTORS / doc["plugin_dir"])  # checks the content hash, so the weights are intact
    assert plugin.content_hash() == doc["content_hash"]
    h, taps, tol = doc["hidden_size"], doc["taps"], doc["tolerance"]
    assert plugin.config.hidden_size == h and plugin.config.taps == taps
    f32 = lambda s: np.frombuffer(bytes.fromhex(s), "<f4")  # noqa: E731
    ps = []
    with torch.no_grad():
        for case in doc["gate"]:
            p = plugin.gate(torch.from_numpy(f32(case["f"]).copy())[None])[0, 0].item()
            assert abs(p - f32(case["p"])[0]) <= tol["gate_abs"]
            ps.append(p)
        for case in doc["side"]:
            want = f32(case["s"])
            s = plugin.side(torch.from_numpy(f32(case["taps"]).reshape(len(taps), h).copy())[None])[0].numpy()
            assert np.abs(s - want).max() <= tol["side_rel_to_max_abs"] * np.abs(want).max()
            assert np.abs(want).max() > 1  # a plugin that outputs something
    assert min(ps) < 0.2 and max(ps) > 0.8  # gate values spread over (0, 1), both sides of tau


def test_margin_gate_vectors_match_eager_torch():
    """The margin gate's vectors (rows [f_t, m_t]) say what spa/model/plugin.py computes, and the margin moves p."""
    doc = json.loads((VECTORS / "plugin_vectors.json").read_text())
    plugin = load_plugin(VECTORS / doc["margin_plugin_dir"])
    assert plugin.config.gate_margin and plugin.content_hash() == doc["margin_content_hash"]
    f32 = lambda s: np.frombuffer(bytes.fromhex(s), "<f4")  # noqa: E731
    rows = [f32(case["row"]) for case in doc["margin_gate"]]
    assert all(len(r) == doc["hidden_size"] + 1 for r in rows)
    with torch.no_grad():
        for row, case in zip(rows, doc["margin_gate"]):
            p = plugin.gate(torch.from_numpy(row.copy())[None])[0, 0].item()
            assert abs(p - f32(case["p"])[0]) <= doc["tolerance"]["gate_abs"]
        # The same f with another margin gives another p: the margin is an input, not ignored.
        f = torch.from_numpy(rows[0][:-1].copy())
        p_tie, p_sure = (plugin.gate(torch.cat([f, torch.tensor([m])])[None])[0, 0].item() for m in (0.0, 40.0))
    assert p_tie - p_sure > 0.2, (p_tie, p_sure)


# --- Java <-> Python through real frames ---------------------------------------------


def _write_frames(path: Path, frames: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<I", len(f)) + f for f in frames))


def _read_frames(path: Path) -> list[bytes]:
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        out.append(data[i + 4: i + 4 + n])
        i += 4 + n
    return out


def _interop(junit_run, mode: str, maps: list[dict], tmp_path: Path) -> list[dict]:
    classpath_file = DEMO / "build" / "host" / "test-classpath"
    assert classpath_file.is_file(), _explain(junit_run)
    fc = FrameCodec()
    src, dst = tmp_path / f"{mode}.in", tmp_path / f"{mode}.out"
    _write_frames(src, [fc.pack(d) for d in maps])
    proc = _run(["java", "-cp", classpath_file.read_text().strip(), "org.spa.protocol.InteropTool", mode, src, dst])
    assert proc.returncode == 0, _explain(proc)
    replies = [fc.unpack(f) for f in _read_frames(dst)]  # Java's frames pass Python's strict checks
    assert len(replies) == len(maps)
    return replies


def _activation_cases() -> list[tuple[np.ndarray, str, int]]:
    rng = np.random.default_rng(11)
    states = rng.normal(0, 15, (3, 576)).astype(np.float32)
    states[:, [3, 77, 300]] = [[2100.5, -1875.25, 900.0]]
    ties = np.array([[0.5, -3, 3, 0, 3, -0.25, 1, 2, -2]], np.float32)
    huge = states[:1].copy()
    huge[0, 10] = -70000.0  # beyond fp16: outliers as fp32
    tiny = (rng.normal(0, 1, (2, 33)) * 1e-30).astype(np.float32)  # scales near underflow
    halves = rng.normal(0, 1, (1, 64)).astype(np.float32) * np.float32(2.0 ** -15)  # fp16 subnormal outliers
    cases = []
    for x in (states, ties, huge, tiny, halves, np.zeros((1, 7), np.float32)):
        for scheme, k in (("int8", 8), ("int4", 8), ("int8", 0), ("int4", 3), ("f32", 0)):
            cases.append((x, scheme, k))
    return cases


def test_java_encoded_activations_decode_in_python_exactly(junit_run, tmp_path):
    cases = _activation_cases()
    maps = [{"type": "encode", "x": x.astype("<f4").tobytes(), "rows": x.shape[0], "cols": x.shape[1],
             "scheme": scheme, "outliers": k} for x, scheme, k in cases]
    for (x, scheme, k), reply in zip(cases, _interop(junit_run, "encode", maps, tmp_path)):
        ours = codec.encode(x, scheme, k)
        theirs = reply["encoded"]
        assert theirs == ours, (scheme, k, x.shape)  # byte for byte the reference encoder
        assert codec.decode(theirs).tobytes() == codec.decode(ours).tobytes()


def _messages() -> list[dict]:
    rng = np.random.default_rng(3)
    f = codec.encode(rng.normal(0, 15, (1, 16)))
    taps = codec.encode(rng.normal(0, 15, (3, 16)), "int4", 4)
    bb = m.BackboneInfo("fake-lm", "fp-123", num_layers=4, hidden_size=16)
    opts = m.Options(window=2, codec="int4", outliers=4, max_new_tokens=50, temperature=0.7, seed=2**62)
    return [msg.to_dict() for msg in (
        m.Hello("secret", m.Plugin("fp-123", (0, 2, 4), "sha256:abc"), "Résumé: {document} ✓", opts),
        m.Hello("", m.Plugin("fp", (1,), "h"), "p", m.Options(), resume=m.Resume("s1", "r1")),
        m.Ready("s1", "r1", bb, 12, Limits().to_dict()),
        m.Step(0, 11, f, 42, b"\xc3"),
        m.Accept(0, 11),
        m.NeedTaps(1, 12),
        m.Taps(1, 12, taps),
        m.Side(1, 12, f),
        m.Verdict(2, 12, 7, b"\xa9 ", True),
        m.End("max_tokens", {"tokens": 3, "rollbacks": 1, "seconds": 0.5}),
        m.Error("limit", "too many"),
        m.Bye(),
        m.Hello("", m.Plugin("fp", (1,), "h"), "p", m.Options(), compression=("none", "zstd", "lz4")),
        m.Ready("s1", "r1", bb, 12, Limits().to_dict(), "none"),
    )]


def _invalid_messages() -> list[dict]:
    good = _messages()
    hello, step = good[0], good[3]
    return [
        {"type": "teleport"},
        {"type": "accept", "epoch": 0},
        {"type": "accept", "epoch": True, "upto": 1},
        {"type": "accept", "epoch": 0, "upto": 2**31},
        {"type": "accept", "epoch": 0, "upto": 1.0},
        {**step, "piece": "text"},
        {**step, "f": {**step["f"], "scale": b""}},
        {**hello, "version": max(m.VERSIONS) + 1},  # a version neither parser knows
        {**hello, "compression": []},
        {**hello, "compression": ["zstd", 7]},
        {**hello, "options": {**hello["options"], "codec": "int2"}},
        {**hello, "plugin": {**hello["plugin"], "taps": [2, 1]}},
        {"type": "end", "reason": "eos", "stats": {"rollbacks": 1}},
        {"type": "error", "code": "x" * 257, "message": ""},
    ]


def test_messages_round_trip_through_the_java_parser(junit_run, tmp_path):
    maps = _messages()
    for sent, back in zip(maps, _interop(junit_run, "messages", maps, tmp_path)):
        assert m.parse(back) == m.parse(sent), sent["type"]


def test_java_refuses_invalid_messages_with_pythons_codes(junit_run, tmp_path):
    maps = _invalid_messages()
    for sent, back in zip(maps, _interop(junit_run, "messages", maps, tmp_path)):
        with pytest.raises(ProtocolError) as e:
            m.parse(sent)
        assert back["type"] == "error" and back["code"] == e.value.code, (sent, back)


# --- the `type` field, the direction, readable texts (docs/PROTOCOL.md §3) -------------


def _device_bound_refusals() -> list[dict]:
    """Maps the device refuses: `type` of any length that names no message (unknown_type, the
    text shortened), a missing or non-str `type` (bad_field, message.type), and every type the
    device never receives, decided before any other field is read (complete ones too)."""
    good = _messages()
    gateway_bound = [d for d in good if d["type"] in m.RECEIVES["gateway"] - m.RECEIVES["device"]]
    assert {d["type"] for d in gateway_bound} == {"hello", "accept", "need_taps", "side", "bye"}
    return [
        {"type": "x" * 33},  # once over the Java client's old 32-character limit: bad_field there
        {"type": "y" * (1 << 20)},
        {"type": "\U0001F600" + "z" * 70},  # cut at 64 code points, not UTF-16 units
        {"type": "it's\n\x01\u2028"},  # repr's quotes and escapes
        {"type": ""},
        {"epoch": 0},
        {"type": 5},
        {"type": None},
        {"type": True},
        {"type": b"step"},
        *({"type": t} for t in ("hello", "accept", "need_taps", "side", "bye")),  # incomplete: still unknown_type
        *gateway_bound,
        {"type": "step"},  # a type the device receives: its fields are read
        {"type": "error", "code": "limit"},
        {"type": "error", "code": "limit", "message": 5},
        {**good[2], "compression": 7},
        {**good[2], "compression": "z" * 33},
        {"type": "end", "reason": "eos", "stats": {"tokens": 1.5}},
    ]


def test_java_refuses_like_pythons_device_parser(junit_run, tmp_path):
    """Messages.parse(d, DEVICE) == m.parse(d, "device"): the same code and the same text."""
    maps = _device_bound_refusals()
    for sent, back in zip(maps, _interop(junit_run, "device", maps, tmp_path)):
        with pytest.raises(ProtocolError) as e:
            m.parse(sent, "device")
        shown = str(sent)[:120]
        assert back["type"] == "error", shown
        assert (back["code"], back["message"]) == (e.value.code, e.value.message), shown


def test_java_device_parser_reads_what_the_device_receives(junit_run, tmp_path):
    maps = [d for d in _messages() if d["type"] in m.RECEIVES["device"]]
    assert {d["type"] for d in maps} == {"ready", "step", "taps", "verdict", "end", "error"}
    for sent, back in zip(maps, _interop(junit_run, "device", maps, tmp_path)):
        assert m.parse(back, "device") == m.parse(sent, "device"), sent["type"]


def test_java_error_texts_match_pythons(junit_run, tmp_path):
    """No "at most None characters", no ">= 0.0" or ">= -inf": the texts Python writes."""
    hello = _messages()[0]
    maps = [
        {**hello, "prompt": 7},  # no length limit: "expected a str"
        {**hello, "token": "t" * 257},
        {**hello, "options": {**hello["options"], "temperature": -0.5}},
        {**hello, "options": {**hello["options"], "temperature": float("nan")}},
        {**hello, "options": {**hello["options"], "temperature": "hot"}},
        {**hello, "plugin": {**hello["plugin"], "fingerprint": None}},
        {"type": "step"},  # both directions: a step's first missing field
    ]
    for sent, back in zip(maps, _interop(junit_run, "messages", maps, tmp_path)):
        with pytest.raises(ProtocolError) as e:
            m.parse(sent)
        assert back["type"] == "error", sent
        assert (back["code"], back["message"]) == (e.value.code, e.value.message)
        assert "None" not in back["message"] and "inf" not in back["message"]


# --- the prompt: a plain document (docs/PROTOCOL.md §4, "The prompt", step 3) -----------

# The spec's whitespace list, which is Python's str.isspace() (and so str.split()).
SPEC_WHITESPACE = {*range(0x09, 0x0E), *range(0x1C, 0x20), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                   0x2028, 0x2029, 0x202F, 0x205F, 0x3000}


def _prompt_cases() -> list[tuple[str, int]]:
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert {ord(s) for s in spaces} == SPEC_WHITESPACE
    cases = [(f"{s}a{s}{s}b {s}", 10) for s in spaces]
    # every code point but the surrogates next to a letter: which ones split words; whole, and cut
    every = "".join(chr(c) + "w" for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and (c < 0x10000 or c % 97 == 0))
    cases += [(every, 1 << 20), (every, 128), (every, 1)]
    cases += [
        ("\x01x\x02\n", 10),  # control characters at the ends stay (trim() dropped them)
        ("\x1c\x1dword\x1e\x1f", 10),
        ("\u00a0\u2003 Résumé,\u3000 déjà\u205fvu\u2029 \u200bzero-width\ufeff", 10),
        ("\U0001F600\U0001F600\u00a0b\u3000cdefgh", 2),  # the cut counts code points
        ("\U0001F600" * 9 + "\u2028" + "a" * 10, 2),  # no space within the limit: a hard cut
        ("\u0085\u1680\u180e\u200b\u2060", 10),  # U+180E, U+200B, U+2060 are no whitespace
        ("  a \n b\t\tc ", 10),
    ]
    rng = np.random.default_rng(23)
    alphabet = [*spaces, "a", "b", "é", "\U0001F600", "\x00", "\x01", "\x1b", "\x7f", "\u200b", "\ufeff", "{"]
    for _ in range(200):
        n = int(rng.integers(0, 120))
        cases.append(("".join(rng.choice(alphabet, n)), int(rng.integers(1, 12))))
    return cases


def test_java_plain_document_matches_python(junit_run, tmp_path):
    from spa.data.prompts import plain_document

    cases = _prompt_cases()
    maps = [{"text": text, "max_doc_tokens": n} for text, n in cases]
    for (text, n), back in zip(cases, _interop(junit_run, "prompts", maps, tmp_path)):
        assert back["document"] == plain_document(text, n), (text[:80], n)
