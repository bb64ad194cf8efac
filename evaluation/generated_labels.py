"""Gate labels from generated prefixes (issue 16; an exploration, not part of `spa eval`).

    spa train --profile challenge --gate-labels flip --gate-margin --out runs/margin/challenge
    python -m evaluation.generated_labels --plugins runs/margin/challenge --out results/quality/FILE.md

The flip-label gates learn where the side changes the greedy token on *teacher-forced* prefixes: the
reference summary's tokens. What the goal scores is generated text, and along side always on's own
generation a gate that opens exactly on the side's flips writes always on's text. So this labels the
positions of side always on's generations instead. For each plugin (trained by `spa train`, meant for
flip-label plugins; the side network is kept, only the gate is refitted, same form and steps) it fits
the gate to

    teacher-forced  the plugin's own recipe's cross-fitted teacher-forced labels (the plugin's gate, as
                    trained; flips for a flip-label plugin);
    generated       the flips along the side-always-on generations of the train papers (the plugin's
                    own side network writes them and decides the flips: those are the tokens where a
                    gate must open to keep always on's text);
    both            the two label sets joined,

and reports, at the teacher-forced validation usages the goal recipes try (`evaluation/run.py`,
GOAL_CANDIDATES), the share of the flips along the validation papers' always-on generations that the
gate opens on, and the Rouge-L of the validation summaries it writes (greedy, at most 48 tokens, int8
wire, eager gate and side) against side always on; then the usage the recipes' tuning rule would pick
(best Rouge-L with at most GOAL_GENERATION_USAGE side usage in these generations). Test papers are
never read. About 15 min a plugin on the 2-core CPU (most of it writing summaries).
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from evaluation.analysis_files import NotAPlugin, plugins_and_backbone, publish
from evaluation.batched import ALWAYS, EagerPlugin, Row, generate_rows
from evaluation.rouge import rouge_l, side_usage
from evaluation.run import GOAL_CANDIDATES, GOAL_GENERATION_USAGE
from evaluation.tune import best_usage
from spa.data.aclsum import load_split, paper_prompt
from spa.model.generate import generate
from spa.model.plugin import combine
from training.tapcache import TokenSet, split_token_set
from training.train import TrainSettings, gate_labels, gate_rows, greedy_tokens, train_gate

MAX_NEW_TOKENS = 48  # as `spa eval`


def always_on_states(backbone, plugin, papers, max_new_tokens: int = MAX_NEW_TOKENS) -> TokenSet:
    """The states of every position of each paper's side-always-on greedy summary (the wire's
    quantization left out: these are labels), its token as target."""
    config = plugin.config
    states, targets, doc_index = [], [], []
    with torch.no_grad():
        for i, paper in enumerate(papers):
            prompt = backbone.encode(paper_prompt(paper, config.prompt_template, config.instruction,
                                                  config.max_doc_tokens))

            def choose(pos, last):
                last = last[0]
                state = combine(last[-1][None], plugin.side(last[config.taps][None]), config.combination)
                states.append(last.clone())
                doc_index.append(i)
                return [int(backbone.logits(state).argmax(-1))]

            for _, _, tokens in generate(backbone, prompt, choose, max_new_tokens):
                targets += tokens
            print(f"\r  side-always-on summaries: {i + 1}/{len(papers)} papers", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return TokenSet(torch.stack(states), torch.tensor(targets), torch.tensor(doc_index))


def flips_of(backbone, plugin, tokens: TokenSet) -> torch.Tensor:
    base, side = greedy_tokens(backbone, plugin, tokens)
    return base != side


def refit_gate(plugin, rows: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0):
    """A copy of the plugin whose gate (same form) is fitted afresh to these labels."""
    torch.manual_seed(seed)
    fitted = copy.deepcopy(plugin)
    fitted.gate.classifier.reset_parameters()
    train_gate(fitted, rows, labels, steps)
    return fitted.eval()


def compare(backbone, plugin, papers: int | None = None) -> dict:
    config = plugin.config
    settings = TrainSettings(**config.training["settings"])
    data = {name: split_token_set(backbone, name, None, config.profile, config.prompt_template, config.instruction,
                                  config.max_doc_tokens) for name in ("train", "val")}
    t0 = time.time()
    generated = {name: always_on_states(backbone, plugin, load_split(name)) for name in ("train", "val")}
    generated_flips = {name: flips_of(backbone, plugin, tokens) for name, tokens in generated.items()}
    taught = gate_labels(backbone, config, data["train"], data["val"], settings)  # cross-fitted, teacher-forced
    rows = {name: gate_rows(backbone, config, tokens.states[:, -1]) for name, tokens in data.items()}
    generated_rows = {name: gate_rows(backbone, config, tokens.states[:, -1]) for name, tokens in generated.items()}
    gates = {
        "teacher-forced": plugin,
        "generated": refit_gate(plugin, generated_rows["train"], generated_flips["train"], settings.gate_steps),
        "both": refit_gate(plugin, torch.cat([rows["train"], generated_rows["train"]]),
                           torch.cat([taught, generated_flips["train"]]), settings.gate_steps),
    }
    generation_rows, at = [Row("always on", EagerPlugin(plugin), ALWAYS)], {}
    flips_val = generated_flips["val"]
    for name, gated in gates.items():
        with torch.no_grad():
            p_tf, p_gen = gated.gate(rows["val"])[:, 0], gated.gate(generated_rows["val"])[:, 0]
        for usage in GOAL_CANDIDATES:
            tau = float(torch.quantile(p_tf, 1 - usage))
            opens = p_gen > tau
            at[(name, usage)] = {"tau": tau, "flip_recall": float((opens & flips_val).sum() / flips_val.sum()),
                                 "usage_on_always_on_text": float(opens.float().mean())}
            generation_rows.append(Row(f"{name}|{usage}", EagerPlugin(plugin, gated.gate), tau))
    val = load_split("val", papers)
    scores = {row.name: [] for row in generation_rows}
    sigmas = {row.name: [] for row in generation_rows}
    for i, paper in enumerate(val):
        prompt = backbone.encode(paper_prompt(paper, config.prompt_template, config.instruction, config.max_doc_tokens))
        for row, gen in zip(generation_rows, generate_rows(backbone, prompt, generation_rows, MAX_NEW_TOKENS)):
            scores[row.name].append(rouge_l(backbone.decode(gen.tokens), paper.summaries[config.profile]))
            sigmas[row.name].append(gen.sigmas)
        print(f"\r  validation summaries: {i + 1}/{len(val)} papers ({len(generation_rows)} rows each)", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    always = sum(scores["always on"]) / len(val)
    report = {"profile": config.profile, "val_papers": len(val), "always_on_rouge_l": always,
              "flip_rate_always_on_text": {name: float(f.float().mean()) for name, f in generated_flips.items()},
              "gates": {}, "seconds": round(time.time() - t0)}
    for name in gates:
        rouge = {u: sum(scores[f"{name}|{u}"]) / len(val) for u in GOAL_CANDIDATES}
        usage = {u: side_usage(sigmas[f"{name}|{u}"]) for u in GOAL_CANDIDATES}
        report["gates"][name] = {
            "chosen_usage": best_usage(rouge, usage, GOAL_GENERATION_USAGE),
            "at": {f"{u:g}": {**at[(name, u)], "rouge_l": rouge[u], "generation_usage": usage[u],
                              "per_paper": scores[f"{name}|{u}"]} for u in GOAL_CANDIDATES}}
    report["always_on_per_paper"] = scores["always on"]
    return report


def markdown(reports: list[dict], command: str = "") -> str:
    """The table (after a line naming the command that made it, where given)."""
    lines = []
    if command:
        minutes = sum(r.get("seconds", 0) for r in reports) / 60
        lines += [f"Made by `{command}` ({minutes:.0f} min on the 2-core CPU); validation papers only. Each cell: "
                  "Rouge-L minus side always on (side usage in those generations); after the comma, the share of the "
                  "side's flips along always on's own validation summaries that the gate opens on. *Chosen*: the "
                  f"goal recipes' tuning rule (best Rouge-L with at most {GOAL_GENERATION_USAGE:.0%} side usage in "
                  "the validation generations).", ""]
    lines += ["| backbone | profile (always on) | labels | chosen | every teacher-forced validation usage |",
              "|---|---|---|---|---|"]
    for r in reports:
        for name, g in r["gates"].items():
            chosen = g["at"][f"{g['chosen_usage']:g}"]
            cells = [f"{u:.0%}: {v['rouge_l'] - r['always_on_rouge_l']:+.2f} ({v['generation_usage']:.0%}), "
                     f"{v['flip_recall']:.0%}" for u, v in ((float(k), v) for k, v in g["at"].items())]
            lines.append(f"| {r.get('backbone', '')} | {r['profile']} ({r['always_on_rouge_l']:.2f}) | {name} | "
                         f"{g['chosen_usage']:.0%}: {chosen['rouge_l'] - r['always_on_rouge_l']:+.2f} "
                         f"({chosen['generation_usage']:.0%}) | " + "; ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.generated_labels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", help="backbone name or directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--plugins", nargs="+", type=Path, required=True, help="trained flip-label plugin directories")
    ap.add_argument("--papers", type=int, help="validation papers to summarize for Rouge-L (default: all 50; "
                    "the labels and the flips always use every train and validation paper)")
    ap.add_argument("--out", type=Path, help="write the table (markdown) and FILE.json here")
    args = ap.parse_args(argv)
    if args.papers is not None and args.papers < 1:
        print(f"error: --papers must be at least 1, not {args.papers}", file=sys.stderr)
        return 2
    try:
        plugins, backbone = plugins_and_backbone(args.plugins, args.backbone)
    except NotAPlugin as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for directory, plugin in zip(args.plugins, plugins):
        if "settings" not in (plugin.config.training or {}):
            print(f"error: {directory} records no training settings: train it with `spa train`", file=sys.stderr)
            return 2
    reports = []
    for directory, plugin in zip(args.plugins, plugins):
        print(f"{directory}: {plugin.config.profile}", file=sys.stderr, flush=True)
        reports.append({"backbone": backbone.identity.name, "plugin": str(directory), **compare(backbone, plugin,
                                                                                               args.papers)})
    command = "python -m evaluation.generated_labels " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(markdown(reports, command), reports, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
