"""`spa eval`: the SPA paper's quality tables on ACLSum with the real backbone.

For each reader profile, on the ACLSum test split, Rouge-L of:
  * prompted backbone: the backbone alone, its instruction naming the aspect (the paper's one-shot row);
  * backbone, generic instruction: what the plugin starts from;
  * side always on (sigma = 1 on every token: the paper's S1, a parallel LST);
  * SPA: gated at the plugin's tau, tuned on validation Rouge-L (evaluation/tune.py), with its side usage;
  * a tau sweep of the same plugin (taus hitting 20/40/60/80 % usage on the *validation* split);
  * SPA trained on less data (small / medium train split), each at the tau giving its profile's tuned
    validation usage;
  * the paper's replacement settings with a plugin trained to replace f_t by s_t: S2 (its gate picks
    f_t or s_t, at its trained tau) and S3 (s_t on every token: LST). "Side always on" is S1.

Everything tunable was tuned on the validation split (training defaults in
training/train.py); test papers are only generated here. Plugins are trained
by the real training recipe and exported to `.pte`; gate and side run in the
ExecuTorch runtime with the wire's int8 quantization, as on a device.
Generation: greedy, at most `max_new_tokens` (summaries are one sentence).
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from evaluation.batched import ALWAYS, NEVER, Row, generate_rows
from evaluation.bootstrap import RESAMPLES, format_interval, paired_bootstrap
from evaluation.rouge import rouge_l, side_usage
from evaluation.tune import MAX_GENERATION_USAGE, USAGE_CANDIDATES, tune_usage, usage_taus
from export.export import export_plugin
from spa.data.aclsum import ASPECT_INSTRUCTIONS, check_profile, load_split, paper_prompt
from spa.data.prompts import GENERIC_INSTRUCTION, chat_template
from spa.model.plugin import MARGIN_GATE, load_plugin, save_plugin
from spa.model.pte_plugin import PtePlugin
from training.train import TrainSettings, train_plugin

SWEEP_USAGE = (0.2, 0.4, 0.6, 0.8)
GOAL_USAGE = 0.4  # issue 16: SPA >= side always on at <= 40 % side usage on the test split
RECIPE_ROW = "SPA with "  # + a recipe's name: a further gated plugin (`evaluate`'s `recipes`)
# The paper's replacement settings (Table 3), with a plugin trained for replacement (combination "replace").
S2 = "S2: gate picks backbone or side state"
S3 = "S3: side state on every token (LST)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sweep_label(usage: float) -> str:
    """Sweep rows are named by their validation usage, the same for every profile (taus differ)."""
    return f"SPA, tau for {usage:.0%} val usage"


def _dirs(settings: TrainSettings, workdir: Path) -> tuple[Path, Path]:
    name = f"{settings.profile}-{settings.train_docs or 'full'}" + ("-replace" if settings.combination == "replace" else "")
    default = TrainSettings(settings.profile, train_docs=settings.train_docs, combination=settings.combination)
    name += "".join(f"-{k}={v}" for k, v in asdict(settings).items() if v != getattr(default, k))  # a recipe's plugins
    return workdir / "plugins" / name, workdir / "exports" / name


def plugin_for(backbone, settings: TrainSettings, workdir: Path) -> PtePlugin:
    """Train (or reuse, when trained with the same settings) and export a plugin."""
    plugin_dir, export_dir = _dirs(settings, workdir)
    pte_file = export_dir / "plugin-fp32.pte"
    try:
        # Settings recorded before a field existed hold its default.
        trained = TrainSettings(**load_plugin(plugin_dir).config.training["settings"])
        reusable = trained == settings and pte_file.exists()
    except Exception:  # missing or stale: train anew
        reusable = False
    if not reusable:
        log(f"training plugin {plugin_dir.name}")
        plugin, _ = train_plugin(backbone, settings)
        save_plugin(plugin, plugin_dir)
        export_plugin(plugin_dir, export_dir, variants=("fp32",), progress=log)
    return PtePlugin(pte_file)


def with_tuned_tau(backbone, settings: TrainSettings, workdir: Path, tuning: dict) -> PtePlugin:
    """The plugin with tau set for its profile's tuned validation usage, recorded in its config."""
    pte = plugin_for(backbone, settings, workdir)
    tau = usage_taus(backbone, pte, settings, [tuning["usage"]])[tuning["usage"]]
    if pte.tau == tau:
        return pte
    plugin_dir, export_dir = _dirs(settings, workdir)
    plugin = load_plugin(plugin_dir)
    loss_tau = (plugin.config.training.get("tau_tuning") or {}).get("loss_tau", plugin.config.tau)
    plugin.config.tau = tau
    cap = tuning.get("max_generation_usage", MAX_GENERATION_USAGE)
    rule = (f"tau for the teacher-forced validation usage at which the profile's full-data plugin wrote the best "
            f"validation Rouge-L with at most {cap:.0%} side usage in generation (evaluation/tune.py)")
    record = {k: v for k, v in tuning.items() if k != "val_per_paper"}  # the per-paper scores stay in the report
    plugin.config.training["tau_tuning"] = {"rule": rule, "loss_tau": loss_tau, **record}
    save_plugin(plugin, plugin_dir)
    export_plugin(plugin_dir, export_dir, variants=("fp32",), progress=log)
    return PtePlugin(export_dir / "plugin-fp32.pte")


