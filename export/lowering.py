"""Lower a plugin to one ExecuTorch program with `gate` and `side` methods.

    gate(f: float32[1, H])              -> p: float32[1, 1]     (p_t; the runtime compares it with tau)
                                        (a margin gate reads [1, H + 1]: f_t, then the backbone's top-2
                                         logit margin m_t; config.gate_width)
    side(taps: float32[1, len(taps), H]) -> s: float32[1, H]
    side_projected(proj: float32[1, len(taps), r]) -> s: float32[1, H]
                                        (the side network after its per-tap projections, for the
                                         cloud-side projection option: the cloud sends r values per tap)
    plugin_hash()   -> int64[16]   the plugin's content hash as ASCII codes
    plugin_config() -> uint8[n]    the plugin's config.json, UTF-8
    projection_weight() -> float16[len(taps), r, H]   W_in, then each Down_l
    projection_bias()   -> float32[len(taps), r]
    gate_weight() -> float32[2, gate_width], gate_bias() -> float32[2]   M_c, for pushed taps

The constant methods make a `.pte` self-describing: the device runtime reads
the taps, tau and backbone fingerprint from the program itself and checks
them against the config written beside it. The projection weights are what
the device uploads when the user turns on the cloud-side projection
(spa/model/projection.py); they are read from the float plugin in both variants
(the compiled methods keep their own, possibly int8, copy inaccessible), and
add ~1.1 MB to the file for SmolLM2 with all 31 taps. The gate's weights
(4.6 KB) are what the device uploads when it asks the gateway to push taps
(the gateway predicts sigma and sends the taps with the step).

Variants: `fp32`, and `int8` = the side network with dynamic int8 activations
and per-channel int8 weights (PT2E, XNNPACKQuantizer), the tiny gate in fp32.
Both are XNNPACK-delegated.
"""

import json

import torch
from torch import nn

from spa.model.plugin import Plugin
from spa.model.projection import projection_weights

VARIANTS = ("fp32", "int8")


# What each method of the program computes, from the plugin.
_METHODS = {
    "gate": lambda plugin, x: plugin.gate(x),
    "side": lambda plugin, x: plugin.side(x),
    "side_projected": lambda plugin, x: plugin.side.mix(x),
}


class _Method(nn.Module):
    """One program method as a module of its own (torch.export exports `forward`)."""

    def __init__(self, plugin: Plugin, name: str):
        super().__init__()
        self.plugin, self.name = plugin, name

    def forward(self, x):
        return _METHODS[self.name](self.plugin, x)


def example_inputs(plugin: Plugin) -> dict:
    """Deterministic inputs with the right shapes, scaled like real backbone states."""
    gen = torch.Generator().manual_seed(0)
    hidden, n_taps, rank = plugin.config.hidden_size, len(plugin.config.taps), plugin.config.rank
    gate = torch.randn(1, plugin.config.gate_width, generator=gen) * 15
    if plugin.config.gate_margin:
        gate[0, -1] = 2.0  # a margin is >= 0
    return {
        "gate": (gate,),
        "side": (torch.randn(1, n_taps, hidden, generator=gen) * 15,),
        "side_projected": (torch.randn(1, n_taps, rank, generator=gen),),
    }


def _quantize(module: nn.Module, inputs: tuple, calibration: list[tuple]) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    graph = torch.export.export(module, inputs, strict=False).module()
    prepared = prepare_pt2e(graph, quantizer)
    for sample in calibration:  # dynamic activations need no calibration; this only traces observers
        prepared(*sample)
    return convert_pt2e(prepared)


def lower(plugin: Plugin, variant: str, content_hash: str, calibration: dict | None = None) -> bytes:
    """The `.pte` bytes of one variant."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    plugin = plugin.eval().requires_grad_(False)
    inputs = example_inputs(plugin)
    modules = {name: _Method(plugin, name) for name in _METHODS}
    programs = {}
    for name, module in modules.items():
        if variant == "int8" and name != "gate":
            # The gate (H x 2) is too small to gain from int8, and dynamic
            # activation quantization of rms(f_t) (a few huge channels) moved
            # p_t by up to 0.16 on sparse-tap plugins: it stays fp32.
            module = _quantize(module, inputs[name], (calibration or {}).get(name, [inputs[name]]))
        programs[name] = torch.export.export(module, inputs[name], strict=False)
    config = json.dumps(plugin.config.to_dict() | {"content_hash": content_hash}, sort_keys=True)
    weight, bias = projection_weights(plugin.state_dict(), len(plugin.config.taps))
    constants = {
        "plugin_hash": torch.tensor([ord(c) for c in content_hash], dtype=torch.int64),
        "plugin_config": torch.tensor(list(config.encode()), dtype=torch.uint8),
        "projection_weight": torch.from_numpy(weight),
        "projection_bias": torch.from_numpy(bias),
        "gate_weight": plugin.gate.classifier.weight.detach().clone(),
        "gate_bias": plugin.gate.classifier.bias.detach().clone(),
    }
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()], constant_methods=constants)
    return edge.to_executorch().buffer
