"""Cloud-side projection: the side network's per-tap projections run in the cloud.

Without it, a sigma = 1 position moves all its taps down: len(taps) x H values
(31 x 576 for SmolLM2). The first layer of the side network reads each tap on
its own (`W_in rms(h^0)`, `Down_l rms(h^l)`), so the cloud can apply it and
send len(taps) x r values instead (r = 32): ~18x fewer. The price is privacy:
the device uploads those projection weights. The user chooses it
(`spa summarize` asks by default, `--no-cloud-projection`); the gateway keeps the weights in memory
under their hash (so they cross once per plugin and gateway) and never writes them anywhere.

Weights travel as float16 (half the bytes; the whole upload for 31 taps x 32
x 576 is 1.1 MB) and both the gateway and the in-process reference compute
with exactly those float16 values widened to float32, through `project`.
"""

import numpy as np
import torch

from spa.model.plugin import rms


def projection_weights(state: dict, n_taps: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight float16 [n_taps, r, H], bias float32 [n_taps, r]) from a plugin's state dict."""
    names = ["side.w_in"] + [f"side.down.{i}" for i in range(n_taps - 1)]
    weight = np.stack([state[f"{n}.weight"].detach().numpy() for n in names]).astype(np.float16)
    bias = np.stack([state[f"{n}.bias"].detach().numpy() for n in names]).astype(np.float32)
    return weight, bias


def load_projection_weights(safetensors_path, n_taps: int) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.torch import load_file

    return projection_weights(load_file(safetensors_path), n_taps)


def project(taps: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-tap projections [n_taps, r] of one position's taps [n_taps, H]."""
    x = rms(torch.from_numpy(np.ascontiguousarray(taps, dtype=np.float32)))
    w = torch.from_numpy(np.asarray(weight, dtype=np.float32))  # no copy when the gateway widened it already
    out = torch.einsum("nh,nrh->nr", x, w) + torch.from_numpy(bias)
    return out.numpy()
