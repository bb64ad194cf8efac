"""tau tuned on validation Rouge-L, for the evaluation's plugins.

Training picks tau on teacher-forced validation loss (training/train.py,
`choose_tau`): it minimizes loss + lambda * usage. Generation is another
matter: a token the side network would fix under teacher forcing may never
be reached when the model writes its own text, so the loss-chosen tau can
sit far below the usage that generation needs (approach: 24 % usage, 4
Rouge-L points under side-always-on on the 80-paper checkpoint).

So `spa eval` tunes what it reports on the validation split, by generation:
for each profile, its full-data plugin writes the validation summaries at
the taus giving each usage in `USAGE_CANDIDATES` on the teacher-forced
validation tokens, and the usage with the best validation Rouge-L wins (ties:
the lower usage). Candidates stop at 45 %, not 50 %, to keep test usage
under half with room for the shift between splits (measured: +-3 points).
Every plugin of that profile (the smaller training sets too) then gets the
tau giving that usage on its own validation tokens, recorded in its config
(`tau`, and `training["tau_tuning"]`). Test papers are never read here.
"""

import torch
from tqdm import tqdm

from evaluation.batched import Row, generate_rows
from evaluation.rouge import rouge_l
from spa.data import GENERIC_INSTRUCTION, chat_template, load_split, paper_prompt
from training.tapcache import split_token_set

USAGE_CANDIDATES = (0.2, 0.3, 0.4, 0.45)


def usage_taus(backbone, pte, settings, usages) -> dict[float, float]:
    """usage target -> tau giving that side usage on the validation tokens (teacher-forced)."""
    val = split_token_set(backbone, "val", settings.val_docs, settings.profile, pte.config.prompt_template,
                          pte.config.instruction, pte.config.max_doc_tokens)
    p = torch.tensor([pte.gate(f.numpy()) for f in val.states[:, -1]])
    return {u: float(torch.quantile(p, 1 - u)) for u in usages}


def tune_usage(backbone, plugins: dict, papers: int | None, max_new_tokens: int, log) -> dict:
    """plugins: profile -> (pte, TrainSettings). Returns profile -> {"usage": the chosen
    validation usage, "val_rouge_l": {usage: Rouge-L}, "val_papers": n}."""
    rows = []
    for profile, (pte, settings) in plugins.items():
        for usage, tau in usage_taus(backbone, pte, settings, USAGE_CANDIDATES).items():
            rows.append((profile, usage, Row(f"{profile}|{usage}", pte, tau)))
    val = load_split("val", papers)
    template = chat_template(backbone.tokenizer)
    max_doc_tokens = next(iter(plugins.values()))[1].max_doc_tokens
    scores = {row.name: 0.0 for _, _, row in rows}
    for paper in tqdm(val, desc=f"tuning tau on validation Rouge-L ({len(rows)} rows per paper)", unit="paper"):
        ids = backbone.encode(paper_prompt(paper, template, GENERIC_INSTRUCTION, max_doc_tokens))
        for (profile, _, row), gen in zip(rows, generate_rows(backbone, ids, [r for _, _, r in rows], max_new_tokens)):
            scores[row.name] += rouge_l(backbone.decode(gen.tokens), paper.summaries[profile]) / len(val)
    out = {}
    for profile in plugins:
        by_usage = {usage: scores[row.name] for p, usage, row in rows if p == profile}
        best = max(by_usage, key=lambda u: (round(by_usage[u], 6), -u))
        out[profile] = {"usage": best, "val_rouge_l": {f"{u:g}": r for u, r in by_usage.items()},
                        "val_papers": len(val), "max_new_tokens": max_new_tokens}
        log(f"{profile}: validation Rouge-L by usage "
            + ", ".join(f"{u:.0%} {r:.2f}" for u, r in by_usage.items()) + f" -> {best:.0%}")
    return out
