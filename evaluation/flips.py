"""What a gate that never sees the side output can reach: the side's flips (issue 16).

    python -m evaluation.flips --backbone gemma3-270m --plugins runs/eval-gemma/plugins/* --probe --out FILE.md

In greedy decoding the side output changes the text only where it changes the
backbone's greedy token: a *flip*. A gate that opens on every flip writes what
side always on writes. Each flip on a teacher-forced validation token is
  helpful  the side's token is the reference's and the backbone's is not;
  harmful  the backbone's token is the reference's and the side's is not;
  neutral  neither is (the two disagree on a token the reference does not have).
On these tokens a gate's top-1 accuracy is the backbone's plus the helpful flips
it opens on minus the harmful ones. It beats always on only by skipping more
harmful flips than helpful ones; below the flip rate it must also guess which
tokens flip, from f_t (and the margin) alone, without s_t.

For each trained plugin (the torch plugin directory, with the tau `spa eval`
tuned) this reports on the validation split: the flip rates, top-1 accuracy of
the backbone, always on, the gate at its tau and at fixed usages, and the share
of each kind of flip the gate opens on. `--probe` also fits gates the runtime
does not have (helpful-flip labels; the top-8 logit margins, entropy and top-1
probability through a small MLP; flip labels at every document position of the
train papers, and a bias per draft token) on cross-fitted train labels, to
measure how far other labels and inputs could go, and a *second* gate that runs
after the side network and sees what it did to the logits (can anything tell a
helpful flip from a harmful one without the reference?). Test papers are never
read.
"""

import argparse
import sys
from pathlib import Path

import torch

from evaluation.analysis_files import NotAPlugin, plugins_and_backbone, publish
from spa.data.aclsum import load_split, paper_prompt
from spa.model.plugin import PLAIN_GATE, Plugin, rms
from training.tapcache import TokenSet, split_token_set
from training.train import (TrainSettings, cross_fitted, gate_rows, greedy_tokens, helpful_flips, per_token,
                            plugin_logits)

USAGES = (0.25, 0.35)  # teacher-forced validation usages to hold every gate at


