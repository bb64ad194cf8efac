"""Pushed taps: the gateway predicts the device's gate to send taps unasked (the gateway
protocol calls `gate_probability` on the f_t the device receives, spa/protocol/gateway/protocol.py).

Without it a sigma = 1 position costs the device two round trips: `need_taps`
-> `taps`, then `side` -> `verdict`. With the gate's weights (M_c: 2 x H
floats, 4.6 KB for SmolLM2) and tau uploaded in the hello, the gateway
computes p_t on exactly the f_t the device will see (dequant(Q(f_t))) and,
where p_t > tau, sends the taps inside the `step`: the device answers with
`side` at once, and the position costs one round trip.

This reveals little: the gateway learns every sigma_t anyway (a `need_taps`
or an `accept` for each position). The device still decides: where its own
gate (the `.pte`, float reassociation in XNNPACK) lands on the other side of
tau, it asks with `need_taps` as usual, or ignores the pushed taps. Tokens
never depend on the prediction, only bytes and round trips do.
"""

import numpy as np
import torch

from spa.model.plugin import rms


def gate_probability(f: np.ndarray, weight: np.ndarray, bias: np.ndarray, margin: float | None = None) -> float:
    """p = softmax(M_c rms(f))[1] for one position's f [H], or softmax(M_c [rms(f); log(1 + m)])[1]
    with the backbone's logit margin m for a margin gate (the Gate module's arithmetic)."""
    x = rms(torch.from_numpy(np.asarray(f, dtype=np.float32).reshape(-1)))
    if margin is not None:
        x = torch.cat([x, torch.log1p(torch.tensor([margin], dtype=torch.float32))])
    logits = torch.from_numpy(weight) @ x + torch.from_numpy(bias)
    return float(torch.softmax(logits, dim=-1)[1])