def tuned_usages(backbone, profiles, workdir: Path, papers: int | None, max_new_tokens: int,
                 recipe: "Recipe | None" = None) -> dict:
    """profile -> tune_usage's record, cached in workdir (keyed by training settings and tuning size).
    `recipe`: a further gate recipe's plugins and tuning rule (None: the default recipe's)."""
    recipe = recipe or Recipe("", {})
    cache = workdir / (f"tau_tuning-{recipe.slug}.json" if recipe.name else "tau_tuning.json")
    key = {p: recipe.settings(p).record() for p in profiles} | {
        "papers": papers, "max_new_tokens": max_new_tokens, "candidates": list(recipe.candidates),
        "max_generation_usage": recipe.max_generation_usage}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["tuning"]
    full = {p: (plugin_for(backbone, recipe.settings(p), workdir), recipe.settings(p)) for p in profiles}
    tuning = tune_usage(backbone, full, papers, max_new_tokens, log, recipe.candidates, recipe.max_generation_usage)
    workdir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "tuning": tuning}, indent=2) + "\n")
    return tuning


@dataclass(frozen=True)
class Recipe:
    """A gate recipe the report holds against the goal: training settings (overrides of the
    defaults) and how tau is tuned on validation Rouge-L (teacher-forced usage candidates, the
    most side usage allowed in the validation generations)."""

    name: str  # "" for the default recipe (the "SPA" row)
    overrides: dict
    candidates: tuple = USAGE_CANDIDATES
    max_generation_usage: float = MAX_GENERATION_USAGE

    def settings(self, profile: str, **more) -> TrainSettings:
        return TrainSettings(profile, **self.overrides, **more)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")

    @property
    def row(self) -> str:
        return RECIPE_ROW + self.name if self.name else "SPA"


# Gate recipes beside the default one (issue 16), tuned on validation only; `spa eval --recipes NAME ...`.
GOAL_CANDIDATES = (0.2, 0.25, 0.3, 0.35, 0.4)  # teacher-forced validation usage
GOAL_GENERATION_USAGE = 0.37  # at most this in the validation generations: room under GOAL_USAGE for the split shift
RECIPES = {
    "flip": Recipe("flip-label gate", {"gate_labels": "flip"}, GOAL_CANDIDATES, GOAL_GENERATION_USAGE),
    # The flip-label gate reading the backbone's top-2 logit margin too (spa/model/plugin.py, MARGIN_GATE).
    "margin": Recipe("flip-label gate + logit margin", {"gate_labels": "flip", "gate_input": MARGIN_GATE},
                     GOAL_CANDIDATES, GOAL_GENERATION_USAGE),
    # The margin gate taught only the flips that reach the reference's token (results/quality/flips).
    "helpful": Recipe("helpful-flip gate + logit margin", {"gate_labels": "helpful", "gate_input": MARGIN_GATE},
                      GOAL_CANDIDATES, GOAL_GENERATION_USAGE),
}


def sweep_taus(backbone, pte: PtePlugin, settings: TrainSettings) -> dict[float, float]:
    return usage_taus(backbone, pte, settings, SWEEP_USAGE)


