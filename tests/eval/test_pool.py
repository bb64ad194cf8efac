"""Pooling `spa eval` reports over disjoint papers (evaluation/pool.py), and the goal-only report, on known input."""

import copy
import json

import pytest

from evaluation.bootstrap import paired_bootstrap
from evaluation.pool import PoolError, pool
from evaluation.run import markdown
from tests.conftest import run_spa


MARGIN_ROW = "SPA with flip-label gate + logit margin"


def row(per_paper, usage, mean_tokens):
    return {"rouge_l": sum(per_paper) / len(per_paper), "side_usage": usage, "mean_tokens": mean_tokens,
            "examples": ["an example"], "per_paper": per_paper}


def report(ids, first_paper, spa, always, usage, mean_tokens, extra_rows=None, tau=0.5, goal_only=False):
    rows = {"backbone, generic instruction": row([10.0] * len(ids), 0.0, mean_tokens),
            "side always on": row(always, 1.0, mean_tokens), "SPA": row(spa, usage, mean_tokens),
            MARGIN_ROW: row(always, 0.3, mean_tokens), **(extra_rows or {})}
    tuning = {"usage": 0.3, "val_rouge_l": {"0.3": 20.0}, "val_generation_usage": {"0.3": 0.31},
              "max_generation_usage": 0.37, "val_papers": 20}
    plugin = {"tau": tau, "settings": {}, "sweep": {}, "tau_tuning": None,
              "recipes": {"flip-label gate + logit margin": {"row": MARGIN_ROW, "tau": 0.25,
                                                             "settings": {"gate_labels": "flip"},
                                                             "tau_tuning": tuning}}}
    return {"split": "test", "papers": len(ids), "planned_papers": len(ids), "max_new_tokens": 48,
            "max_doc_tokens": 384, "seconds": 60.0, "backbone": "gemma-3-270m", "dtype": "float32",
            "first_paper": first_paper, "paper_ids": ids, "goal_only": goal_only,
            "profiles": {"outcome": {"plugin": plugin, "rows": rows, "vs_always_on": {}, "references": ["ref"]}}}


@pytest.fixture
def parts():
    sweep = {"SPA, tau for 20% val usage": row([1.0, 2.0], 0.2, 20.0)}
    a = report(["p1", "p2"], 0, [30.0, 20.0], [25.0, 25.0], usage=0.5, mean_tokens=20.0, extra_rows=sweep)
    b = report(["p3", "p4", "p5"], 2, [10.0, 40.0, 30.0], [20.0, 20.0, 20.0], usage=0.2, mean_tokens=10.0,
               goal_only=True)
    return a, b


def test_pooling_joins_per_paper_scores_and_weights_usage_by_generated_tokens(parts):
    pooled = pool(list(parts))
    spa = pooled["profiles"]["outcome"]["rows"]["SPA"]
    assert pooled["papers"] == 5 and pooled["paper_ids"] == ["p1", "p2", "p3", "p4", "p5"]
    assert spa["per_paper"] == [30.0, 20.0, 10.0, 40.0, 30.0] and spa["rouge_l"] == pytest.approx(26.0)
    # 40 tokens at 50 % and 30 tokens at 20 %: 26 of 70 tokens with sigma = 1.
    assert spa["side_usage"] == pytest.approx(26 / 70) and spa["mean_tokens"] == pytest.approx(14.0)
    assert pooled["profiles"]["outcome"]["vs_always_on"]["SPA"] == paired_bootstrap(
        [30.0, 20.0, 10.0, 40.0, 30.0], [25.0, 25.0, 20.0, 20.0, 20.0])
    # The sweep row ran only in the first part: it is left out rather than reported over 2 of 5 papers.
    assert list(pooled["profiles"]["outcome"]["rows"]) == ["backbone, generic instruction", "side always on", "SPA",
                                                           MARGIN_ROW]
    md = markdown(pooled, "spa eval --pool a.json b.json")
    assert "5 test papers (`spa eval --pool` of papers 1-2 and 3-5, keeping the rows every part has;" in md
    assert "| outcome | SPA | 26.00 | 37% | 22.00 |" in md and "| met |" in md


@pytest.mark.parametrize("change, message", [
    (lambda r: r["profiles"]["outcome"]["plugin"].update(tau=0.6), "not the same gates"),
    (lambda r: r["profiles"]["outcome"]["plugin"]["recipes"]["flip-label gate + logit margin"].update(tau=0.3),
     "not the same gates"),
    (lambda r: r.update(paper_ids=["p2", "p3", "p4"]), r"repeats 1 paper\(s\)"),
    (lambda r: r.update(max_new_tokens=32), "max_new_tokens"),
    (lambda r: r.update(backbone="SmolLM2-135M-Instruct"), "backbone"),
    (lambda r: r.update(planned_papers=10), "checkpoint"),
])
def test_pooling_refuses_reports_that_are_not_parts_of_one_run(parts, change, message):
    a, b = parts
    b = copy.deepcopy(b)
    change(b)
    with pytest.raises(PoolError, match=message):
        pool([a, b])
    with pytest.raises(PoolError, match="at least two"):
        pool([a])


def test_a_report_without_paper_ids_covers_the_splits_first_papers(parts):
    from spa.data.aclsum import load_split

    a, b = copy.deepcopy(parts[0]), copy.deepcopy(parts[1])
    del a["paper_ids"], a["first_paper"]  # as written before they were recorded: the first 2 test papers
    first_two = [p.id for p in load_split("test")[:2]]
    b["paper_ids"] = [first_two[1], "x", "y"]
    with pytest.raises(PoolError, match="repeats 1 paper"):
        pool([a, b])
    b["paper_ids"] = ["x", "y", "z"]
    assert pool([a, b])["paper_ids"][:2] == first_two


def test_spa_eval_pool_writes_the_pooled_report_and_names_bad_input(parts, tmp_path):
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "pooled"
    proc = run_spa("eval", "--pool", *paths, "--out", out)
    assert "`spa eval --pool` of papers 1-2 and 3-5" in proc.stdout
    assert json.loads((out / "results.json").read_text())["papers"] == 5 and (out / "tau_sweep.png").exists()
    (tmp_path / "bad.json").write_text("{}")
    proc = run_spa("eval", "--pool", paths[0], tmp_path / "bad.json", "--out", out, check=False)
    assert proc.returncode == 2 and "cannot pool" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_spa("eval", "--first-paper", "100", check=False)  # refused before any backbone or tuning
    assert proc.returncode == 2 and "--first-paper < 100 (the test split's papers)" in proc.stderr
