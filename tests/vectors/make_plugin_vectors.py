"""Regenerate the shared plugin vectors: a small plugin plus eager-torch outputs.

    PYTHONPATH=. python tests/vectors/make_plugin_vectors.py

Writes `plugin_vectors/` (config.json + plugin.safetensors, as `spa train`
saves a plugin), `plugin_vectors_margin/` (the same shape with a margin gate:
its gate reads [f_t, m_t], spa/model/plugin.py MARGIN_GATE) and `plugin_vectors.json`:
inputs and the eager-torch outputs of spa/model/plugin.py for them. The Java host executor (android_demo, JUnit) and
tests/android/test_host.py both check these files, so a drift on either side shows.

The plugin has the real SmolLM2 shape (H = 576) with 4 taps and rank 8, so the
files stay small; its backbone identity is made up. Weights are torch's
default initialization (seeded) with a non-zero W_out, so every path of the
side network contributes. Inputs look like SmolLM2 states: N(0, 15) with a few
channels near +-2000.

Floats are hex of little-endian float32 (inputs, p, s) or float64 (the erf
table: math.erf, to check a Java erf, which java.lang.Math lacks).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from spa.model.plugin import MARGIN_GATE, Plugin, PluginConfig, save_plugin

HERE = Path(__file__).parent
PLUGIN_DIR = HERE / "plugin_vectors"
MARGIN_PLUGIN_DIR = HERE / "plugin_vectors_margin"
MARGINS = [0.0, 0.3, 2.5, 11.0, 40.0]  # the margin gate's inputs: a tie, close calls, confident choices
OUT = HERE / "plugin_vectors.json"
H, TAPS, RANK = 576, [0, 10, 20, 30], 8
OUTLIER_CHANNELS = [3, 77, 300, 511]
BACKBONE = {"name": "vectors-fake-backbone", "fingerprint": "vectors-0000000000", "num_layers": 30,
            "hidden_size": H, "vocab_size": 49152}
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "{document}\n\n{instruction}<|im_end|>\n<|im_start|>assistant\n")


def make_plugin(gate_input: str = "rms_normalized_f") -> Plugin:
    torch.manual_seed(20240601)
    config = PluginConfig(backbone=BACKBONE, taps=TAPS, rank=RANK, side_scale=12.5, tau=0.5, profile="vectors",
                          prompt_template=TEMPLATE, instruction="Summarize this paper in one sentence.",
                          gate_input=gate_input)
    plugin = Plugin(config)
    with torch.no_grad():  # W_out starts at zero in a fresh plugin; give it weights
        torch.nn.init.normal_(plugin.side.w_out.weight, std=0.3)
        torch.nn.init.normal_(plugin.side.w_out.bias, std=0.05)
        # Larger gate weights than the default init, so p spreads over (0, 1) instead of sitting near 0.5.
        torch.nn.init.normal_(plugin.gate.classifier.weight, std=0.1)
        if config.gate_margin:  # a margin weight like a trained one: confident choices close the gate
            plugin.gate.classifier.weight[:, -1] = torch.tensor([0.9, -0.9])
    return plugin.eval()


def states(rng, rows: int, scale: float = 15.0) -> np.ndarray:
    x = rng.normal(0, scale, (rows, H)).astype(np.float32)
    x[:, OUTLIER_CHANNELS] = (rng.choice([-1, 1], (rows, len(OUTLIER_CHANNELS)))
                              * rng.uniform(1500, 2500, (rows, len(OUTLIER_CHANNELS))))
    return x


def f32hex(x) -> str:
    return np.asarray(x, dtype="<f4").tobytes().hex()


def erf_table() -> list[dict]:
    xs = [0.0, 1e-300, 1e-8, 0.1, 0.4999, 0.5, 0.5001, 1.0, 2.0, 3.9999, 4.0, 4.0001, 5.5, 5.9999, 6.0, 7.5, 30.0]
    xs += list(np.linspace(-6.5, 6.5, 261))
    xs += [-x for x in xs[:17]]
    return [{"x": np.float64(x).tobytes().hex(), "erf": np.float64(math.erf(x)).tobytes().hex()} for x in xs]


def main() -> None:
    plugin = make_plugin()
    digest = save_plugin(plugin, PLUGIN_DIR)
    rng = np.random.default_rng(7)
    gate_inputs = np.concatenate([states(rng, 4), states(rng, 1, scale=0.5)])  # a small-norm row too
    side_inputs = [states(rng, len(TAPS)) for _ in range(3)]
    with torch.no_grad():
        p = [plugin.gate(torch.from_numpy(f)[None])[0, 0].item() for f in gate_inputs]
        s = [plugin.side(torch.from_numpy(t)[None])[0].numpy() for t in side_inputs]
    margin_plugin = make_plugin(MARGIN_GATE)
    margin_digest = save_plugin(margin_plugin, MARGIN_PLUGIN_DIR)
    margin_rows = np.concatenate([states(np.random.default_rng(11), len(MARGINS)),
                                  np.array(MARGINS, np.float32)[:, None]], axis=1)
    with torch.no_grad():
        margin_p = [margin_plugin.gate(torch.from_numpy(r)[None])[0, 0].item() for r in margin_rows]
    doc = {
        "about": "SPA plugin vectors: eager spa/model/plugin.py outputs for a small plugin; see make_plugin_vectors.py",
        "plugin_dir": PLUGIN_DIR.name,
        "content_hash": digest,
        "hidden_size": H,
        "taps": TAPS,
        "tolerance": {"gate_abs": 1e-6, "side_rel_to_max_abs": 1e-5},
        "gate": [{"f": f32hex(f), "p": f32hex([pi])} for f, pi in zip(gate_inputs, p)],
        "side": [{"taps": f32hex(t), "s": f32hex(si)} for t, si in zip(side_inputs, s)],
        "erf": erf_table(),
        "margin_plugin_dir": MARGIN_PLUGIN_DIR.name,
        "margin_content_hash": margin_digest,
        # The margin gate's input rows: f_t [H], then the step's margin m_t.
        "margin_gate": [{"row": f32hex(r), "p": f32hex([pi])} for r, pi in zip(margin_rows, margin_p)],
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {PLUGIN_DIR} (hash {digest}), {MARGIN_PLUGIN_DIR} (hash {margin_digest}) and {OUT}: "
          f"p = {[round(x, 4) for x in p]}, margin gate p = {[round(x, 4) for x in margin_p]}, "
          f"max|s| = {[float(np.abs(x).max()) for x in s]}")


if __name__ == "__main__":
    main()