def flip_kinds(base: torch.Tensor, side: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks per token: flip, and its kind (helpful, harmful, neutral: they partition the flips)."""
    flip = base != side
    helpful = helpful_flips(base, side, targets)
    harmful = flip & (base == targets)
    return {"flip": flip, "helpful": helpful, "harmful": harmful, "neutral": flip & ~helpful & ~harmful}


def gated_view(kinds: dict, base_right: torch.Tensor, side_right: torch.Tensor, open_: torch.Tensor) -> dict:
    """What a gate opening on `open_` does on these tokens: usage, top-1 accuracy, and the share of
    each kind of flip it opens on (None where there is no such flip)."""
    caught = {k: (float((m & open_).sum() / m.sum()) if m.any() else None) for k, m in kinds.items()}
    accuracy = torch.where(open_, side_right, base_right).float().mean().item()
    return {"usage": open_.float().mean().item(), "top1": accuracy, "caught": caught}


def analyse(backbone, plugin: Plugin, val: TokenSet, usages=USAGES) -> dict:
    """The report for one plugin on its profile's validation tokens."""
    base, side = greedy_tokens(backbone, plugin, val)
    kinds = flip_kinds(base, side, val.targets)
    base_right, side_right = base == val.targets, side == val.targets
    with torch.no_grad():
        p = plugin.gate(gate_rows(backbone, plugin.config, val.states[:, -1]))[:, 0]
    at = {"tau": gated_view(kinds, base_right, side_right, p > plugin.config.tau)}
    for u in usages:
        at[f"{u:g}"] = gated_view(kinds, base_right, side_right, p > torch.quantile(p, 1 - u))
    return {"tokens": len(val), "rates": {k: m.float().mean().item() for k, m in kinds.items()},
            "top1_backbone": base_right.float().mean().item(), "top1_always": side_right.float().mean().item(),
            # The gate that opens on the helpful flips only: the most a gate can get, at usage = their rate.
            "top1_oracle": (base_right | kinds["helpful"]).float().mean().item(), "tau": plugin.config.tau, "at": at}


# --probe: gates the runtime does not have, fitted offline to see how far gate inputs and labels can go.
PROBE_INPUTS = {
    "f + margin, linear": (("f", "margin"), 0),  # what the margin gate reads, and its form
    "f + top-8 margins + entropy + top-1 p, MLP 64": (("f", "margins", "entropy", "p1"), 64),
}
PROBE_LABELS = ("flip", "helpful")


def probe_features(backbone, f: torch.Tensor) -> dict[str, torch.Tensor]:
    """Candidate gate inputs for final states f [N, H], all computable from the backbone's logits."""
    with torch.no_grad():
        logits = torch.cat([backbone.logits(f[i:i + 512]) for i in range(0, len(f), 512)])
        top = logits.topk(8, dim=-1).values
        logp = torch.log_softmax(logits, dim=-1)
    return {"f": rms(f), "margin": torch.log1p(top[:, :1] - top[:, 1:2]), "margins": torch.log1p(top[:, :1] - top[:, 1:]),
            "entropy": -(logp.exp() * logp).sum(-1, keepdim=True), "p1": logp.max(-1, keepdim=True).values.exp(),
            "draft": logits.argmax(-1)}  # the backbone's greedy token: every step carries it already


TOKEN_BIAS_L2 = 1e-3  # keeps the biases of tokens seen a few times near 0


def fit_probe(x: torch.Tensor, labels: torch.Tensor, hidden: int, steps: int = 600, seed: int = 0,
              tokens: torch.Tensor | None = None):
    """A standardized linear (hidden 0) or one-hidden-layer classifier; returns (x, tokens) -> p(label).
    With `tokens` (one id per row), each token also has a learned bias on the logits, zero at first."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    model = (torch.nn.Linear(x.shape[1], 2) if not hidden else
             torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 2)))
    table = torch.nn.Parameter(torch.zeros(int(tokens.max()) + 1 if tokens is not None else 0, 2))
    opt = torch.optim.AdamW([*model.parameters(), table], lr=1e-2, weight_decay=0.01)

    def logits(z, ids):
        out = model((z - mean) / std)
        if ids is None:
            return out, 0.0
        bias = table[ids.clamp(max=len(table) - 1)] * (ids < len(table)).unsqueeze(-1)  # unseen tokens: no bias
        return out + bias, TOKEN_BIAS_L2 * bias.pow(2).sum(-1).mean()

    for _ in range(steps):
        out, penalty = logits(x, tokens)
        loss = torch.nn.functional.cross_entropy(out, labels.long()) + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z, ids=None: torch.softmax(logits(z, ids)[0], -1)[:, 1].detach()


def document_flips(backbone, plugin: Plugin, papers) -> tuple[dict, torch.Tensor]:
    """Gate inputs (`probe_features`) and flips at every prompt position of these papers: the side
    never trained there, so the flips need no cross-fitting, and there are ten times more of them."""
    feats, flips = [], []
    config = plugin.config
    with torch.no_grad():
        for paper in papers:
            prompt = paper_prompt(paper, config.prompt_template, config.instruction, config.max_doc_tokens)
            ids = backbone.encode(prompt)
            states = backbone.forward(torch.tensor([ids]), backbone.new_cache())[0]
            feats.append(probe_features(backbone, states[:, -1]))
            # The draft is the backbone's greedy token: only the side's logits are left to compute.
            flips.append(feats[-1]["draft"] != plugin_logits(backbone, plugin, states, 1.0).argmax(-1))
    return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}, torch.cat(flips)


# The second gate's inputs: what the side did to the logits at this position (the gateway has them).
EFFECTS = ("log(1 + backbone margin)", "log(1 + margin with the side)", "side token's lead over the backbone's",
           "backbone's lead for its token over the side's", "backbone entropy", "entropy with the side",
           "backbone top-1 log p", "top-1 log p with the side")


def side_effects(backbone, plugin: Plugin, data: TokenSet) -> tuple[torch.Tensor, ...]:
    """Per token: the backbone's greedy token, the side's, then one column per EFFECTS entry."""
    def measure(states, _targets):
        lb, ls = plugin_logits(backbone, plugin, states, 0.0), plugin_logits(backbone, plugin, states, 1.0)
        base, side = lb.argmax(-1, keepdim=True), ls.argmax(-1, keepdim=True)
        top_b, top_s = lb.topk(2, -1).values, ls.topk(2, -1).values
        logp_b, logp_s = torch.log_softmax(lb, -1), torch.log_softmax(ls, -1)
        return (base[:, 0], side[:, 0], torch.log1p(top_b[:, 0] - top_b[:, 1]), torch.log1p(top_s[:, 0] - top_s[:, 1]),
                (ls.gather(1, side) - ls.gather(1, base))[:, 0], (lb.gather(1, base) - lb.gather(1, side))[:, 0],
                -(logp_b.exp() * logp_b).sum(-1), -(logp_s.exp() * logp_s).sum(-1),
                logp_b.max(-1).values, logp_s.max(-1).values)
    return per_token(data, 512, measure)


FILTER_DROPS = (0.1, 0.2, 0.3)  # the share of flips the second gate turns down, its least trusted first


def second_gate(train_effects: tuple, val_effects: tuple, train_targets, val_targets) -> dict:
    """Side always on, with a second gate that turns down the flips it scores least likely helpful:
    fitted on cross-fitted train flips (helpful against harmful), scored on the validation flips."""
    base_tr, side_tr, *cols_tr = train_effects
    base, side, *cols = val_effects
    kinds_tr, kinds = flip_kinds(base_tr, side_tr, train_targets), flip_kinds(base, side, val_targets)
    known = kinds_tr["helpful"] | kinds_tr["harmful"]
    p = fit_probe(torch.stack(cols_tr, -1)[known], kinds_tr["helpful"][known], 0)(torch.stack(cols, -1))
    flip_p = p[kinds["flip"]]
    out = {"top1_always": (side == val_targets).float().mean().item(), "drops": {}}
    for share in FILTER_DROPS:
        dropped = kinds["flip"] & (p <= torch.quantile(flip_p, share))
        out["drops"][f"{share:g}"] = {
            "top1": torch.where(dropped, base, side).eq(val_targets).float().mean().item(),
            "helpful_dropped": int((dropped & kinds["helpful"]).sum()),
            "harmful_dropped": int((dropped & kinds["harmful"]).sum())}
    return out


def probe(backbone, plugin: Plugin, train: TokenSet, val: TokenSet, settings,
          usages=(0.15,) + USAGES + (0.4,)) -> tuple[dict, dict]:
    """Teacher-forced top-1 on validation of gates fitted to cross-fitted train labels (PROBE_LABELS),
    on each input set (PROBE_INPUTS), then with document-position labels and a draft-token bias, at
    each usage; and the second gate (`second_gate`). The plugin's own side network decides the flips."""
    train_effects = cross_fitted(backbone, plugin.config, train, val, settings, measure=side_effects)
    val_effects = side_effects(backbone, plugin, val)
    (base_tr, side_tr), (base, side) = train_effects[:2], val_effects[:2]
    train_kinds, kinds = flip_kinds(base_tr, side_tr, train.targets), flip_kinds(base, side, val.targets)
    features = {name: probe_features(backbone, data.states[:, -1]) for name, data in (("train", train), ("val", val))}

    def views(p):
        return {f"{u:g}": gated_view(kinds, base == val.targets, side == val.targets, p > torch.quantile(p, 1 - u))
                for u in usages}

    out = {}
    for label in PROBE_LABELS:
        for inputs, (keys, hidden) in PROBE_INPUTS.items():
            x = {name: torch.cat([feats[k] for k in keys], -1) for name, feats in features.items()}
            out[f"{label} labels, {inputs}"] = views(fit_probe(x["train"], train_kinds[label], hidden)(x["val"]))
    # Flip labels at every document position as well, then a bias per draft token on top.
    doc, doc_flips = document_flips(backbone, plugin, load_split("train"))

    def f_and_margin(feats):
        return torch.cat([feats["f"], feats["margin"]], -1)

    x_train, x_val = torch.cat([f_and_margin(doc), f_and_margin(features["train"])]), f_and_margin(features["val"])
    labels, drafts = torch.cat([doc_flips, train_kinds["flip"]]), torch.cat([doc["draft"], features["train"]["draft"]])
    out["flip labels + document positions, f + margin, linear"] = views(fit_probe(x_train, labels, 0)(x_val))
    out["flip labels + document positions, f + margin + draft-token bias, linear"] = views(
        fit_probe(x_train, labels, 0, tokens=drafts)(x_val, features["val"]["draft"]))
    return out, second_gate(train_effects, val_effects, train.targets, val.targets)


def probe_markdown(reports: list[dict]) -> str:
    usages = list(next(iter(reports[0]["probe"].values())))
    lines = ["| backbone | profile | always on | gate labels, inputs | "
             + " | ".join(f"top-1 at {100 * float(u):.0f} % (flips / helpful / harmful opened on)" for u in usages)
             + " |",
             "|---|---|---|---|" + "---|" * len(usages)]
    for r in reports:
        for name, views in r["probe"].items():
            lines.append(f"| {r['backbone']} | {r['profile']} | {pct(r['top1_always'], 1)} | {name} | " + " | ".join(
                f"{pct(v['top1'], 1)} ({pct(v['caught']['flip'])} / {pct(v['caught']['helpful'])} / "
                f"{pct(v['caught']['harmful'])})"
                for v in views.values()) + " |")
    return "\n".join(lines)


def second_gate_markdown(reports: list[dict]) -> str:
    drops = list(reports[0]["second_gate"]["drops"])
    lines = ["Side always on with a second gate after the side network, which turns down the flips it trusts least "
             "(it sees what the side did to the logits: " + "; ".join(EFFECTS) + "):",
             "", "| backbone | profile | always on top-1 | "
             + " | ".join(f"turning down {100 * float(d):.0f} % of the flips: top-1 (helpful / harmful turned down)"
                          for d in drops) + " |", "|---|---|---|" + "---|" * len(drops)]
    for r in reports:
        g = r["second_gate"]
        cells = [f"{pct(v['top1'], 1)} ({v['helpful_dropped']} / {v['harmful_dropped']})" for v in g["drops"].values()]
        lines.append(f"| {r['backbone']} | {r['profile']} | {pct(g['top1_always'], 1)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_name(plugin: Plugin) -> str:
    settings = plugin.config.training.get("settings", {})
    labels = {"flip": "flip labels", "helpful": "helpful-flip labels"}.get(settings.get("gate_labels"),
                                                                            "default (gain labels)")
    return labels + (" + logit margin" if settings.get("gate_input", PLAIN_GATE) != PLAIN_GATE else "")


def pct(x: float | None, digits: int = 0) -> str:
    """A share as a percentage; "-" where there is nothing to count (no flip of that kind)."""
    return "-" if x is None else f"{100 * x:.{digits}f}"


def markdown(reports: list[dict]) -> str:
    lines = ["| backbone | profile | gate | flips (helpful / harmful / neutral), % of tokens | top-1 backbone / "
             "always on / helpful-only oracle | gate at tau: usage, top-1, flips opened on (helpful / harmful / "
             "neutral) % | "
             + " | ".join(f"gate at {100 * float(u):.0f} % usage: top-1, helpful / harmful opened on %" for u in
                          reports[0]["at"] if u != "tau") + " |",
             "|---|---|---|---|---|---|" + "---|" * (len(reports[0]["at"]) - 1)]
    for r in reports:
        rates, tau = r["rates"], r["at"]["tau"]
        cells = [r["backbone"], r["profile"], r["gate"],
                 f"{pct(rates['flip'])} ({pct(rates['helpful'])} / {pct(rates['harmful'])} / {pct(rates['neutral'])})",
                 f"{pct(r['top1_backbone'])} / {pct(r['top1_always'])} / {pct(r['top1_oracle'])}",
                 f"{pct(tau['usage'])}, {pct(tau['top1'])}, {pct(tau['caught']['helpful'])} / "
                 f"{pct(tau['caught']['harmful'])} / {pct(tau['caught']['neutral'])}"]
        cells += [f"{pct(v['top1'])}, {pct(v['caught']['helpful'])} / {pct(v['caught']['harmful'])}"
                  for u, v in r["at"].items() if u != "tau"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.flips", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", help="backbone name or directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--plugins", nargs="+", type=Path, required=True, help="trained torch plugin directories")
    ap.add_argument("--out", type=Path, help="write the table (markdown) and FILE.json here")
    ap.add_argument("--probe", action="store_true", help="also fit gates the runtime does not have (other labels, "
                    "other inputs) on cross-fitted train labels and report their validation top-1 (~1 min a plugin)")
    args = ap.parse_args(argv)
    try:
        plugins, backbone = plugins_and_backbone(args.plugins, args.backbone)
    except NotAPlugin as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reports = []
    for directory, plugin in zip(args.plugins, plugins):
        config = plugin.config
        val = split_token_set(backbone, "val", None, config.profile, config.prompt_template, config.instruction,
                              config.max_doc_tokens)
        report = analyse(backbone, plugin, val)
        if args.probe:
            train = split_token_set(backbone, "train", None, config.profile, config.prompt_template, config.instruction,
                                    config.max_doc_tokens)
            report["probe"], report["second_gate"] = probe(backbone, plugin, train, val, TrainSettings(config.profile))
        reports.append({"backbone": backbone.identity.name, "profile": config.profile, "gate": recipe_name(plugin),
                        "plugin": str(directory), **report})
        print(f"{directory}: flips {report['rates']['flip']:.1%}, top-1 always {report['top1_always']:.1%}, "
              f"gated {report['at']['tau']['top1']:.1%} at {report['at']['tau']['usage']:.0%}", file=sys.stderr)
    extra = "\n\n" + probe_markdown(reports) + "\n\n" + second_gate_markdown(reports) if args.probe else ""
    publish(markdown(reports) + extra, reports, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
