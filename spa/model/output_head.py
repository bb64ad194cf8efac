"""The backbone's output head on the device, and the proof that settles a side token there.

A side token's token is `argmax lm_head(norm(f_t + ŝ_t))` (greedy; docs/DESIGN.md §1). The
output head (the final norm and `lm_head`) is a public part of an open model, so the device can
hold it: with the exact `f_t` (sent with the taps when the session settles) and its own decoded
side output `ŝ_t`, it computes the same logits as the gateway — up to float rounding, since a
reduction may sum in another order. `certify` returns the token only when it **provably** is the
gateway's: its logit beats every other token's by more than both sides' worst rounding error
together; otherwise None, and the device falls back to sending `side` and waiting for the
verdict (docs/PROTOCOL.md §6, "Settlement").

The bound. Elementwise float32 operations (the add `f + ŝ`, the scaling by the norm's weight)
round the same on every IEEE machine; only the two reductions may not: the norm's mean of squares
and each logit's dot product over H channels. With u = 2^-24 and γ = H·u / (1 − H·u), any summation
order is within γ·Σ|a_i b_i| of the exact sum; the norm's factor is then within γ + 8u relatively
(square root and reciprocal add a few ulps), each normalized channel within (H + 12)·u, and each
logit z_v within

    err_v = (2γ + (H + 12)·u) · (1 + (H + 12)·u) · S_v,     S_v = Σ_i |W_vi · y_i|

of the gateway's. The device certifies w when z_w − err_w > z_v + err_v for every v ≠ w (so the
gateway's argmax is w, ties impossible). S_v is bounded first by ||W_v||_1 · max|y| (precomputed
row norms) and computed exactly for the few rivals that bound leaves. Softcapping (Gemma) and
logit scaling are monotone: applied to the logits and, with a few ulps more, to the bounds.

Cost on the phone: the head in float32, [V, H] (SmolLM2: 49,152 × 576 = 113 MB; Gemma-3-270M:
262,144 × 640 = 671 MB), memory-mapped, and one [V, H] matrix-vector product per side token
(28 M multiply-adds for SmolLM2). Lower precisions (bf16, int8) would need their quantization
error in the bound, which measured far too loose to certify (issue 28's probe: int8 0 %).
"""

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spa.errors import SpaError
from spa.system.paths import cache_dir

U = 2.0 ** -24  # unit roundoff of float32


@dataclass(frozen=True)
class Certified:
    """The outcome of `OutputHead.certify` for one position."""

    token: int | None  # the gateway's token, proven; None: not provable (fall back to the verdict)
    best: int  # the device's own argmax
    gap: float  # its logit minus the runner-up's
    slack: float  # z_best - err_best - max over rivals of (z_v + err_v): > 0 exactly when proven


