"""A plugin's training program run by the ExecuTorch runtime: the device's half of learning.

`spa export` writes the program (export/training_program.py: plugin-train.pte, the weights
in plugin-train.ptd, plugin-train.json). Here the device loads it with ExecuTorch's training
API (`TrainingModule`: forward and backward in one call, the loss first, then the
gradients), and steps the weights with ExecuTorch's SGD optimizer. Eager torch never stands
in for the device: torch tensors here only carry data in and out of the runtime.

**The optimizer.** `spa train` uses AdamW; ExecuTorch ships only SGD. So the device keeps
Adam's two moment arrays itself (float32, the size of the trained weights: 2.4 MB for
SmolLM2 with all 31 taps), computes AdamW's step from the gradients exactly as
`torch.optim.AdamW` does, and hands it to ExecuTorch's SGD as the "gradient" with learning
rate 1: `w <- w - 1 * step`. The Android app does the same with
`org.pytorch.executorch.training.SGD` (android_demo: ExecuTorchTrainer).

**The output head** (final norm and lm_head, [V, H] float32) is an input of the loss methods:
the device holds it for settlement already (spa/model/output_head.py), so the training
program carries no copy (a constant would add 113 MB to it for SmolLM2).

One `Trainee` is one trained part (the side network through `side_loss` or `mix_loss`, or
the gate through `gate_loss`) in its own loaded program: ExecuTorch keeps each training
method's parameters in that method's memory, initialised from the weights file it was
loaded with.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spa.errors import PluginError
from spa.system.quiet import quiet_native_stderr

TRAIN_PTE, TRAIN_PTD, TRAIN_JSON = "plugin-train.pte", "plugin-train.ptd", "plugin-train.json"
PROGRAM_FORMAT = 1


@dataclass(frozen=True)
class ProgramInfo:
    """plugin-train.json: batch sizes and where each weight lies in the weights file."""

    batch: int
    gate_batch: int
    vocab_size: int
    head_fingerprint: str
    content_hash: str  # of the plugin the program was exported from
    program_sha256: str
    layout: dict  # name -> {"offset", "bytes", "dtype", "shape"} in the .ptd
    weights: tuple[str, ...]  # the plugin's state-dict names

    @classmethod
    def read(cls, path: Path) -> "ProgramInfo":
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != PROGRAM_FORMAT:
                raise PluginError(f"{path}: training program format {d.get('format')} is not supported")
            return cls(d["batch"], d["gate_batch"], d["vocab_size"], d["head_fingerprint"], d["content_hash"],
                       d["program_sha256"], d["layout"], tuple(d["weights"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PluginError(f"{path} is not a training program description ({exc}); export the plugin again") \
                from None


def read_weights(ptd: bytes, info: ProgramInfo) -> dict[str, np.ndarray]:
    """The plugin's weights (float32 arrays by state-dict name) from a weights file's bytes."""
    out = {}
    for name in info.weights:
        at = info.layout[name]
        out[name] = np.frombuffer(ptd, "<f4", at["bytes"] // 4, at["offset"]).reshape(at["shape"]).copy()
    return out


def patched_weights(ptd: bytes, info: ProgramInfo, weights: dict[str, np.ndarray]) -> bytes:
    """A weights file holding `weights` (by name, float32, each its recorded shape) instead of its own."""
    data = bytearray(ptd)
    for name, value in weights.items():
        at = info.layout[name]
        raw = np.ascontiguousarray(value, "<f4").tobytes()
        if list(np.shape(value)) != at["shape"] or len(raw) != at["bytes"]:
            raise PluginError(f"weight {name}: shape {list(np.shape(value))}, the program expects {at['shape']}")
        data[at["offset"]:at["offset"] + len(raw)] = raw
    return bytes(data)


class AdamW:
    """torch.optim.AdamW's update (default betas and eps, no amsgrad), as the step that
    ExecuTorch's SGD applies with learning rate 1."""

    def __init__(self, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.wd, (self.b1, self.b2), self.eps = lr, weight_decay, betas, eps
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def steps(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per weight, what to subtract: lr * wd * w + lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)."""
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        f32 = np.float32
        out = {}
        for name, g in grads.items():
            m = self.m.setdefault(name, np.zeros_like(g))
            v = self.v.setdefault(name, np.zeros_like(g))
            m += (g - m) * f32(1 - self.b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= f32(self.b2)
            v += g * g * f32(1 - self.b2)
            denom = np.sqrt(v) / f32(np.sqrt(bc2)) + f32(self.eps)
            out[name] = params[name] * f32(self.lr * self.wd) + f32(self.lr / bc1) * m / denom
        return out


def load_module(pte: Path, ptd: Path):
    """The program with these weights, through ExecuTorch's training API."""
    with quiet_native_stderr():
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        try:
            return TrainingModule(_load_for_executorch(str(pte), str(ptd)))
        except Exception as exc:  # the runtime raises RuntimeError/ValueError variants
            raise PluginError(f"{pte} with {ptd} is not a loadable training program: {exc}") from None


class Trainee:
    """One training method of the program with its own parameters, stepped by AdamW through
    ExecuTorch's SGD. `run(inputs)` is one forward and backward (the gradients are kept for
    `step`; call it without `step` to evaluate)."""

    def __init__(self, pte: Path, ptd: Path, method: str, lr: float, weight_decay: float = 0.01):
        self.module, self.method = load_module(pte, ptd), method
        self.optimizer = AdamW(lr, weight_decay)
        self._sgd = None

    def run(self, inputs: tuple) -> list[torch.Tensor]:
        return self.module.forward_backward(self.method, inputs)

    def params(self) -> dict[str, torch.Tensor]:
        """The method's parameters: tensors over the runtime's own memory (a forward ran first)."""
        return self.module.named_parameters()

    def weights(self) -> dict[str, np.ndarray]:
        """A copy of the current weights."""
        return {k: v.detach().numpy().copy() for k, v in self.params().items()}

    def gradients(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.module.named_gradients().items()}

    def step(self, grads: dict[str, np.ndarray] | None = None) -> None:
        """One AdamW step from `grads` (default: those of the last run), applied by ExecuTorch's SGD."""
        from executorch.extension.training import get_sgd_optimizer

        if self._sgd is None:
            self._sgd = get_sgd_optimizer(self.params(), 1.0, 0, 0, 0, False)
        params = {k: v.detach().numpy() for k, v in self.params().items()}
        steps = self.optimizer.steps(params, self.gradients() if grads is None else grads)
        self._sgd.step({k: torch.from_numpy(v) for k, v in steps.items()})


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """rows [n, ...] padded with zero rows to [size, ...]."""
    out = np.zeros((size, *rows.shape[1:]), rows.dtype)
    out[:len(rows)] = rows
    return out
