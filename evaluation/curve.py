"""The learning curve of issue 25: SPA and the alternatives at 5, 10, 20, 50, 100 examples, for four people.

    python -m evaluation.curve --out results/personal            # every person and size
    python -m evaluation.curve --people challenge approach        # a part (e.g. one process per core)
    python -m evaluation.curve --report-only --out results/personal   # the report from what is done

People (evaluation/people.py): the three ACLSum reader types and a news reader who
wants the quotes. For each person and size, `evaluate_person` (evaluation/personal.py)
trains SPA and (at `--lora-sizes`) LoRA from the first n examples of the person's
file and scores every row on the person's test documents. Few-shot and the backbone
rows do not depend on n beyond the first k examples, so they are generated once
per person and reused (kept in the workdir). Each (person, size) is saved under the workdir as soon as it
is done, and the report is rewritten from everything saved so far: an interrupted
run leaves a report on what it covered, and a rerun skips what is done.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from evaluation.bootstrap import format_interval
from evaluation.people import CURVE_DOC_TOKENS, PEOPLE, write_person
from evaluation.personal import (ALWAYS_ON, BACKBONE, GOAL_USAGE, LORA, SPA, Reuse, evaluate_person, goal_verdict,
                                 shot_row, table_lines)
from spa.data.examples import read_examples

SIZES = (5, 10, 20, 50, 100)
GOAL_SIZE = 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings_key(args) -> dict:
    return {"tests": args.tests, "max_doc_tokens": args.max_doc_tokens, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed}


def run_person(backbone, person: str, args) -> None:
    saved = args.workdir / "curve" / f"{person}.json"
    key = settings_key(args)
    done = json.loads(saved.read_text()) if saved.exists() else {}
    if done.get("settings") != key:
        done = {"settings": key, "sizes": {}}
    files, test_file = write_person(person, args.workdir / "data", args.sizes, args.tests)
    tests = read_examples(test_file, args.max_doc_tokens, minimum=1)
    reuse = Reuse(args.workdir / "curve" / f"{person}-few-shot-tokens.json")
    for n in files:  # args.sizes, capped at the person's examples
        lora = n in args.lora_sizes
        previous = done["sizes"].get(str(n))
        if previous is not None and (previous["lora"] is not None or not lora):
            log(f"{person}, {n} examples: done before")
            continue
        log(f"== {person}, {n} examples{' (with LoRA)' if lora else ''}")
        examples = read_examples(files[n], args.max_doc_tokens)
        result = evaluate_person(backbone, examples, tests, args.workdir / "plugins" / f"{person}-{n}",
                                 args.max_new_tokens, args.seed, lora=lora, export=False, reuse=reuse, log=log,
                                 progress=lambda i, total: log(f"  {person}, {n} examples: {i}/{total} test documents")
                                 if i % 5 == 0 or i == total else None)
        save_point(saved, key, n, result)
        write_report(args)


def save_point(saved: Path, key: dict, n: int, result: dict) -> None:
    """Add one size's result to the person's file, re-read first: another process may have added sizes."""
    done = json.loads(saved.read_text()) if saved.exists() else {}
    if done.get("settings") != key:
        done = {"settings": key, "sizes": {}}
    done["sizes"][str(n)] = result
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1) + "\n")
    tmp.replace(saved)


def load_curves(args) -> dict:
    out = {}
    for person in PEOPLE:
        path = args.workdir / "curve" / f"{person}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("settings") == settings_key(args) and data["sizes"]:
                out[person] = {int(n): r for n, r in sorted(data["sizes"].items(), key=lambda kv: int(kv[0]))}
    return out


def write_report(args) -> None:
    curves = load_curves(args)
    if not curves:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {person: {n: slim(r) for n, r in sizes.items()} for person, sizes in curves.items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings_key(args),
                                                       "command": regenerate(curves, args),
                                                       "people": summary}, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(curves, args) + "\n")
    plot(curves, args.out / "learning_curve.png")


def slim(result: dict) -> dict:
    """A result without the generated texts (the per-document scores stay: a reader can redo the bootstrap)."""
    rows = {name: {k: v for k, v in row.items() if k != "examples"} for name, row in result["rows"].items()}
    return {k: v for k, v in result.items() if k not in ("rows", "references")} | {"rows": rows}


ROW_ORDER = (BACKBONE, shot_row(1), shot_row(3), LORA, ALWAYS_ON, SPA)


def markdown(curves: dict, args) -> str:
    seconds = sum(r["seconds"] for sizes in curves.values() for r in sizes.values())
    lines = ["# Learning curve: SPA against what a person would do instead", "",
             f"Test documents per person: {args.tests}; documents cut to ~{args.max_doc_tokens} tokens "
             f"(`plain_document`, as `spa train --examples` and `spa summarize` cut them); greedy, at most "
             f"{args.max_new_tokens} new tokens; SmolLM2-135M-Instruct; SPA from the eager plugin (the `.pte` "
             f"equals it within 1e-4) with int8 wire quantization. Rouge-L (F1, stemmed) against the person's "
             f"own test summaries. Computed: {sum(len(s) for s in curves.values())} (person, size) points in "
             f"{seconds / 60:.0f} min, summed over the points, on a 2-core CPU shared with other work (one torch thread "
             f"per process; the minutes column is each point's own time).",
             "", "Sized for a shared 2-core CPU, reduced from `spa eval --examples`'s defaults: "
                 f"{args.tests} test documents per person (of ACLSum's 100 test papers and the 40 quote articles), "
                 f"{args.max_doc_tokens}-token documents (default 384), {args.max_new_tokens} new tokens (default 48), "
                 "SPA from the eager plugin instead of the exported `.pte`, LoRA trained only at the sizes whose "
                 "LoRA column has a number. The few-shot rows use the person's first 1 or 3 examples, the same at "
                 "every size (flat by construction).",
             "", f"Regenerate: `{regenerate(curves, args)}` (`--people A B` runs a part: one process per core; "
                 f"`--sizes 20` first gets the goal's points early)", ""]
    lines += goal_lines(curves)
    lines += goal_tables(curves, args)
    for person, sizes in curves.items():
        lines += [f"## {person}", "", "| examples | " + " | ".join(ROW_ORDER) + " | SPA usage | SPA - LoRA [95 % CI] | "
                  "SPA - 3-shot [95 % CI] | minutes |", "|---:|" + "---:|" * (len(ROW_ORDER) + 4)]
        for n, r in sizes.items():
            cells = [f"{r['rows'][name]['rouge_l']:.2f}" if name in r["rows"] else "-" for name in ROW_ORDER]
            vs = r["vs_spa"]
            lora = neg(vs[LORA]) if LORA in vs else "-"
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {r['rows'][SPA]['side_usage']:.0%} | {lora} | "
                         f"{neg(vs[shot_row(3)])} | {r['seconds'] / 60:.1f} |")
        first = next(iter(sizes.values()))["rows"]
        kinds = ", ".join(f"{k}: {', '.join(f'{c}x {kind}' for kind, c in first[k]['prompt_kind'].items())}"
                          for k in (shot_row(1), shot_row(3)))
        lines += ["", f"Prompt tokens per request: {first[BACKBONE]['prompt_tokens']:.0f} for the backbone, LoRA, "
                      f"side always on and SPA (the document and the instruction); "
                      f"{first[shot_row(1)]['prompt_tokens']:.0f} for 1-shot and "
                      f"{first[shot_row(3)]['prompt_tokens']:.0f} for 3-shot ({kinds}).", ""]
    lines += ["![learning curve](learning_curve.png)"]
    return "\n".join(lines)


def regenerate(curves: dict, args) -> str:
    """The command that computes every point of the report (whatever parts and order produced it)."""
    sizes = sorted({n for s in curves.values() for n in s})
    lora = sorted({n for s in curves.values() for n, r in s.items() if r.get("lora")})
    return (f"python -m evaluation.curve --people {' '.join(curves)} --sizes {' '.join(map(str, sizes))} "
            f"--lora-sizes {' '.join(map(str, lora))} --tests {args.tests} --max-doc-tokens {args.max_doc_tokens} "
            f"--max-new-tokens {args.max_new_tokens}")


def neg(ci: dict) -> str:
    """An interval of row - SPA, written as SPA - row."""
    return format_interval({"diff": -ci["diff"], "low": -ci["high"], "high": -ci["low"]})


def goal_lines(curves: dict) -> list[str]:
    lines = [f"## The goal at {GOAL_SIZE} examples", "",
             f"SPA at <= {GOAL_USAGE:.0%} side usage, within 1 Rouge-L point of LoRA and at least 2 points above "
             f"3-shot prompting (differences SPA - row with the paired bootstrap 95 % interval over the test "
             f"documents).", "", "| person | SPA Rouge-L | side usage | SPA - LoRA | SPA - 3-shot | goal |",
             "|---|---:|---:|---:|---:|---|"]
    for person, sizes in curves.items():
        r = sizes.get(GOAL_SIZE)
        if r is None:
            lines.append(f"| {person} | - | - | - | - | not run |")
            continue
        verdict = goal_verdict(r)
        parts = [name for name, ok in (("usage", verdict["met"]["usage"]), ("LoRA", verdict["met"]["lora"]),
                                       ("3-shot", verdict["met"]["three_shot"])) if not ok]
        lines.append(f"| {person} | {r['rows'][SPA]['rouge_l']:.2f} | {verdict['usage']:.0%} | "
                     f"{neg(r['vs_spa'][LORA]) if LORA in r['vs_spa'] else '-'} | {neg(r['vs_spa'][shot_row(3)])} | "
                     + ("met" if verdict["all"] else "missed: " + ", ".join(parts)) + " |")
    return lines + [""]


def goal_tables(curves: dict, args) -> list[str]:
    """Per person at GOAL_SIZE: every row against SPA, with what each sends and what the cloud holds."""
    lines = []
    for person, sizes in curves.items():
        r = sizes.get(GOAL_SIZE)
        if r is None:
            continue
        data = args.workdir / "data"
        lines += [f"### {person}, {GOAL_SIZE} examples: every row against SPA", "",
                  f"The same as `spa eval --examples {data}/{person}-{GOAL_SIZE}.jsonl --test {data}/{person}-test.jsonl "
                  f"--max-doc-tokens {args.max_doc_tokens} --max-new-tokens {args.max_new_tokens}` (which runs SPA from "
                  f"the exported `.pte`); {r['seconds'] / 60:.0f} min here (SPA trained in "
                  f"{r['spa_seconds'] / 60:.1f} min, LoRA in {r.get('lora_seconds', 0) / 60:.1f} min). SPA: tau "
                  f"{r['plugin']['tau']:.3g}, {r['plugin']['side_epochs']} side epochs at most, "
                  f"{r['plugin']['validation']}; LoRA: {r['lora']['validation'] if r.get('lora') else 'not run'}.", ""]
        lines += table_lines(r) + [""]
    return lines


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.6), squeeze=False)
    for ax, (person, sizes) in zip(axes[0], curves.items()):
        for name in ROW_ORDER:
            points = [(n, r["rows"][name]["rouge_l"]) for n, r in sizes.items() if name in r["rows"]]
            if points:
                ax.plot(*zip(*points), "o-" if name in (SPA, LORA, ALWAYS_ON) else "s--", label=name, ms=4,
                        lw=2.2 if name == SPA else 1.2)
        ax.set_xscale("log")
        ax.set_xticks(list(sizes))
        ax.set_xticklabels([str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(person)
        ax.set_xlabel("the person's examples")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Rouge-L on the person's test documents")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--people", nargs="+", default=list(PEOPLE), choices=PEOPLE)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--lora-sizes", nargs="*", type=int, default=list(SIZES), help="sizes that also train LoRA")
    p.add_argument("--tests", type=int, default=20, help="test documents per person (default 20)")
    p.add_argument("--max-doc-tokens", type=int, default=CURVE_DOC_TOKENS)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("runs/personal"))
    p.add_argument("--out", type=Path, default=Path("results/personal"))
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from what is saved")
    args = p.parse_args(argv)
    args.command = "python -m evaluation.curve " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        write_report(args)
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from spa.model.backbone import load_backbone

    backbone = load_backbone()
    t0 = time.time()
    for person in args.people:
        run_person(backbone, person, args)
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