def evaluate(backbone, profiles, papers: int | None, max_new_tokens: int, workdir: Path, sizes=(25, 50),
             split: str = "test", on_checkpoint=None, checkpoint_every: int = 10, tune_papers: int | None = None,
             replacement: bool = True, recipes: tuple = (), first_paper: int = 0, goal_only: bool = False) -> dict:
    """The results table; `on_checkpoint(results)` also gets it every `checkpoint_every` papers.
    `tune_papers`: validation papers for tuning tau on Rouge-L (None: all 50). `replacement`:
    the paper's S2/S3 rows (replacement plugins, trained too). `recipes`: further gate recipes
    (`Recipe`), each a row "SPA with <name>" with its own plugin and its own tau tuning.
    `first_paper`: skip the split's first papers (a run that `pool` adds to an earlier one).
    `goal_only`: only the rows the goal compares (backbone, side always on, SPA and the recipes):
    no sweep, no prompted backbone, no training sizes, no replacement plugins."""
    # "val" only for tuning; the reported tables use "test". Checked before the slow tuning.
    test = load_split(split)[first_paper:None if papers is None else first_paper + papers]
    if first_paper < 0 or not test:
        raise ValueError(f"no {split} papers from paper {first_paper + 1} on")
    if goal_only:
        sizes, replacement = (), False
    t0 = time.time()
    for profile in profiles:
        check_profile(profile)
    template = chat_template(backbone.tokenizer)
    rows, plugins = [Row("backbone, generic instruction", None, NEVER)], {}
    tuning = tuned_usages(backbone, profiles, workdir, tune_papers, max_new_tokens)
    recipe_tuning = {r.name: tuned_usages(backbone, profiles, workdir, tune_papers, max_new_tokens, r) for r in recipes}
    for profile in profiles:
        full = TrainSettings(profile)
        pte = with_tuned_tau(backbone, full, workdir, tuning[profile])
        plugins[profile] = {"tau": pte.tau, "settings": asdict(full),
                            "sweep": {} if goal_only else sweep_taus(backbone, pte, full),
                            "tau_tuning": pte.config.training.get("tau_tuning")}
        rows += [Row(f"{profile}|side always on", pte, ALWAYS), Row(f"{profile}|SPA", pte, pte.tau)]
        rows += [Row(f"{profile}|{sweep_label(u)}", pte, tau) for u, tau in plugins[profile]["sweep"].items()]
        plugins[profile]["recipes"] = {}
        for recipe in recipes:
            gated = with_tuned_tau(backbone, recipe.settings(profile), workdir, recipe_tuning[recipe.name][profile])
            plugins[profile]["recipes"][recipe.name] = {
                "row": recipe.row, "tau": gated.tau, "settings": recipe.settings(profile).record(),
                "tau_tuning": recipe_tuning[recipe.name][profile]}
            rows.append(Row(f"{profile}|{recipe.row}", gated, gated.tau))
        if replacement:
            replace = plugin_for(backbone, TrainSettings(profile, combination="replace"), workdir)
            rows += [Row(f"{profile}|{S2}", replace, replace.tau), Row(f"{profile}|{S3}", replace, ALWAYS)]
        for size in sizes:
            small = with_tuned_tau(backbone, TrainSettings(profile, train_docs=size), workdir, tuning[profile])
            rows.append(Row(f"{profile}|SPA, {size} train papers", small, small.tau))
    max_doc_tokens = TrainSettings(profiles[0]).max_doc_tokens
    generations = {row.name: [] for row in rows}
    prompted = {profile: [] for profile in profiles}
    results = None
    prompted_rows = 0 if goal_only else len(profiles)
    for done, paper in enumerate(tqdm(test, desc=f"generating {len(rows)} + {prompted_rows} rows per paper",
                                      unit="paper"), 1):
        ids = backbone.encode(paper_prompt(paper, template, GENERIC_INSTRUCTION, max_doc_tokens))
        for row, gen in zip(rows, generate_rows(backbone, ids, rows, max_new_tokens)):
            generations[row.name].append(gen)
        for profile in profiles if not goal_only else ():
            ids = backbone.encode(paper_prompt(paper, template, ASPECT_INSTRUCTIONS[profile], max_doc_tokens))
            prompted[profile].append(generate_rows(backbone, ids, [Row("prompted", None, NEVER)], max_new_tokens)[0])
        if done % checkpoint_every == 0 or done == len(test):
            results = score_results(backbone, test[:done], len(test), split, max_new_tokens, max_doc_tokens,
                                    plugins, generations, prompted, time.time() - t0)
            results |= {"backbone": backbone.identity.name, "dtype": str(backbone.dtype).removeprefix("torch."),
                        "first_paper": first_paper, "paper_ids": [p.id for p in test[:done]], "goal_only": goal_only}
            if on_checkpoint is not None:
                on_checkpoint(results)  # an interrupted run still leaves a report on what it covered
    return results


