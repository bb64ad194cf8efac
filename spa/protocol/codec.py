"""Activation codec: float32 matrices [rows, cols] <-> msgpack-friendly dicts.

Transformer hidden states have a few huge channels (SmolLM2: |x| up to ~2500
where the median is ~15). Absmax int8 would spend its whole range on them and
flatten everything else, so each row sends its k largest-|x| channels apart
(fp16, fp32 if fp16 would overflow) and quantizes the rest with a per-row scale.

The decoder is specified byte by byte in docs/PROTOCOL.md §5 and must give
bit-identical float32 results in Java: every step is one IEEE float32 operation
(q * scale) or an exact conversion (int -> float32, fp16 -> float32).
"""

import numpy as np

from spa.protocol.errors import ProtocolError

SCHEMES = ("int8", "int4", "f32")
LEVELS = {"int8": 127, "int4": 7}  # symmetric: -128 and -8 are never produced
FP16_MAX = 65504.0
MAX_COLS = 1 << 16  # outlier indices are uint16
FIELDS = ("scheme", "shape", "q", "scale", "oidx", "oval", "odtype")


def encode(x: np.ndarray, scheme: str = "int8", outliers: int = 8) -> dict:
    """Encode a finite float matrix [rows, cols]; see the module docstring."""
    x = _checked_input(x)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme == "f32":
        return _fields("f32", x.shape, x.astype("<f4").tobytes(), b"", b"", b"", "f16")
    if not isinstance(outliers, int) or outliers < 0:
        raise ValueError(f"outliers must be an int >= 0, got {outliers!r}")

    rows, cols = x.shape
    k = min(outliers, cols)
    # Stable sort on -|x|: among equal magnitudes the lower index comes first.
    idx = np.sort(np.argsort(-np.abs(x), axis=1, kind="stable")[:, :k], axis=1)
    oval = np.take_along_axis(x, idx, axis=1)
    rest = x.copy()
    np.put_along_axis(rest, idx, 0.0, axis=1)

    levels = LEVELS[scheme]
    scale = np.abs(rest).max(axis=1) / np.float32(levels)  # float32 division
    scale[scale == 0] = 1.0  # all-zero row, or a max so small that /levels underflows
    q = np.clip(np.rint(rest / scale[:, None]), -levels, levels).astype(np.int8)

    odtype = "f32" if np.any(np.abs(oval) > FP16_MAX) else "f16"
    qbytes = q.tobytes() if scheme == "int8" else _pack_nibbles(q)
    return _fields(
        scheme,
        x.shape,
        qbytes,
        scale.astype("<f4").tobytes(),
        idx.astype("<u2").tobytes(),
        oval.astype("<f2" if odtype == "f16" else "<f4").tobytes(),
        odtype,
    )


def decode(d: dict) -> np.ndarray:
    """Decode and validate an encoded dict; any defect raises ProtocolError("bad_field")."""
    if not isinstance(d, dict):
        _bad("expected a map")
    missing = [f for f in FIELDS if f not in d]
    if missing:
        _bad(f"missing {', '.join(missing)}")
    scheme, odtype = d["scheme"], d["odtype"]
    if scheme not in SCHEMES:  # also rejects non-strings
        _bad(f"unknown scheme {scheme!r}")
    if odtype not in ("f16", "f32"):
        _bad(f"odtype must be 'f16' or 'f32', got {odtype!r}")
    rows, cols = _checked_shape(d["shape"])
    for name in ("q", "scale", "oidx", "oval"):
        if not isinstance(d[name], bytes):
            _bad(f"{name} must be bytes")

    if scheme == "f32":
        _expect_len("q", d["q"], rows * cols * 4)
        for name in ("scale", "oidx", "oval"):
            _expect_len(name, d[name], 0)
        out = np.frombuffer(d["q"], "<f4").astype(np.float32).reshape(rows, cols)
        return _finite(out)

    q = _unpack_q(scheme, d["q"], rows, cols)
    _expect_len("scale", d["scale"], rows * 4)
    scale = np.frombuffer(d["scale"], "<f4").astype(np.float32)
    if not np.all(np.isfinite(scale) & (scale > 0)):
        _bad("every scale must be finite and > 0")

    if len(d["oidx"]) % (2 * rows):
        _bad(f"oidx length {len(d['oidx'])} is not a multiple of 2 * rows")
    k = len(d["oidx"]) // (2 * rows)
    if k > cols:
        _bad(f"{k} outliers per row but only {cols} columns")
    _expect_len("oval", d["oval"], rows * k * (2 if odtype == "f16" else 4))
    idx = np.frombuffer(d["oidx"], "<u2").astype(np.int64).reshape(rows, k)
    if k and (idx.max() >= cols or np.any(np.diff(idx, axis=1) <= 0)):
        _bad("outlier indices must be < cols and strictly ascending in each row")
    oval = np.frombuffer(d["oval"], "<f2" if odtype == "f16" else "<f4")
    oval = oval.astype(np.float32).reshape(rows, k)

    with np.errstate(over="ignore"):  # a hostile scale may overflow; _finite rejects it
        out = q.astype(np.float32) * scale[:, None]  # one float32 multiply per value
    np.put_along_axis(out, idx, oval, axis=1)
    return _finite(out)


