"""The in-process reference for collaborative generation (docs/DESIGN.md §2, the numerics contract).

One loop, no sockets: the gateway's step functions, the device's `.pte` run
by the ExecuTorch runtime, and every activation that would cross the wire
quantized and dequantized by the same codec:

    gate on dequant(Q(f_t)) (and the backbone's exact top-2 logit margin, for a margin gate);
    side on dequant(Q(T_t)); the cloud adds dequant(Q(s_t)) to its exact f_t.

With the cloud-side projection (spa/model/projection.py) the cloud projects its exact
taps with the uploaded weights and the side's remainder runs on
dequant(Q(projection)).

The split (gateway + device over websockets, any draft-ahead window W) must
produce exactly these tokens.
"""

from dataclasses import dataclass, field

from spa.errors import PluginError
from spa.model.generate import choose_token, finish_reason, generate, logit_margin
from spa.model.spa_rule import quantizing_wire, split_state


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # generated token ids, EOS included if reached
    sigmas: list[int] = field(default_factory=list)  # sigma_t of the position that chose each token
    gate_p: list[float] = field(default_factory=list)  # p_t of each position
    logit_gap: list[float] = field(default_factory=list)  # top-1 minus top-2 logit: the margin of each choice
    finish_reason: str = ""


def reference_generate(backbone, pte, prompt: str, *, tau: float, max_new_tokens: int, scheme: str = "int8",
                       outliers: int = 8, temperature: float = 0.0, seed: int = 0,
                       projection: tuple | None = None) -> Generation:
    """`projection`: (weight, bias) as uploaded for the cloud-side projection, or None."""
    if pte.config.combination != "add":
        raise PluginError(f"{pte.path}: a {pte.config.combination!r} plugin (the paper's S2/S3 evaluation rows) "
                          f"does not run in the split; only additive plugins do")
    wire = quantizing_wire(scheme, outliers)
    out = Generation()

    def choose(pos, states):
        states = states[0]
        # A margin gate reads the backbone's own margin, from the logits the gateway drafts with.
        margin = logit_margin(backbone.logits(states[-1])) if pte.config.gate_margin else None
        decision, x = split_state(pte, states, tau, wire, projection, margin)
        logits = backbone.logits(x)
        out.logit_gap.append(logit_margin(logits))
        out.sigmas.append(int(decision.sigma))
        out.gate_p.append(decision.p)
        return [choose_token(logits, temperature, seed, pos)]

    for _, _, tokens in generate(backbone, backbone.encode(prompt), choose, max_new_tokens):
        out.tokens += tokens
    out.finish_reason = finish_reason(out.tokens, backbone.eos_token_ids)
    return out
