"""Many generations of one prompt at once: the evaluation's fast path.

Every plugin row of the evaluation (side always on, SPA at several tau,
plugins trained on less data, the backbone alone) reads the same prompt, so
one prefill serves them all and their decode steps run as one batch: on a CPU
a batch of 20 costs a few times one row, not 20 times. Finished rows leave
the batch.

Per row and position this computes exactly what the split computes (docs/DESIGN.md
§1 with the wire's quantization, the `.pte` for gate and side; replacement
plugins, the paper's S2/S3 rows, use s_t instead of f_t + s_t): only the
batched matrix products differ from the one-row reference in the last bits.
tests/eval/test_quality.py checks, on data with margin, that the tokens are the
reference's.
"""

from dataclasses import dataclass

import numpy as np
import torch

from spa.model.generate import finish_reason, generate, logit_margins
from spa.model.reference import Generation
from spa.model.spa_rule import DeviceDecision, cloud_state, device_step, quantizing_wire

ALWAYS = -1.0  # tau below every p: sigma = 1 on every token (paper's S1, "side always on")
NEVER = 2.0  # tau above every p: the backbone alone


class EagerPlugin:
    """A torch Plugin (spa/model/plugin.py) with a PtePlugin's device interface (`gate`, `side`, `config`),
    for explorations that try gates without exporting them; `gate` replaces the plugin's own."""

    def __init__(self, plugin, gate=None):
        self.plugin, self.config, self._gate = plugin, plugin.config, gate or plugin.gate

    def gate(self, row) -> float:
        with torch.no_grad():
            return float(self._gate(torch.as_tensor(np.asarray(row, np.float32)).reshape(1, -1))[0, 0])

    def side(self, taps) -> np.ndarray:
        with torch.no_grad():
            return self.plugin.side(torch.as_tensor(np.asarray(taps, np.float32)).unsqueeze(0))[0].numpy()


@dataclass(frozen=True)
class Row:
    name: str
    plugin: object | None  # a PtePlugin (gate, side, config.taps); None for the backbone alone
    tau: float = NEVER


def generate_rows(backbone, prompt_ids: list[int], rows: list[Row], max_new_tokens: int,
                  scheme: str = "int8", outliers: int = 8) -> list[Generation]:
    """Greedy generation for every row, batched; returns one Generation per row."""
    out = [Generation() for _ in rows]
    wire = quantizing_wire(scheme, outliers)
    margin_gates = any(row.plugin is not None and row.plugin.config.gate_margin for row in rows)
    live: list[int] = []  # the rows still generating, in batch order (the loop's `live`)

    def choose(pos, states):
        combined = []
        # The backbone's own top-2 logit margins, where a row's gate reads them (batched: last bits may differ).
        margins = logit_margins(backbone.logits(states[:, -1])).tolist() if margin_gates else None
        for slot, r in enumerate(live):
            f, row = states[slot, -1], rows[r]
            decision = DeviceDecision(0.0, False, None)  # the backbone alone
            if row.plugin is not None:
                margin = margins[slot] if row.plugin.config.gate_margin else None
                decision = device_step(row.plugin, f.numpy(), lambda: states[slot, row.plugin.config.taps].numpy(),
                                       row.tau, wire, margin=margin)
            combination = row.plugin.config.combination if row.plugin is not None else "add"
            combined.append(cloud_state(f, decision.s, combination))
            out[r].sigmas.append(int(decision.sigma))
            out[r].gate_p.append(decision.p)
        return torch.argmax(backbone.logits(torch.stack(combined)), dim=-1).tolist()

    steps = generate(backbone, prompt_ids, choose, max_new_tokens, rows=len(rows))
    live[:] = range(len(rows))
    for _, chosen, tokens in steps:
        for r, token in zip(chosen, tokens):
            out[r].tokens.append(token)
        live[:] = [r for r, token in zip(chosen, tokens) if token not in backbone.eos_token_ids]
    for generation in out:
        generation.finish_reason = finish_reason(generation.tokens, backbone.eos_token_ids)
    return out
