"""`spa export` on a quick plugin: real `.pte` files, run by the ExecuTorch runtime, match eager."""

import numpy as np
import torch

from export.export import parity_inputs
from spa.model.plugin import load_plugin
from spa.model.pte_plugin import PtePlugin


def test_export_writes_every_variant_with_parity(exported):
    out, manifest = exported
    assert set(manifest["variants"]) == {"fp32", "int8"}
    for variant, info in manifest["variants"].items():
        assert (out / info["file"]).stat().st_size == info["bytes"]
        assert info["parity"]["ok"], (variant, info["parity"])
    fp32 = manifest["variants"]["fp32"]["parity"]
    assert fp32["gate_max_abs_err"] <= 1e-4 and fp32["side_max_abs_err"] <= 1e-4 * max(1, fp32["side_max_abs"])
    # Both files carry the same constants for the device to upload (projection weights in float16, the gate):
    # the compiled int8 program is what must be less than half the fp32 one.
    pte = PtePlugin(out / manifest["variants"]["int8"]["file"])
    constants = sum(a.nbytes for a in pte.projection_weights() + pte.gate_weights())
    assert constants > 1_000_000  # 31 taps x 32 x 576 float16 (+ biases and the gate)
    assert manifest["variants"]["int8"]["bytes"] - constants < (manifest["variants"]["fp32"]["bytes"] - constants) / 2
    assert (out / "config.json").exists() and (out / "plugin.safetensors").exists()


def test_pte_carries_the_plugins_hash_and_config(exported, quick_plugin_dir):
    out, manifest = exported
    plugin = load_plugin(quick_plugin_dir)
    for info in manifest["variants"].values():
        pte = PtePlugin(out / info["file"])
        assert pte.content_hash == plugin.content_hash() == manifest["content_hash"]
        assert pte.config == plugin.config


def test_fp32_pte_matches_eager_on_real_backbone_states(exported, quick_plugin_dir, backbone):
    out, manifest = exported
    plugin = load_plugin(quick_plugin_dir)
    pte = PtePlugin(out / manifest["variants"]["fp32"]["file"])
    ids = torch.tensor([backbone.encode("Our method improves Rouge-L on three summarization benchmarks.")])
    states = backbone.forward(ids, backbone.new_cache())[0]
    with torch.no_grad():
        for row in states:
            assert abs(pte.gate(row[-1].numpy()) - plugin.gate(row[-1])[0].item()) <= 1e-4
            s = plugin.side(row[plugin.config.taps]).numpy()
            assert np.abs(pte.side(row[plugin.config.taps].numpy()) - s).max() <= 1e-4 * max(1, np.abs(s).max())


def test_parity_inputs_have_outlier_channels(quick_plugin_dir):
    (_, taps), *_ = parity_inputs(load_plugin(quick_plugin_dir))
    assert taps.abs().max() == 2000 and taps.abs().median() < 20
