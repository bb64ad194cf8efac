"""`spa eval --examples FILE --test FILE2`: SPA against what the person could do instead, with the same examples.

Rows, each scored by Rouge-L (evaluation/rouge.py) against the person's own test
summaries, greedy, at most `max_new_tokens` new tokens:

* the backbone with the generic instruction (`EXAMPLES_INSTRUCTION`): where every row starts;
* k-shot prompting, k = 1 and 3 (evaluation/baselines.py): the first k examples in every prompt;
* LoRA on the backbone (evaluation/lora.py): the cloud fine-tuned on the examples;
* side always on (sigma = 1) and SPA at its tau, the plugin of `spa train --examples`
  (training/examples.py), exported to `.pte` (or, for the learning curve, the eager plugin:
  equal within the export's 1e-4 parity), with the wire's int8 quantization;

each against SPA with the paired bootstrap 95 % interval over the test documents
(evaluation/bootstrap.py), and the prompt tokens each approach sends per request.
The test file is read only here; tau and every epoch count come from the examples.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.baselines import few_shot_prompt, greedy
from evaluation.batched import ALWAYS, NEVER, EagerPlugin, Row, generate_rows
from evaluation.bootstrap import RESAMPLES, format_interval, paired_bootstrap
from evaluation.lora import lora_backbone
from evaluation.rouge import rouge_l, side_usage
from spa.data.examples import EXAMPLES_INSTRUCTION, ExampleSet
from spa.data.prompts import chat_template, format_prompt
from spa.model.plugin import save_plugin
from spa.protocol.limits import Limits
from training.examples import example_prompts, example_settings, example_tokens, train_from_examples

BACKBONE = "backbone, generic instruction"
ALWAYS_ON = "side always on"
SPA = "SPA"
LORA = "LoRA on the backbone"
SHOTS = (1, 3)
GOAL_USAGE = 0.4  # issue 25: at 20 examples, SPA at <= 40 % side usage ...
GOAL_VS_LORA = -1.0  # ... within 1 Rouge-L point of LoRA ...
GOAL_VS_SHOTS = 2.0  # ... and at least 2 points above 3-shot prompting
# What the cloud receives or keeps, per approach: the privacy column of the report.
CLOUD_HOLDS = {BACKBONE: "the document", ALWAYS_ON: "the document; side outputs on every token",
               SPA: "the document; side outputs where the gate opens", LORA: "the document; the person's adapter"}


def shot_row(k: int) -> str:
    return f"{k}-shot prompting"


@dataclass
class Reuse:
    """Generations that do not depend on the training examples beyond the first few (the few-shot rows),
    shared between evaluations of one person over one test file (the learning curve): the backbone's
    greedy tokens per (prompt, max_new_tokens), kept in `path` (JSON) when given so a rerun reuses them."""

    path: Path | None = None
    greedy: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.path is not None and self.path.exists():
            self.greedy = json.loads(self.path.read_text())

    def generate(self, backbone, ids: list[int], max_new_tokens: int) -> list[int]:
        key = hashlib.sha256(json.dumps([backbone.identity.fingerprint, ids, max_new_tokens]).encode()).hexdigest()
        if key not in self.greedy:
            self.greedy[key] = greedy(backbone, ids, max_new_tokens)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(self.greedy))
        return self.greedy[key]


def spa_plugin(backbone, examples: ExampleSet, workdir: Path, seed: int, export: bool, log):
    """Train (`spa train --examples`'s recipe), save and export the person's plugin; a PtePlugin, or the
    eager plugin with the same interface when `export` is off."""
    settings = example_settings(seed)
    settings.max_doc_tokens = examples.max_doc_tokens
    plugin, metrics = train_from_examples(backbone, examples, settings,
                                          example_tokens(backbone, examples, chat_template(backbone.tokenizer)))
    plugin_dir = workdir / "plugin"
    save_plugin(plugin, plugin_dir)
    if not export:
        return EagerPlugin(plugin), metrics
    from export.export import export_plugin
    from spa.model.pte_plugin import PtePlugin

    manifest = export_plugin(plugin_dir, workdir / "export", variants=("fp32",), progress=log)
    return PtePlugin(workdir / "export" / manifest["variants"]["fp32"]["file"]), metrics


def evaluate_person(backbone, examples: ExampleSet, tests: ExampleSet, workdir: Path, max_new_tokens: int = 48,
                    seed: int = 0, lora: bool = True, export: bool = True, reuse: Reuse | None = None,
                    log=print, progress=None) -> dict:
    """Every row on the test examples; `progress(done, total)` after each test document."""
    t0 = time.time()
    reuse = reuse or Reuse()
    workdir.mkdir(parents=True, exist_ok=True)
    template = chat_template(backbone.tokenizer)
    plugin, metrics = spa_plugin(backbone, examples, workdir, seed, export, log)
    tau = plugin.config.tau
    trained = {"spa_seconds": time.time() - t0}
    lora_bb, lora_record = None, None
    if lora:
        t1 = time.time()
        lora_bb, lora_record = lora_backbone(backbone, example_prompts(examples, template),
                                             [e.summary for e in examples.examples], seed)
        trained["lora_seconds"] = time.time() - t1
    limit = Limits().max_prompt_tokens
    tokens = {name: [] for name in [BACKBONE, *map(shot_row, SHOTS), LORA, ALWAYS_ON, SPA] if name != LORA or lora}
    sigmas = {ALWAYS_ON: [], SPA: []}
    prompt_tokens = {name: [] for name in tokens}
    shot_kinds = {shot_row(k): [] for k in SHOTS}
    rows = [Row(BACKBONE, None, NEVER), Row(ALWAYS_ON, plugin, ALWAYS), Row(SPA, plugin, tau)]
    for done, test in enumerate(tests.examples, 1):
        ids = backbone.encode(format_prompt(template, test.document, EXAMPLES_INSTRUCTION))
        for row, gen in zip(rows, generate_rows(backbone, ids, rows, max_new_tokens)):
            tokens[row.name].append(gen.tokens)
            prompt_tokens[row.name].append(len(ids))
            if row.name in sigmas:
                sigmas[row.name].append(gen.sigmas)
        for k in SHOTS:
            text, kind = few_shot_prompt(backbone.tokenizer, examples.examples[:k], test.document,
                                         EXAMPLES_INSTRUCTION, limit)
            shot_ids = backbone.encode(text)
            tokens[shot_row(k)].append(reuse.generate(backbone, shot_ids, max_new_tokens))
            prompt_tokens[shot_row(k)].append(len(shot_ids))
            shot_kinds[shot_row(k)].append(kind)
        if lora_bb is not None:
            tokens[LORA].append(greedy(lora_bb, ids, max_new_tokens))
            prompt_tokens[LORA].append(len(ids))
        if progress is not None:
            progress(done, len(tests))
    refs = [t.summary for t in tests.examples]
    table = {}
    for name, gens in tokens.items():
        texts = [backbone.decode(g) for g in gens]
        per_doc = [rouge_l(text, ref) for text, ref in zip(texts, refs)]
        table[name] = {"rouge_l": sum(per_doc) / len(per_doc), "per_doc": per_doc,
                       "side_usage": side_usage(sigmas[name]) if name in sigmas else None,
                       "prompt_tokens": sum(prompt_tokens[name]) / len(prompt_tokens[name]),
                       "mean_new_tokens": sum(map(len, gens)) / len(gens), "examples": texts[:2]}
    for name, kinds in shot_kinds.items():
        table[name]["prompt_kind"] = {kind: kinds.count(kind) for kind in set(kinds)}
    spa_scores = table[SPA]["per_doc"]
    vs_spa = {name: paired_bootstrap(row["per_doc"], spa_scores) for name, row in table.items() if name != SPA}
    return {"examples": examples.record(), "tests": {"count": len(tests), "sha256": tests.sha256},
            "max_doc_tokens": examples.max_doc_tokens, "max_new_tokens": max_new_tokens,
            "plugin": {"tau": tau, "validation": plugin.config.training["examples"]["validation"],
                       "side_epochs": plugin.config.training["settings"]["epochs"], "metrics": metrics},
            "lora": lora_record, "rows": table, "vs_spa": vs_spa, "references": refs[:2],
            "seconds": time.time() - t0, **trained}


def goal_verdict(result: dict) -> dict:
    """Issue 25's goal on one evaluation: SPA at <= 40 % usage, within 1 point of LoRA, 2 above 3-shot."""
    rows, vs = result["rows"], result["vs_spa"]
    usage_ok = rows[SPA]["side_usage"] <= GOAL_USAGE
    # vs_spa holds row - SPA; the goal reads SPA - row.
    lora_gap = -vs[LORA]["diff"] if LORA in vs else None
    shot_gap = -vs[shot_row(3)]["diff"]
    met = {"usage": usage_ok, "lora": lora_gap is not None and lora_gap >= GOAL_VS_LORA,
           "three_shot": shot_gap >= GOAL_VS_SHOTS}
    return {"spa_minus_lora": lora_gap, "spa_minus_3shot": shot_gap, "usage": rows[SPA]["side_usage"],
            "met": met, "all": all(met.values())}


def markdown(result: dict, command: str, title: str = "SPA against what a person would do instead") -> str:
    ex, rows = result["examples"], result["rows"]
    lines = [f"# {title}", "",
             f"{ex['count']} training examples (file SHA-256 `{ex['sha256'][:16]}…`), {result['tests']['count']} test "
             f"documents; documents cut to ~{result['max_doc_tokens']} tokens, greedy, at most "
             f"{result['max_new_tokens']} new tokens. SPA: tau {result['plugin']['tau']:.4g}, validation: "
             f"{result['plugin']['validation']}"
             + (f"; LoRA: rank {result['lora']['rank']} on {'/'.join(result['lora']['targets'])}, "
                f"{result['lora']['trainable_parameters']:,} parameters, {result['lora']['validation']}"
                if result.get("lora") else "")
             + f". Took {result['seconds'] / 60:.1f} min on a 2-core CPU.", "", f"Regenerate: `{command}`", ""]
    lines += table_lines(result)
    return "\n".join(lines)


def table_lines(result: dict) -> list[str]:
    rows, vs = result["rows"], result["vs_spa"]
    lines = ["| approach | Rouge-L | side usage | prompt tokens per request | the cloud holds | "
             "row - SPA [95 % CI] |", "|---|---:|---:|---:|---|---:|"]
    for name, row in rows.items():
        usage = f"{row['side_usage']:.0%}" if row["side_usage"] is not None else "-"
        holds = CLOUD_HOLDS.get(name) or (f"the document and {name[0]} of the person's examples"
                                          + (" (summaries only)" if "documents" not in row.get("prompt_kind", {})
                                             else ""))
        diff = format_interval(vs[name]) if name in vs else "-"
        lines.append(f"| {name} | {row['rouge_l']:.2f} | {usage} | {row['prompt_tokens']:.0f} | {holds} | {diff} |")
    lines.append("")
    lines.append(f"Paired bootstrap over the test documents ({RESAMPLES:,} resamples, seeded; "
                 f"`evaluation/bootstrap.py`): a negative difference means the row is below SPA.")
    return lines


def write_person_report(result: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result | {"command": command}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result, command) + "\n")