def score_results(backbone, papers, planned, split, max_new_tokens, max_doc_tokens, plugins, generations, prompted,
                  seconds) -> dict:
    def score(gens, profile) -> dict:
        texts = [backbone.decode(g.tokens) for g in gens]
        refs = [p.summaries[profile] for p in papers]
        per_paper = list(map(rouge_l, texts, refs))
        return {"rouge_l": sum(per_paper) / len(refs), "side_usage": side_usage([g.sigmas for g in gens]),
                "mean_tokens": sum(len(g.tokens) for g in gens) / len(gens), "examples": texts[:3],
                "per_paper": per_paper}

    results = {"split": split, "papers": len(papers), "planned_papers": planned, "max_new_tokens": max_new_tokens,
               "max_doc_tokens": max_doc_tokens, "seconds": seconds, "profiles": {}}
    for profile, plugin in plugins.items():
        table = {"prompted backbone (aspect instruction)": score(prompted[profile], profile)} if prompted[profile] else {}
        table["backbone, generic instruction"] = score(generations["backbone, generic instruction"], profile)
        for name, gens in generations.items():
            if name.startswith(profile + "|"):
                table[name.split("|", 1)[1]] = score(gens, profile)
        always = table["side always on"]["per_paper"]
        intervals = {name: paired_bootstrap(row["per_paper"], always) for name, row in table.items()
                     if name.startswith("SPA")}
        results["profiles"][profile] = {"plugin": plugin, "rows": table, "vs_always_on": intervals,
                                        "references": [p.summaries[profile] for p in papers[:3]]}
    return results


def markdown(results: dict, command: str) -> str:
    lines = [f"# SPA quality on ACLSum ({results['split']} split)", "",
             f"{results['papers']} {results['split']} papers{coverage(results)}"
             + (f" (a checkpoint: {results['papers']} of the {results['planned_papers']} planned papers)"
                if results["papers"] < results["planned_papers"] else "")
             + f", {results.get('backbone', 'SmolLM2-135M-Instruct')} backbone ({results.get('dtype', 'float32')}), "
               f"greedy decoding, at most "
             f"{results['max_new_tokens']} new tokens, documents truncated to ~{results['max_doc_tokens']} tokens; "
             f"gate and side run from the exported `.pte` with int8 wire quantization. "
             f"Took {results['seconds'] / 60:.0f} min on a 2-core CPU.", "",
             f"Regenerate: `{command}`", ""]
    profiles = list(results["profiles"])
    names = list(next(iter(results["profiles"].values()))["rows"])
    lines.append("| row | " + " | ".join(f"{p} Rouge-L | usage" for p in profiles) + " |")
    lines.append("|---|" + "---:|---:|" * len(profiles))
    for name in names:
        cells = []
        for p in profiles:
            r = results["profiles"][p]["rows"].get(name)
            cells.append(f"{r['rouge_l']:.2f} | {r['side_usage']:.0%}" if r else "- | -")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"SPA against side always on, per profile: the difference of mean Rouge-L with its paired bootstrap "
                 f"95 % interval ({RESAMPLES:,} resamples of the {results['papers']} papers, seeded; "
                 f"`evaluation/bootstrap.py`). Goal: SPA >= always on at <= {GOAL_USAGE:.0%} side usage.")
    lines.append("")
    lines.append("| profile | row | Rouge-L | usage | always on | SPA - always on [95 % CI] | goal |")
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for p in profiles:
        info = results["profiles"][p]
        always = info["rows"]["side always on"]["rouge_l"]
        for name in gated_rows(info["rows"]):
            r, ci = info["rows"][name], info["vs_always_on"][name]
            met = r["rouge_l"] >= always and r["side_usage"] <= GOAL_USAGE
            lines.append(f"| {p} | {name} | {r['rouge_l']:.2f} | {r['side_usage']:.0%} | {always:.2f} | "
                         f"{format_interval(ci)} | {'met' if met else 'missed'} |")
    lines.append("")
    lines.append("\"Side always on\" is the paper's S1 (the side output added on every token). S2 and S3 use a "
                 "plugin trained to *replace* the backbone's final state by the side's (same side network, same "
                 "recipe): S2 lets its gate pick one of the two per token, S3 (LST) uses the side's on every token. "
                 "Usage is the share of generated tokens with sigma = 1.")
    lines.append("")
    for p in profiles:
        info = results["profiles"][p]
        tuning = info["plugin"].get("tau_tuning") or {}
        tuned = ""
        if tuning:
            gen = tuning.get("val_generation_usage", {})
            tuned = (f" for {tuning['usage']:.0%} teacher-forced validation usage, chosen on {tuning['val_papers']} "
                     f"validation papers: Rouge-L (usage in generation) "
                     + ", ".join(f"{float(u):.0%}: {r:.2f} ({gen.get(u, float('nan')):.0%})"
                                 for u, r in tuning["val_rouge_l"].items())
                     + f"; eligible up to {tuning.get('max_generation_usage', 1):.0%} in generation; tau by "
                       f"validation loss was {tuning['loss_tau']:.4g})")
        lines.append(f"**{p}**: tau {info['plugin']['tau']:.4g}{tuned}; example (SPA): "
                     f"\"{info['rows']['SPA']['examples'][0]}\" — reference: \"{info['references'][0]}\"")
        lines.append("")
        for name, recipe in (info["plugin"].get("recipes") or {}).items():
            t = recipe["tau_tuning"]
            gen = t["val_generation_usage"]
            changed = ", ".join(f"{k} = {v}" for k, v in recipe["settings"].items()
                                if k not in ("profile",) and v != getattr(TrainSettings(p), k))
            lines.append(f"**{p}, {recipe['row']}** ({changed}): tau {recipe['tau']:.4g} for {t['usage']:.0%} "
                         f"teacher-forced validation usage, chosen on {t['val_papers']} validation papers: Rouge-L "
                         f"(usage in generation) " + ", ".join(f"{float(u):.0%}: {r:.2f} ({gen[u]:.0%})"
                                                                for u, r in t["val_rouge_l"].items())
                         + f"; eligible up to {t['max_generation_usage']:.0%} in generation; example: "
                           f"\"{info['rows'][recipe['row']]['examples'][0]}\"")
            lines.append("")
    return "\n".join(lines)


