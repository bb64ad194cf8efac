"""Pool `spa eval` reports over disjoint papers into one report (`spa eval --pool A.json B.json`).

A long evaluation can be run in parts (`--first-paper`, `--papers`): say papers
1-50 with every row, then papers 51-100 with `--goal-only`. Pooling is only
sound when the parts ran the same plugins at the same tau on the same split
with the same generation settings, so this checks that and refuses otherwise.
It keeps the rows every part has. Per row, the per-paper Rouge-L lists are
joined (the mean and the paired bootstrap are recomputed over all papers), and
side usage is re-weighted by each part's generated tokens: the pooled usage is
the share of all generated tokens with sigma = 1, as in one run.
"""

from evaluation.bootstrap import paired_bootstrap
from spa.data.aclsum import load_split

SAME = ("split", "max_new_tokens", "max_doc_tokens", "backbone", "dtype")


class PoolError(ValueError):
    """Reports that cannot be pooled; the message names what differs."""


def _tau_record(plugin: dict) -> dict:
    """What must match between parts for a profile: the plugins' taus, the default's and each recipe's."""
    return {"SPA": plugin["tau"], **{name: r["tau"] for name, r in (plugin.get("recipes") or {}).items()}}


def pool(reports: list[dict]) -> dict:
    if len(reports) < 2:
        raise PoolError("pooling needs at least two reports")
    first = reports[0]
    for i, r in enumerate(reports[1:], 2):
        for key in SAME:
            if r.get(key) != first.get(key):
                raise PoolError(f"report {i} has {key} = {r.get(key)!r}, report 1 has {first.get(key)!r}")
        if list(r["profiles"]) != list(first["profiles"]):
            raise PoolError(f"report {i} covers profiles {list(r['profiles'])}, report 1 {list(first['profiles'])}")
        for profile in first["profiles"]:
            mine, theirs = _tau_record(first["profiles"][profile]["plugin"]), _tau_record(r["profiles"][profile]["plugin"])
            if mine != theirs:
                raise PoolError(f"{profile}: report {i} ran the plugins at tau {theirs}, report 1 at {mine}: "
                                "not the same gates")
    seen, ids = set(), [paper_ids(r) for r in reports]
    for i, (r, mine) in enumerate(zip(reports, ids), 1):
        if r["papers"] < r["planned_papers"]:
            raise PoolError(f"report {i} is a checkpoint ({r['papers']} of {r['planned_papers']} papers)")
        overlap = seen & set(mine)
        if overlap:
            raise PoolError(f"report {i} repeats {len(overlap)} paper(s) of an earlier report, e.g. {min(overlap)}")
        seen |= set(mine)

    profiles = {}
    for profile, info in first["profiles"].items():
        parts = [r["profiles"][profile]["rows"] for r in reports]
        names = [name for name in parts[0] if all(name in rows for rows in parts)]
        rows = {name: _pool_row([rows[name] for rows in parts], [r["papers"] for r in reports]) for name in names}
        always = rows["side always on"]["per_paper"]
        intervals = {name: paired_bootstrap(row["per_paper"], always) for name, row in rows.items()
                     if name.startswith("SPA")}
        profiles[profile] = {"plugin": info["plugin"], "rows": rows, "vs_always_on": intervals,
                             "references": info["references"]}
    papers = sum(r["papers"] for r in reports)
    return {**{key: first.get(key) for key in SAME}, "papers": papers, "planned_papers": papers,
            "seconds": sum(r["seconds"] for r in reports), "profiles": profiles,
            "paper_ids": [i for mine in ids for i in mine],
            "goal_only": any(r.get("goal_only") for r in reports),
            "pooled_from": [{"first_paper": r.get("first_paper", 0), "papers": r["papers"],
                             "goal_only": bool(r.get("goal_only"))} for r in reports]}


def paper_ids(report: dict) -> list[str]:
    """The report's papers; a report written before they were recorded ran the split's first N papers."""
    if "paper_ids" in report:
        return report["paper_ids"]
    start = report.get("first_paper", 0)
    return [p.id for p in load_split(report["split"])[start:start + report["papers"]]]


def _pool_row(parts: list[dict], papers: list[int]) -> dict:
    per_paper = [score for part in parts for score in part["per_paper"]]
    tokens = [part["mean_tokens"] * n for part, n in zip(parts, papers)]  # generated tokens per part
    total = sum(tokens)
    return {"rouge_l": sum(per_paper) / len(per_paper),
            "side_usage": sum(part["side_usage"] * t for part, t in zip(parts, tokens)) / total if total else 0.0,
            "mean_tokens": total / sum(papers), "examples": parts[0]["examples"], "per_paper": per_paper}
