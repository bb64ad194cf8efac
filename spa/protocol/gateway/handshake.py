"""The checks of a `hello`, written once: for a new session and for a session
rebuilt from a resume hello (docs/PROTOCOL.md §4 `hello`, §7, §9).

`check_hello` returns the uploads decoded (the cloud-side projection, the
device's gate for pushed taps) or raises the ProtocolError a device gets.
"""

import hmac
from dataclasses import dataclass

import numpy as np

from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.limits import Limits


@dataclass(frozen=True)
class GateCopy:
    """The device's gate as uploaded for pushed taps (hello.gate)."""

    weight: np.ndarray  # float32 [2, H], or [2, H + 1] for a margin gate
    bias: np.ndarray  # float32 [2]
    tau: float


@dataclass(frozen=True)
class Uploads:
    # Cloud-side projection: weight float32 [n_taps, r, H] (widened from the uploaded float16),
    # bias float32 [n_taps, r]; None when not uploaded.
    projection: tuple[np.ndarray, np.ndarray] | None = None
    gate: GateCopy | None = None


def check_identity(hello: m.Hello, backbone: m.BackboneInfo, auth_token: str | None) -> None:
    """Who asks and for which backbone: the checks any hello passes first (a resume too)."""
    if auth_token is not None and not hmac.compare_digest(hello.token.encode(), auth_token.encode()):
        raise ProtocolError("unauthorized", "wrong or missing auth token")
    if hello.plugin.fingerprint != backbone.fingerprint:
        raise ProtocolError("backbone_mismatch", f"plugin is for backbone {hello.plugin.fingerprint!r}, this gateway "
                                                 f"serves {backbone.name} ({backbone.fingerprint!r})")
    if hello.plugin.taps[-1] > backbone.num_layers:
        raise ProtocolError("backbone_mismatch", f"tap {hello.plugin.taps[-1]} > {backbone.num_layers} layers")


def check_hello(hello: m.Hello, backbone: m.BackboneInfo, limits: Limits, auth_token: str | None) -> Uploads:
    """Everything a generation needs from its hello: identity, limits and the uploads."""
    check_identity(hello, backbone, auth_token)
    opts = hello.options
    if opts.window > limits.max_window:
        raise ProtocolError("limit", f"window {opts.window} > max_window {limits.max_window}")
    if opts.max_new_tokens > limits.max_new_tokens:
        raise ProtocolError("limit", f"max_new_tokens {opts.max_new_tokens} > {limits.max_new_tokens}")
    projection = gate = None
    if hello.projection is not None:
        shape = (len(hello.plugin.taps), hello.projection.rank)
        projection = (floats(hello.projection.weight, "<f2", (*shape, backbone.hidden_size), "hello.projection.weight"),
                      floats(hello.projection.bias, "<f4", shape, "hello.projection.bias"))
    if hello.gate is not None:
        width = backbone.hidden_size + opts.gate_margin  # a margin gate reads [f, m]
        gate = GateCopy(floats(hello.gate.weight, "<f4", (2, width), "hello.gate.weight"),
                        floats(hello.gate.bias, "<f4", (2,), "hello.gate.bias"), hello.gate.tau)
    return Uploads(projection, gate)


def floats(raw: bytes, dtype: str, shape: tuple, what: str) -> np.ndarray:
    """A little-endian array of `shape` from raw bytes, widened to float32; bad_field if it is not."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise ProtocolError("bad_field", f"{what}: {len(raw)} bytes, expected {expected} "
                                         f"({'x'.join(map(str, shape))} {np.dtype(dtype).name})")
    x = np.frombuffer(raw, dtype).reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise ProtocolError("bad_field", f"{what}: non-finite values")
    return x


def check_prompt(prompt_tokens: int, limits: Limits) -> None:
    if not 1 <= prompt_tokens <= limits.max_prompt_tokens:
        raise ProtocolError("limit", f"prompt has {prompt_tokens} tokens; allowed 1..{limits.max_prompt_tokens}")
