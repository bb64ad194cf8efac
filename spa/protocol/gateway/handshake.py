"""The checks of a `hello`, written once: for a new session and for a session
rebuilt from a resume hello (docs/PROTOCOL.md §4 `hello`, §7, §9).

`check_hello` returns the uploads decoded (the cloud-side projection, the
device's gate for pushed taps) or raises the ProtocolError a device gets.
"""

import hmac
from collections import OrderedDict
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


class ProjectionCache:
    """Cloud-side projection weights kept across sessions under their hash, so that a device names
    them (`hello.projection.hash`) instead of uploading ~1 MB in every hello. In memory only, never on
    disk; the least recently used go first beyond `capacity` plugins (0: keep none)."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._held: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        if digest in self._held:
            self._held.move_to_end(digest)
        return self._held.get(digest)

    def put(self, digest: str, weights: tuple[np.ndarray, np.ndarray]) -> None:
        if self.capacity <= 0:
            return
        self._held[digest] = weights
        self._held.move_to_end(digest)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)


def check_identity(hello: m.Hello, backbone: m.BackboneInfo, auth_token: str | None) -> None:
    """Who asks and for which backbone: the checks any hello passes first (a resume too)."""
    if auth_token is not None and not hmac.compare_digest(hello.token.encode(), auth_token.encode()):
        raise ProtocolError("unauthorized", "wrong or missing auth token")
    if hello.plugin.fingerprint != backbone.fingerprint:
        raise ProtocolError("backbone_mismatch", f"plugin is for backbone {hello.plugin.fingerprint!r}, this gateway "
                                                 f"serves {backbone.name} ({backbone.fingerprint!r})")
    if hello.plugin.taps[-1] > backbone.num_layers:
        raise ProtocolError("backbone_mismatch", f"tap {hello.plugin.taps[-1]} > {backbone.num_layers} layers")


def check_hello(hello: m.Hello, backbone: m.BackboneInfo, limits: Limits, auth_token: str | None,
                projections: ProjectionCache | None = None) -> Uploads:
    """Everything a generation needs from its hello: identity, limits and the uploads (projection
    weights named by hash come from `projections`; uploaded ones are kept there)."""
    check_identity(hello, backbone, auth_token)
    opts = hello.options
    if opts.window > limits.max_window:
        raise ProtocolError("limit", f"window {opts.window} > max_window {limits.max_window}")
    if opts.max_new_tokens > limits.max_new_tokens:
        raise ProtocolError("limit", f"max_new_tokens {opts.max_new_tokens} > {limits.max_new_tokens}")
    projection = gate = None
    if hello.projection is not None:
        projection = _projection(hello.projection, len(hello.plugin.taps), backbone.hidden_size, projections)
    if hello.gate is not None:
        width = backbone.hidden_size + opts.gate_margin  # a margin gate reads [f, m]
        gate = GateCopy(floats(hello.gate.weight, "<f4", (2, width), "hello.gate.weight"),
                        floats(hello.gate.bias, "<f4", (2,), "hello.gate.bias"), hello.gate.tau)
    return Uploads(projection, gate)


def _projection(proj: m.Projection, n_taps: int, hidden: int, projections: ProjectionCache | None):
    shape = (n_taps, proj.rank)
    if proj.weight is None:  # named by hash: weights an earlier session uploaded
        held = projections.get(proj.hash) if projections is not None else None
        if held is None:
            raise ProtocolError("upload_needed", "hello.projection.hash: this gateway does not hold these weights; "
                                                 "send hello.projection.weight and .bias")
        if held[0].shape != (*shape, hidden):
            raise ProtocolError("bad_field", f"hello.projection.hash: the weights it names are "
                                             f"{'x'.join(map(str, held[0].shape))}, not for rank {proj.rank} "
                                             f"and {n_taps} taps")
        return held
    if proj.hash is not None and proj.hash != m.Projection.hash_of(proj.weight, proj.bias):
        raise ProtocolError("bad_field", "hello.projection.hash: not the hash of the weights sent")
    weights = (floats(proj.weight, "<f2", (*shape, hidden), "hello.projection.weight"),
               floats(proj.bias, "<f4", shape, "hello.projection.bias"))
    if projections is not None:
        projections.put(proj.digest, weights)
    return weights


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