def quantize(x: np.ndarray, scheme: str = "int8", outliers: int = 8) -> np.ndarray:
    """What the receiver sees: decode(encode(x)). The in-process reference uses it."""
    return decode(encode(x, scheme, outliers))


def encoded_size(d: dict) -> int:
    """Payload bytes of an encoded dict (before msgpack framing and zstd)."""
    return sum(len(d[name]) for name in ("q", "scale", "oidx", "oval"))


def _checked_input(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or not 1 <= x.shape[1] <= MAX_COLS:
        raise ValueError(f"expected a [rows >= 1, 1 <= cols <= {MAX_COLS}] matrix, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot encode non-finite values (NaN or inf)")
    return x


def _fields(scheme, shape, q, scale, oidx, oval, odtype) -> dict:
    return {
        "scheme": scheme,
        "shape": [int(shape[0]), int(shape[1])],
        "q": q,
        "scale": scale,
        "oidx": oidx,
        "oval": oval,
        "odtype": odtype,
    }


def _pack_nibbles(q: np.ndarray) -> bytes:
    """Two's complement nibbles, even column in the low nibble; odd rows padded with 0."""
    rows, cols = q.shape
    padded = np.zeros((rows, cols + cols % 2), np.int8)
    padded[:, :cols] = q
    nib = padded.view(np.uint8) & 0x0F
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_q(scheme: str, data: bytes, rows: int, cols: int) -> np.ndarray:
    if scheme == "int8":
        _expect_len("q", data, rows * cols)
        q = np.frombuffer(data, np.int8).reshape(rows, cols)
        if np.any(q == -128):
            _bad("int8 value -128 is not allowed (range is -127..127)")
        return q
    per_row = (cols + 1) // 2
    _expect_len("q", data, rows * per_row)
    packed = np.frombuffer(data, np.uint8).reshape(rows, per_row)
    nib = np.empty((rows, per_row * 2), np.int16)
    nib[:, 0::2] = packed & 0x0F
    nib[:, 1::2] = packed >> 4
    if np.any(nib == 8):
        _bad("int4 value -8 is not allowed (range is -7..7)")
    if cols % 2 and np.any(nib[:, -1]):
        _bad("int4 padding nibble must be 0")
    nib[nib > 7] -= 16
    return nib[:, :cols]


def _checked_shape(shape) -> tuple[int, int]:
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(v) is int for v in shape)
        or shape[0] < 1
        or not 1 <= shape[1] <= MAX_COLS
    ):
        _bad(f"shape must be a list [rows >= 1, 1 <= cols <= {MAX_COLS}]")
    return shape[0], shape[1]


def _expect_len(name: str, data: bytes, n: int) -> None:
    if len(data) != n:
        _bad(f"{name} has {len(data)} bytes, expected {n}")


def _finite(out: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(out)):
        _bad("decoded values are not all finite")
    return out


def _bad(message: str):
    raise ProtocolError("bad_field", message)
