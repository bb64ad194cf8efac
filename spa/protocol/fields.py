"""Typed, validated access to one unpacked msgpack map (docs/PROTOCOL.md §3).

Every defect is ProtocolError("bad_field", "<path>.<name>: <why>"), `path` naming the map
(e.g. `hello.options`), so an error says exactly which field was wrong.
"""

import math

import numpy as np

from spa.protocol import codec
from spa.protocol.errors import ProtocolError

INT32_MAX = (1 << 31) - 1  # positions, epochs, token ids, counts: a Java int
INT64_MAX = (1 << 63) - 1  # seeds: a Java long
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_LAYER = 1024
MAX_NAME = 256  # ids, fingerprints, hashes, codes


class Fields:
    """Typed access to one msgpack map; `path` names it in error messages."""

    def __init__(self, d, path: str):
        if not isinstance(d, dict):
            raise ProtocolError("bad_field", f"{path}: expected a map")
        self.d, self.path = d, path

    def _get(self, name: str):
        if name not in self.d:
            raise ProtocolError("bad_field", f"{self.path}.{name}: missing")
        return self.d[name]

    def bad(self, name: str, why: str):
        raise ProtocolError("bad_field", f"{self.path}.{name}: {why}")

    def integer(self, name: str, lo: int = 0, hi: int = INT32_MAX) -> int:
        v = self._get(name)
        if type(v) is not int or not lo <= v <= hi:  # bool is not an int here
            self.bad(name, f"expected an int in [{lo}, {hi}]")
        return v

    def number(self, name: str, lo: float) -> float:
        v = self._get(name)
        if type(v) not in (int, float) or not math.isfinite(v) or v < lo:
            self.bad(name, "expected a finite number" + ("" if lo == -math.inf else f" >= {lo:g}"))
        return float(v)

    def float32(self, name: str, lo: float) -> float:
        """A number read as a float32, whatever width it was packed with; finite as a float32 too."""
        v = self.number(name, lo)
        if abs(v) > FLOAT32_MAX:
            self.bad(name, "expected a finite float32")
        return float(np.float32(v))

    def flag(self, name: str) -> bool:
        v = self._get(name)
        if type(v) is not bool:
            self.bad(name, "expected a bool")
        return v

    def text(self, name: str, max_len: int | None = MAX_NAME, choices=None) -> str:
        v = self._get(name)
        if type(v) is not str or (max_len is not None and len(v) > max_len):
            self.bad(name, "expected a str" + ("" if max_len is None else f" of at most {max_len} characters"))
        if choices is not None and v not in choices:
            self.bad(name, f"expected one of {', '.join(choices)}")
        return v

    def blob(self, name: str) -> bytes:
        v = self._get(name)
        if type(v) is not bytes:
            self.bad(name, "expected bin (bytes)")
        return v

    def map(self, name: str) -> "Fields":
        return Fields(self._get(name), f"{self.path}.{name}")

    def numbers(self, name: str) -> dict:
        """A map of str -> finite int or float (stats, limits)."""
        v = self._get(name)
        if not isinstance(v, dict) or not all(
            type(k) is str and type(x) in (int, float) and math.isfinite(x) for k, x in v.items()
        ):
            self.bad(name, "expected a map of str to finite numbers")
        return v

    def layers(self, name: str) -> tuple[int, ...]:
        v = self._get(name)
        if (
            not isinstance(v, list)
            or not v
            or not all(type(x) is int and 0 <= x <= MAX_LAYER for x in v)
            or any(a >= b for a, b in zip(v, v[1:]))
        ):
            self.bad(name, f"expected a non-empty ascending list of ints in [0, {MAX_LAYER}]")
        return tuple(v)

    def activation(self, name: str) -> tuple[dict, np.ndarray]:
        """(the encoded map, its decoded float32 [rows, cols]): decoded here, once."""
        v = self._get(name)
        try:
            return v, codec.decode(v)
        except ProtocolError as e:
            self.bad(name, e.message)