def coverage(results: dict) -> str:
    """Which papers and rows a report covers, where that is not simply "the first N, every row"."""
    parts = []
    if results.get("pooled_from"):
        parts.append("`spa eval --pool` of papers " + " and ".join(
            f"{r['first_paper'] + 1}-{r['first_paper'] + r['papers']}" for r in results["pooled_from"])
                     + ", keeping the rows every part has")
    elif results.get("first_paper"):
        parts.append(f"papers {results['first_paper'] + 1}-{results['first_paper'] + results['papers']} of the split")
    if results.get("goal_only"):
        parts.append("only the rows the goal compares (`--goal-only`)")
    return f" ({'; '.join(parts)})" if parts else ""


def gated_rows(rows: dict) -> list[str]:
    """The rows held against the goal: SPA with each gate recipe at its tuned tau."""
    return [name for name in rows if name == "SPA" or name.startswith(RECIPE_ROW)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for profile, info in results["profiles"].items():
        rows = info["rows"]
        points = [rows["backbone, generic instruction"]] + [r for n, r in rows.items() if n.startswith("SPA, tau for")]
        points += [rows["SPA"], rows["side always on"]]
        points.sort(key=lambda r: r["side_usage"])
        line, = ax.plot([100 * r["side_usage"] for r in points], [r["rouge_l"] for r in points], "o-", label=profile)
        spa = rows["SPA"]
        ax.plot([100 * spa["side_usage"]], [spa["rouge_l"]], "*", ms=14, color=line.get_color())
        if "prompted backbone (aspect instruction)" in rows:  # absent from --goal-only runs
            ax.axhline(rows["prompted backbone (aspect instruction)"]["rouge_l"], ls=":", color=line.get_color(), lw=1)
    ax.set_xlabel("side usage on the test split (% of generated tokens)")
    ax.set_ylabel("Rouge-L")
    ax.set_title("Rouge-L against side usage (tau sweep; * = SPA's tuned tau, dotted = prompted backbone)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results, command) + "\n\n![tau sweep](tau_sweep.png)\n")
    plot(results, out / "tau_sweep.png")
