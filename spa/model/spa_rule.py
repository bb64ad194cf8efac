"""The SPA rule for one position, as the split computes it (docs/DESIGN.md §1, §2).

    p_t     = gate(dequant(Q(f_t)))                       on the device
              (gate(dequant(Q(f_t)), m_t) for a margin gate: m_t, the backbone's
              top-2 logit margin, travels exactly, as a float32)
    sigma_t = [p_t > tau]
    s_t     = side(dequant(Q(T_t)))                       on the device, only where sigma_t = 1
              (or side_projected(dequant(Q(P T_t))) with the cloud-side projection P)
    x_t     = f_t + dequant(Q(s_t))                       in the cloud (s_t alone for replacement plugins)
    logits  = lm_head(norm(x_t))

The device half (`device_step`) and the cloud half (`cloud_state`) are the
only places this rule is written. The in-process reference, the batched
evaluation, the bytes benchmark and the link benchmark's plugin-in-the-cloud
row run both halves in one process (`split_state`: both, for one position of
one sequence); the gateway runs the cloud half on the side output the device
sent.

`wire(x, what)` is what crossing the wire does to an activation matrix: by
default `codec.quantize` with the session's scheme; the bytes benchmark passes
one that also keeps the encoded form to build the messages it measures.
`what` names the activation ("f", "taps", "s").
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spa.protocol import codec
from spa.model.plugin import combine
from spa.model.projection import project

Wire = Callable[[np.ndarray, str], np.ndarray]


def quantizing_wire(scheme: str = "int8", outliers: int = 8) -> Wire:
    """The wire of a session with this codec: what the receiver decodes."""
    return lambda x, what: codec.quantize(x, scheme, outliers)


@dataclass(frozen=True)
class DeviceDecision:
    p: float  # the gate's probability p_t
    sigma: bool  # p_t > tau
    s: np.ndarray | None  # dequant(Q(s_t)) [H] as the cloud receives it, where sigma = 1


def gate_input(plugin, f_received: np.ndarray, margin: float | None) -> np.ndarray:
    """The row the plugin's gate reads: the received f_t [1, H], then m_t for a margin gate."""
    if not plugin.config.gate_margin:
        return f_received
    if margin is None:
        raise ValueError("this plugin's gate reads the backbone's logit margin (gate_input "
                         f"{plugin.config.gate_input!r}), and none was given")
    return np.concatenate([f_received, np.full((1, 1), margin, np.float32)], axis=1)


def device_step(plugin, f: np.ndarray, taps: Callable[[], np.ndarray], tau: float, wire: Wire,
                projection: tuple | None = None, margin: float | None = None) -> DeviceDecision:
    """The device's half for one position.

    `plugin`: anything with `gate`, `side` (and `side_projected`), e.g. a PtePlugin.
    `f`: the cloud's exact f_t [H]. `taps`: returns the exact taps [n_taps, H]
    (called only where sigma = 1: taps cost work and bytes). `projection`:
    (weight, bias) of the cloud-side projection as uploaded, or None. `margin`:
    the backbone's top-2 logit margin at this position (`spa.model.generate.logit_margin`),
    needed where the plugin's gate reads it.
    """
    p = plugin.gate(gate_input(plugin, wire(np.asarray(f, np.float32).reshape(1, -1), "f"), margin))
    if not p > tau:
        return DeviceDecision(p, False, None)
    exact = taps()
    if projection is None:
        s = plugin.side(wire(exact, "taps"))
    else:
        s = plugin.side_projected(wire(project(exact, *projection), "taps"))
    return DeviceDecision(p, True, wire(np.asarray(s, np.float32).reshape(1, -1), "s")[0])


def cloud_state(f: torch.Tensor, s: np.ndarray | None, combination: str = "add") -> torch.Tensor:
    """The cloud's half: the state lm_head(norm(.)) reads. `s` is the received
    side output [H] (None where sigma = 0: the backbone's own f_t)."""
    if s is None:
        return f
    return combine(f, torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)).to(f.dtype), combination)


def split_state(plugin, states: torch.Tensor, tau: float, wire: Wire,
                projection: tuple | None = None, margin: float | None = None) -> tuple[DeviceDecision, torch.Tensor]:
    """Both halves for one position, in one process: (the device's decision, the state
    lm_head(norm(.)) reads). `states`: the backbone's states [L + 1, H] at that position
    (f_t is the last; the taps are `plugin.config.taps` of them); `margin` as in device_step."""
    f = states[-1]
    decision = device_step(plugin, f.numpy(), lambda: states[plugin.config.taps].numpy(), tau, wire, projection,
                           margin)
    return decision, cloud_state(f, decision.s)