class OutputHead:
    """The final norm and lm_head of a backbone, in float32 numpy (no torch: a phone's runtime)."""

    def __init__(self, weight: np.ndarray, norm_weight: np.ndarray, eps: float, norm_offset: float,
                 bias: np.ndarray | None = None, softcap: float | None = None, scale: float | None = None,
                 fingerprint: str = "", pieces: list[bytes] | None = None):
        """`weight` [V, H] float32 (lm_head), `norm_weight` [H]; the norm is
        `x / sqrt(mean(x²) + eps) * (norm_offset + norm_weight)` (Llama: offset 0, Gemma: 1).
        `pieces`: every token's bytes (a settled token is shown without the gateway's help)."""
        self.pieces = pieces or []
        self.weight = weight
        self.norm_weight = np.asarray(norm_weight, np.float32)
        self.norm_factor = (np.float32(norm_offset) + self.norm_weight).astype(np.float32)
        self.eps = np.float32(eps)
        self.norm_offset = float(norm_offset)
        self.bias = None if bias is None else np.asarray(bias, np.float32)
        self.softcap, self.scale = softcap, scale
        self.fingerprint = fingerprint
        self.vocab_size, self.hidden_size = weight.shape
        h = self.hidden_size
        gamma = h * U / (1 - h * U)
        self.c = (2 * gamma + (h + 12) * U) * (1 + (h + 12) * U) * 1.05  # 5 % to spare
        self.row_l1 = np.abs(weight).sum(axis=1, dtype=np.float64)  # ||W_v||_1, for the cheap first bound

    # --- what the gateway computes --------------------------------------------------------------

    def normalized(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1)
        var = np.mean(x * x, dtype=np.float32)
        return (x * np.float32(1.0 / np.sqrt(var + self.eps, dtype=np.float32))).astype(np.float32) * self.norm_factor

    def logits(self, x: np.ndarray) -> np.ndarray:
        """lm_head(norm(x)) for one state x [H], float32 [V] (before softcapping and scaling)."""
        z = self.weight @ self.normalized(x)
        return z if self.bias is None else z + self.bias

    # --- the proof ----------------------------------------------------------------------------------

    def certify(self, f: np.ndarray, s: np.ndarray) -> Certified:
        """Greedy token of lm_head(norm(f + s)) if provably the gateway's (f: the exact f_t, s: the
        side output as the gateway decodes it, both [H] float32)."""
        x = np.asarray(f, np.float32).reshape(-1) + np.asarray(s, np.float32).reshape(-1)  # as the cloud adds
        y = self.normalized(x)
        z = (self.weight @ y).astype(np.float64)
        if self.bias is not None:
            z += self.bias
        err = self.c * self.row_l1 * float(np.max(np.abs(y)))  # every row, cheaply
        raw = z  # before softcapping and scaling: the rivals' exact bounds are transformed from it
        z, err = self._monotone(z, err)
        best = int(np.argmax(z))
        order = np.argsort(-z)
        gap = float(z[order[0]] - z[order[1]])
        # Rivals: tokens that the cheap bound cannot rule out; their bound is computed exactly.
        rivals = np.flatnonzero(z + err >= z[best] - err[best])
        if len(rivals) > 1:
            exact = self.c * (np.abs(self.weight[rivals]) @ np.abs(y)).astype(np.float64)
            _, exact = self._monotone(raw[rivals], exact)
            err[rivals] = exact
        reach = z + err
        reach[best] = -np.inf
        slack = float(z[best] - err[best] - np.max(reach))
        return Certified(best if slack > 0 else None, best, gap, slack)

    def _monotone(self, z: np.ndarray, err: np.ndarray):
        """The family's monotone transforms after lm_head, applied to logits and bounds."""
        if self.softcap:
            cap = self.softcap
            lo, hi = np.tanh((z - err) / cap) * cap, np.tanh((z + err) / cap) * cap
            z = np.tanh(z / cap) * cap
            err = np.maximum(z - lo, hi - z) + 8 * U * cap  # tanh rounds within a few ulps
        if self.scale:
            z, err = z * self.scale, err * abs(self.scale) + 2 * U * np.abs(z * self.scale)
        return z, err

    # --- files ----------------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        from safetensors.numpy import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(piece) for piece in self.pieces], np.int64)
        tensors = {"weight": np.ascontiguousarray(self.weight, np.float32), "norm_weight": self.norm_weight,
                   "piece_bytes": np.frombuffer(b"".join(self.pieces) or b"\0", np.uint8).copy(),
                   "piece_lengths": lengths}
        if self.bias is not None:
            tensors["bias"] = self.bias
        meta = {"eps": repr(float(self.eps)), "norm_offset": repr(self.norm_offset),
                "softcap": repr(self.softcap), "scale": repr(self.scale), "fingerprint": self.fingerprint}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # atomic: a reader never sees half a head
        return path

    @classmethod
    def load(cls, path: Path) -> "OutputHead":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata()
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError) as exc:
            raise SpaError(f"cannot read the output head {path}: {exc}") from None
        number = lambda k: None if meta[k] == "None" else float(meta[k])  # noqa: E731
        raw, ends = t["piece_bytes"].tobytes(), np.cumsum(t["piece_lengths"])
        pieces = [raw[end - n:end] for end, n in zip(ends.tolist(), t["piece_lengths"].tolist())]
        return cls(t["weight"], t["norm_weight"], float(meta["eps"]), float(meta["norm_offset"]), t.get("bias"),
                   number("softcap"), number("scale"), meta["fingerprint"], pieces)


