"""`spa export`: plugin directory -> `.pte` variants, verified by the ExecuTorch runtime.

Writes into OUTDIR:
    plugin-fp32.pte, plugin-int8.pte   one program per variant (methods gate, side)
    config.json, plugin.safetensors    the plugin itself, for the cloud-side projection
                                       option and the Java host executor
    manifest.json                      variants, sizes, sha256 and measured parity

Parity: each `.pte` is loaded by the ExecuTorch runtime and run on the same
inputs as the eager plugin. Inputs are synthetic backbone-like states
(normal(0, 15) with a few channels at +-2000, the shape of SmolLM2's states).
The side error is the larger of `side(taps)` and `side_projected(project(taps))`.
Tolerances (max absolute error):
    fp32: gate 1e-4, side 1e-4 * max(1, max|s|)   (float reassociation in XNNPACK)
    int8: gate 1e-4 (kept fp32), side 0.05 * max|s|  (dynamic int8 activations, per-channel int8 weights)
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from export.lowering import VARIANTS, lower
from spa.model.plugin import CONFIG_FILE, WEIGHTS_FILE, Plugin, gate_row, load_plugin
from spa.model.pte_plugin import PtePlugin

TOLERANCE = {"fp32": {"gate": 1e-4, "side": 1e-4}, "int8": {"gate": 1e-4, "side": 0.05}}
_SIDE_RELATIVE = {"fp32": False, "int8": True}


def side_tolerance(variant: str, side_max: float) -> float:
    """The side output's parity tolerance: relative to its largest value for int8, absolute (at least 1x) for fp32."""
    return TOLERANCE[variant]["side"] * (side_max if _SIDE_RELATIVE[variant] else max(1.0, side_max))


def pte_name(variant: str) -> str:
    return f"plugin-{variant}.pte"


MARGINS = (0.0, 0.02, 0.5, 2.0, 7.5, 30.0)  # the margin gate's second input: ties to confident choices


def parity_inputs(plugin: Plugin, samples: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gate row, taps) pairs: random states with a few outlier channels, like real ones; the
    gate row is f_t (the last tap), and for a margin gate f_t then a margin from MARGINS."""
    gen = torch.Generator().manual_seed(1234)
    hidden, n_taps = plugin.config.hidden_size, len(plugin.config.taps)
    outliers = torch.randperm(hidden, generator=gen)[:4]
    rows = []
    for i in range(samples):
        taps = torch.randn(n_taps, hidden, generator=gen) * 15
        taps[:, outliers] = 2000 * torch.sign(torch.randn(n_taps, len(outliers), generator=gen))
        margin = torch.tensor(MARGINS[i % len(MARGINS)]) if plugin.config.gate_margin else None
        rows.append((gate_row(taps[-1], margin), taps))
    return rows


def measure_parity(plugin: Plugin, pte: PtePlugin, variant: str) -> dict:
    """Max absolute error of the `.pte` against eager, per method, and whether it is within tolerance."""
    gate_err = side_err = side_max = 0.0
    with torch.no_grad():
        for row, taps in parity_inputs(plugin):
            gate_err = max(gate_err, abs(pte.gate(row.numpy()) - plugin.gate(row)[0].item()))
            ref = plugin.side(taps).numpy()
            projected = plugin.side.project(taps).numpy()
            side_err = max(side_err, float(np.abs(pte.side(taps.numpy()) - ref).max()),
                           float(np.abs(pte.side_projected(projected) - ref).max()))
            side_max = max(side_max, float(np.abs(ref).max()))
    tol = TOLERANCE[variant]
    side_tol = side_tolerance(variant, side_max)
    return {
        "gate_max_abs_err": gate_err,
        "side_max_abs_err": side_err,
        "side_max_abs": side_max,
        "gate_tolerance": tol["gate"],
        "side_tolerance": side_tol,
        "ok": gate_err <= tol["gate"] and side_err <= side_tol,
    }


def export_plugin(plugin_dir: str | Path, out_dir: str | Path, variants=VARIANTS, progress=print) -> dict:
    """Lower, write and verify every variant; returns the manifest."""
    plugin_dir, out_dir = Path(plugin_dir), Path(out_dir)
    plugin = load_plugin(plugin_dir)
    digest = plugin.content_hash()
    out_dir.mkdir(parents=True, exist_ok=True)
    if plugin_dir.resolve() != out_dir.resolve():
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(plugin_dir / name, out_dir / name)
    manifest = {"content_hash": digest, "profile": plugin.config.profile, "taps": plugin.config.taps,
                "tau": plugin.config.tau, "backbone": plugin.config.backbone, "variants": {}}
    for variant in variants:
        t0 = time.time()
        progress(f"lowering {variant} to ExecuTorch (XNNPACK)...")
        data = lower(plugin, variant, digest)
        path = out_dir / pte_name(variant)
        path.write_bytes(data)
        pte = PtePlugin(path)
        if pte.content_hash != digest:
            raise AssertionError(f"{path} reports hash {pte.content_hash}, expected {digest}")
        manifest["variants"][variant] = {
            "file": path.name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "export_seconds": round(time.time() - t0, 1),
            "parity": measure_parity(plugin, pte, variant),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def format_manifest(manifest: dict, out_dir: Path) -> str:
    lines = [f"plugin {manifest['content_hash']} (profile {manifest['profile']}, {len(manifest['taps'])} taps, "
             f"tau {manifest['tau']:.3g}) -> {out_dir}",
             f"{'variant':8} {'file':18} {'size':>10} {'gate max err':>13} {'side max err':>13} {'|s| max':>9}  parity"]
    for variant, v in manifest["variants"].items():
        p = v["parity"]
        lines.append(f"{variant:8} {v['file']:18} {v['bytes'] / 1024:>7.0f} KB {p['gate_max_abs_err']:>13.2e} "
                     f"{p['side_max_abs_err']:>13.2e} {p['side_max_abs']:>9.2f}  "
                     f"{'ok' if p['ok'] else 'FAIL'} (tol gate {p['gate_tolerance']:.0e}, side {p['side_tolerance']:.2e})")
    if manifest.get("training"):  # the program a device learns with (export/training_program.py)
        t = manifest["training"]
        lines.append(f"training {t['file']} {t['bytes'] / 1024:>7.0f} KB + weights {t['weights_file']} "
                     f"{t['weights_bytes'] / 1024:.0f} KB (spa personalize; the loss reads the output head)")
    return "\n".join(lines)
