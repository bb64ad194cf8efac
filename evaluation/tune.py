"""tau tuned on validation Rouge-L, for the evaluation's plugins.

Training picks tau on teacher-forced validation loss (training/train.py,
`choose_tau`): it minimizes loss + lambda * usage. Generation is another
matter: a token the side network would fix under teacher forcing may never
be reached when the model writes its own text, so the loss-chosen tau can
sit far below the usage that generation needs (approach: 24 % usage, 4
Rouge-L points under side-always-on on the 80-paper checkpoint), and the
usage a tau gives in generation is not the teacher-forced one either.

So `spa eval` tunes what it reports on the validation split, by generation:
for each profile, its full-data plugin writes the validation summaries at
the taus giving each usage in `USAGE_CANDIDATES` on the teacher-forced
validation tokens. A candidate is eligible when its side usage *in those
generations* is at most `MAX_GENERATION_USAGE` (45 %: the goal is at most
half, with room for the shift between splits); the eligible candidate with
the best validation Rouge-L wins (ties: the lower usage; none eligible: the
lowest). Every plugin of that profile (the smaller training sets too) then
gets the tau giving that teacher-forced usage on its own validation tokens,
recorded in its config (`tau`, and `training["tau_tuning"]`). Test papers
are never read here.
"""

import torch
from tqdm import tqdm

from evaluation.batched import Row, generate_rows
from evaluation.rouge import rouge_l, side_usage
from spa.data.aclsum import load_split, paper_prompt
from spa.data.prompts import GENERIC_INSTRUCTION, chat_template
from training.tapcache import split_token_set
from training.train import gate_rows

USAGE_CANDIDATES = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55)  # teacher-forced validation usage
MAX_GENERATION_USAGE = 0.45


def usage_taus(backbone, pte, settings, usages) -> dict[float, float]:
    """usage target -> tau giving that side usage on the validation tokens (teacher-forced)."""
    val = split_token_set(backbone, "val", settings.val_docs, settings.profile, pte.config.prompt_template,
                          pte.config.instruction, pte.config.max_doc_tokens)
    p = torch.tensor([pte.gate(row.numpy()) for row in gate_rows(backbone, pte.config, val.states[:, -1])])
    return {u: float(torch.quantile(p, 1 - u)) for u in usages}


def best_usage(rouge_by_usage: dict[float, float], generation_usage: dict[float, float],
               max_generation_usage: float = MAX_GENERATION_USAGE) -> float:
    """The eligible usage (generation usage <= max_generation_usage) with the best
    Rouge-L; on a tie (to 1e-6 points) the lower usage; none eligible: the lowest."""
    eligible = [u for u in rouge_by_usage if generation_usage[u] <= max_generation_usage]
    if not eligible:
        return min(rouge_by_usage)
    return max(eligible, key=lambda u: (round(rouge_by_usage[u], 6), -u))


def tune_usage(backbone, plugins: dict, papers: int | None, max_new_tokens: int, log,
               candidates=USAGE_CANDIDATES, max_generation_usage: float = MAX_GENERATION_USAGE) -> dict:
    """plugins: profile -> (pte, TrainSettings). Returns profile -> {"usage": the chosen
    teacher-forced validation usage, "val_rouge_l": {usage: Rouge-L}, "val_generation_usage":
    {usage: side usage in the validation generations}, "val_papers": n, "max_new_tokens": m,
    "val_per_paper": {usage: per-paper Rouge-L}}. `candidates`: teacher-forced validation
    usages to try; `max_generation_usage`: the most side usage a candidate may have in generation."""
    rows = []
    for profile, (pte, settings) in plugins.items():
        for usage, tau in usage_taus(backbone, pte, settings, candidates).items():
            rows.append((profile, usage, Row(f"{profile}|{usage}", pte, tau)))
    val = load_split("val", papers)
    template = chat_template(backbone.tokenizer)
    max_doc_tokens = next(iter(plugins.values()))[1].max_doc_tokens
    scores = {row.name: [] for _, _, row in rows}
    sigmas = {row.name: [] for _, _, row in rows}
    for paper in tqdm(val, desc=f"tuning tau on validation Rouge-L ({len(rows)} rows per paper)", unit="paper"):
        ids = backbone.encode(paper_prompt(paper, template, GENERIC_INSTRUCTION, max_doc_tokens))
        for (profile, _, row), gen in zip(rows, generate_rows(backbone, ids, [r for _, _, r in rows], max_new_tokens)):
            scores[row.name].append(rouge_l(backbone.decode(gen.tokens), paper.summaries[profile]))
            sigmas[row.name].append(gen.sigmas)
    out = {}
    for profile in plugins:
        mine = [(usage, row.name) for p, usage, row in rows if p == profile]
        by_usage = {usage: sum(scores[name]) / len(val) for usage, name in mine}
        generated = {usage: side_usage(sigmas[name]) for usage, name in mine}
        best = best_usage(by_usage, generated, max_generation_usage)
        out[profile] = {"usage": best, "val_rouge_l": {f"{u:g}": r for u, r in by_usage.items()},
                        "val_generation_usage": {f"{u:g}": g for u, g in generated.items()},
                        "max_generation_usage": max_generation_usage, "val_papers": len(val),
                        "max_new_tokens": max_new_tokens,
                        "val_per_paper": {f"{u:g}": scores[name] for u, name in mine}}
        log(f"{profile}: validation Rouge-L (usage in generation) by teacher-forced usage: "
            + ", ".join(f"{u:.0%} {by_usage[u]:.2f} ({generated[u]:.0%})" for u in by_usage) + f" -> {best:.0%}")
    return out