def head_of(backbone) -> OutputHead:
    """The output head of a loaded backbone (spa.model.backbone.Backbone), checked against the
    backbone's own logits: a family whose head this module does not reproduce is refused."""
    import torch

    from spa.model.token_bytes import token_pieces

    if backbone.dtype != torch.float32:
        raise SpaError(f"settlement needs the backbone's logits in float32 (this one runs {backbone.dtype})")
    norm, head, cfg = backbone.norm, backbone.lm_head, backbone.config
    kind = type(norm).__name__
    offsets = {"LlamaRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "Qwen3RMSNorm": 0.0, "MistralRMSNorm": 0.0,
               "Phi3RMSNorm": 0.0, "Gemma3RMSNorm": 1.0, "GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0}
    if kind not in offsets:
        raise SpaError(f"the output head of {type(backbone.model).__name__} ({kind}) is not supported for "
                       f"settlement; the device falls back to the gateway's verdicts")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    scale = None
    if getattr(cfg, "logits_scaling", None):
        scale = 1.0 / cfg.logits_scaling
    out = OutputHead(head.weight.detach().to("cpu", torch.float32).numpy(),
                     norm.weight.detach().to("cpu", torch.float32).numpy(), float(eps), offsets[kind],
                     None if head.bias is None else head.bias.detach().to("cpu", torch.float32).numpy(),
                     getattr(cfg, "final_logit_softcapping", None) or None, scale, backbone.identity.fingerprint,
                     token_pieces(backbone.tokenizer))
    rng = np.random.default_rng(0)
    for _ in range(3):  # the head reproduces the backbone's logits within the rounding bound
        f = rng.normal(0, 30, backbone.hidden_size).astype(np.float32)
        mine, _ = out._monotone(out.logits(f).astype(np.float64), np.zeros(out.vocab_size))
        theirs = backbone.logits(torch.from_numpy(f)).numpy().astype(np.float64)
        y = out.normalized(f)
        allowed = out.c * (np.abs(out.weight) @ np.abs(y)) + 1e-3 * bool(out.softcap or out.scale)
        if not np.all(np.abs(mine - theirs) <= allowed):
            raise SpaError(f"the output head of {type(backbone.model).__name__} is not reproduced within the "
                           f"rounding bound (max difference {np.max(np.abs(mine - theirs)):.3g}); no settlement")
    return out


def head_path(fingerprint: str) -> Path:
    """Where the output head of the backbone with this fingerprint is kept (one per backbone, shared
    by every plugin of it): `<cache>/heads/<fingerprint>.safetensors`."""
    safe = hashlib.sha256(fingerprint.encode()).hexdigest()[:32] if not fingerprint.isalnum() else fingerprint
    return cache_dir() / "heads" / f"{safe}.safetensors"


def export_head(backbone) -> Path:
    """Write the backbone's output head where devices of this machine find it (once per backbone)."""
    path = head_path(backbone.identity.fingerprint)
    if not path.exists():
        head_of(backbone).save(path)
    return path


def ensure_head(recorded: dict, backbone_path=None, log=print) -> Path | None:
    """The output head of the backbone a plugin records (`config.backbone`), written once to the cache:
    from `backbone_path` if given, else from a named backbone already converted here whose
    fingerprint matches. None (with a line saying why) where none is at hand or its family's head is
    not supported: devices then fall back to the gateway's verdicts."""
    from spa.model.backbone import IDENTITY_FILE, NAMED_BACKBONES, load_backbone

    path = head_path(recorded["fingerprint"])
    if path.exists():
        return path
    converted = [name for name, spec in NAMED_BACKBONES.items() if spec.name == recorded.get("name")
                 and (cache_dir() / "backbones" / spec.name / IDENTITY_FILE).exists()]
    candidates = [backbone_path] if backbone_path else converted
    for candidate in candidates:
        try:
            backbone = load_backbone(candidate)
        except SpaError:
            continue
        if backbone.identity.fingerprint != recorded["fingerprint"]:
            continue
        try:
            log(f"writing the output head of {backbone.identity.name} for settlement ({path})...")
            return export_head(backbone)
        except SpaError as exc:
            log(f"no output head: {exc}")
            return None
    log(f"no output head for backbone {recorded.get('name')!r} here (give --backbone DIR): devices will not settle")
    return None


def find_head(fingerprint: str) -> OutputHead | None:
    """The cached output head of this backbone, or None if it was never exported here (loaded once
    per process: it is large)."""
    path = head_path(fingerprint)
    if not path.exists():
        return None
    head = _load_once(str(path), path.stat().st_mtime_ns)
    if head.fingerprint != fingerprint:
        raise SpaError(f"{path} holds the head of backbone {head.fingerprint!r}, not {fingerprint!r}")
    return head


@functools.lru_cache(maxsize=2)
def _load_once(path: str, mtime_ns: int) -> OutputHead:
    return OutputHead.load(Path(path))
