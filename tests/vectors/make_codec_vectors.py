"""Regenerate codec_vectors.json, the codec cases every client must reproduce.

    PYTHONPATH=. python tests/vectors/make_codec_vectors.py

Floats are hex of little-endian float32; byte fields are hex. A client checks
that encoding `input_f32` gives `encoded` and that decoding `encoded` gives
`decoded_f32`, bit for bit. Only decoding must match for interoperability;
matching the encoder too keeps the reference path identical across clients.
"""

import json
from pathlib import Path

import numpy as np

from spa.protocol import codec

OUT = Path(__file__).with_name("codec_vectors.json")


def inputs() -> dict[str, tuple[np.ndarray, str, int]]:
    rng = np.random.default_rng(20240601)
    base = (rng.normal(0, 15, (2, 9)) * [[1], [0.01]]).astype(np.float32)
    base[:, 4] = [2100.5, -1875.25]  # an outlier channel, as in transformer states
    ties = np.array([[0.5, -3, 3, 0, 3, -0.25, 1, 2, -2]], np.float32)  # ties at |3|
    zero = np.zeros((1, 9), np.float32)
    overflow = base.copy()
    overflow[1, 7] = -70000.0  # beyond fp16's 65504: all outliers go as fp32
    return {
        "int8": (base, "int8", 2),
        "int4": (base, "int4", 2),  # 9 columns: each row ends in a padding nibble
        "int8_fp32_outliers": (overflow, "int8", 2),
        "int8_ties_and_zero_row": (np.concatenate([ties, zero]), "int8", 2),
        "int8_no_outliers": (base, "int8", 0),
        "f32": (base, "f32", 0),
    }


def case(name: str, x: np.ndarray, scheme: str, outliers: int) -> dict:
    d = codec.encode(x, scheme, outliers)
    return {
        "name": name,
        "scheme": scheme,
        "outliers": outliers,
        "shape": list(x.shape),
        "input_f32": x.astype("<f4").tobytes().hex(),
        "encoded": {
            "scheme": d["scheme"],
            "shape": d["shape"],
            "odtype": d["odtype"],
            **{k: d[k].hex() for k in ("q", "scale", "oidx", "oval")},
        },
        "decoded_f32": codec.decode(d).astype("<f4").tobytes().hex(),
    }


def main() -> None:
    cases = [case(name, *args) for name, args in inputs().items()]
    doc = {"about": "SPA activation codec test vectors; see docs/PROTOCOL.md section 5", "cases": cases}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
