"""The activation codec: accuracy on transformer-like states, sizes, exactness, validation."""

import json
from pathlib import Path

import numpy as np
import pytest

from spa.protocol import codec
from spa.protocol.errors import ProtocolError

H = 576
OUTLIER_CHANNELS = [3, 77, 300, 511]
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "codec_vectors.json"


def states(rows=8, seed=0) -> np.ndarray:
    """Like SmolLM2's final states: N(0, 15) plus a few channels near +-2000."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 15, (rows, H)).astype(np.float32)
    x[:, OUTLIER_CHANNELS] = rng.choice([-1, 1], (rows, len(OUTLIER_CHANNELS))) * rng.uniform(
        1500, 2500, (rows, len(OUTLIER_CHANNELS))
    )
    return x


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def bulk(x: np.ndarray) -> np.ndarray:
    """The ordinary channels, where naive absmax quantization does its damage."""
    return np.delete(x, OUTLIER_CHANNELS, axis=1)


def bulk_error(x: np.ndarray, y: np.ndarray) -> float:
    """Largest per-row relative L2 error on the ordinary channels."""
    d = bulk(x).astype(np.float64) - bulk(y)
    return float((np.linalg.norm(d, axis=1) / np.linalg.norm(bulk(x), axis=1)).max())


def test_int8_with_outliers_is_near_lossless():
    x = states()
    y = codec.quantize(x, "int8", outliers=8)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert min_row_cosine(x, y) > 0.999
    assert min_row_cosine(bulk(x), bulk(y)) > 0.999
    np.testing.assert_allclose(y[:, OUTLIER_CHANNELS], x[:, OUTLIER_CHANNELS], rtol=1e-3)


def test_int8_without_outliers_is_clearly_worse():
    x = states()
    with_outliers = codec.quantize(x, "int8", outliers=8)
    without = codec.quantize(x, "int8", outliers=0)
    assert min_row_cosine(bulk(x), bulk(without)) < 0.95
    assert bulk_error(x, without) > 20 * bulk_error(x, with_outliers)


def test_int4_with_outliers():
    x = states()
    y = codec.quantize(x, "int4", outliers=8)
    assert min_row_cosine(x, y) > 0.95
    assert min_row_cosine(bulk(x), bulk(y)) > 0.95
    assert bulk_error(x, codec.quantize(x, "int4", outliers=0)) > 0.9  # the bulk rounds to ~0


def test_f32_is_exact():
    x = states()
    assert np.array_equal(codec.quantize(x, "f32"), x)


@pytest.mark.parametrize(
    "scheme, outliers, expected",
    [
        ("int8", 8, 8 * (H + 4 + 8 * 2 + 8 * 2)),
        ("int8", 0, 8 * (H + 4)),
        ("int4", 8, 8 * (H // 2 + 4 + 8 * 2 + 8 * 2)),
        ("f32", 8, 8 * H * 4),
    ],
)
def test_byte_sizes(scheme, outliers, expected):
    assert codec.encoded_size(codec.encode(states(), scheme, outliers)) == expected


def test_int4_odd_columns_pad_each_row():
    x = states(rows=3)[:, :7]
    d = codec.encode(x, "int4", outliers=2)
    assert len(d["q"]) == 3 * 4
    assert codec.decode(d).shape == (3, 7)


def test_fp16_overflow_switches_the_tensor_to_fp32_outliers():
    x = states(rows=2)
    assert codec.encode(x)["odtype"] == "f16"
    x[1, 10] = 1e6
    d = codec.encode(x)
    assert d["odtype"] == "f32" and len(d["oval"]) == 2 * 8 * 4
    y = codec.decode(d)
    assert y[1, 10] == np.float32(1e6)


def test_ties_pick_the_lower_index():
    x = np.array([[5, -5, 5, 1, 0]], np.float32)
    d = codec.encode(x, "int8", outliers=2)
    assert np.frombuffer(d["oidx"], "<u2").tolist() == [0, 1]


def test_all_zero_row_and_all_outlier_row():
    x = np.zeros((2, 4), np.float32)
    x[1] = [1, 2, 3, 4]
    d = codec.encode(x, "int8", outliers=4)
    assert np.frombuffer(d["scale"], "<f4").tolist() == [1.0, 1.0]
    assert np.array_equal(codec.decode(d), x)


def test_deterministic_and_json_vectors_reproduced():
    x = states()
    assert codec.encode(x) == codec.encode(x.copy())
    cases = json.loads(VECTORS.read_text())["cases"]
    assert {"int8", "int4", "int8_fp32_outliers"} <= {c["name"] for c in cases}
    for case in cases:
        x = np.frombuffer(bytes.fromhex(case["input_f32"]), "<f4").reshape(case["shape"])
        d = codec.encode(x, case["scheme"], case["outliers"])
        expected = case["encoded"]
        assert d["scheme"] == expected["scheme"] and d["shape"] == expected["shape"], case["name"]
        assert d["odtype"] == expected["odtype"], case["name"]
        for name in ("q", "scale", "oidx", "oval"):
            assert d[name].hex() == expected[name], (case["name"], name)
        assert codec.decode(d).astype("<f4").tobytes().hex() == case["decoded_f32"], case["name"]


def test_non_finite_input_is_refused():
    x = states(rows=1)
    x[0, 5] = np.nan
    with pytest.raises(ValueError):
        codec.encode(x)
    with pytest.raises(ValueError):
        codec.encode(np.zeros(4, np.float32))  # not a matrix


def _valid(scheme="int8"):
    return codec.encode(states(rows=2)[:, :16], scheme, outliers=2)


@pytest.mark.parametrize(
    "scheme, change",
    [
        ("int8", lambda d: d.pop("scale")),
        ("int8", lambda d: d.update(scheme="int3")),
        ("int8", lambda d: d.update(scheme=8)),
        ("int8", lambda d: d.update(odtype="bf16")),
        ("int8", lambda d: d.update(shape=[2])),
        ("int8", lambda d: d.update(shape=[2, 15])),
        ("int8", lambda d: d.update(shape=[True, 16])),
        ("int8", lambda d: d.update(shape=[0, 16])),
        ("int8", lambda d: d.update(q=d["q"][:-1])),
        ("int8", lambda d: d.update(q="text")),
        ("int8", lambda d: d.update(q=b"\x80" + d["q"][1:])),  # -128
        ("int8", lambda d: d.update(scale=np.array([1, np.inf], "<f4").tobytes())),
        ("int8", lambda d: d.update(scale=np.array([1, 0], "<f4").tobytes())),
        ("int8", lambda d: d.update(scale=np.array([1, 3e38], "<f4").tobytes())),  # 127 * scale = inf
        ("int8", lambda d: d.update(oidx=d["oidx"][:-2])),
        ("int8", lambda d: d.update(oidx=np.array([1, 1, 2, 3], "<u2").tobytes())),  # repeated
        ("int8", lambda d: d.update(oidx=np.array([3, 1, 2, 3], "<u2").tobytes())),  # descending
        ("int8", lambda d: d.update(oidx=np.array([1, 16, 2, 3], "<u2").tobytes())),  # >= cols
        ("int8", lambda d: d.update(oval=np.array([1, np.nan, 2, 3], "<f2").tobytes())),
        ("int8", lambda d: d.update(odtype="f32")),  # oval length no longer fits
        ("int4", lambda d: d.update(q=b"\x08" + d["q"][1:])),  # nibble -8
        ("f32", lambda d: d.update(q=np.full(32, np.inf, "<f4").tobytes())),
        ("f32", lambda d: d.update(scale=b"\0\0\0\0")),
    ],
)
def test_malformed_dicts_raise_protocol_error(scheme, change):
    d = _valid(scheme)
    codec.decode(d)
    change(d)
    with pytest.raises(ProtocolError) as e:
        codec.decode(d)
    assert e.value.code == "bad_field"


def test_int4_padding_nibble_must_be_zero():
    d = codec.encode(states(rows=1)[:, :7], "int4", outliers=1)
    d["q"] = d["q"][:-1] + bytes([d["q"][-1] | 0x10])
    with pytest.raises(ProtocolError):
        codec.decode(d)
