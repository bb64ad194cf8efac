"""The trace-driven model of the split (benchmarks/tracemodel.py): the real protocol
machines on a virtual clock, checked against closed forms where they exist."""

import json
from pathlib import Path

import pytest

from benchmarks.tracemodel import (Costs, Row, Trace, compare, explain, explain_result, format_why, predict,
                                   rate, simulate, traces_from_result)

ROOT = Path(__file__).resolve().parents[2]


def test_lock_step_without_side_tokens_costs_a_step_and_a_round_trip_per_token():
    costs = Costs(rtt_ms=50, step_ms=40, gate_ms=1)
    result = simulate(Trace([False] * 20), Row("lockstep", 0), costs)
    assert result["tokens"] == 20
    assert result["tokens_per_s"] == pytest.approx(1000 / (40 + 50 + 1), rel=1e-6)


def test_a_side_token_in_lock_step_adds_two_round_trips_and_a_head():
    costs = Costs(rtt_ms=50, step_ms=40, head_ms=8, gate_ms=0, side_ms=0)
    sides = simulate(Trace([True] * 10, [False] * 10), Row("lockstep", 0), costs)
    # per token: the next step (40) + its way down and the accept-less side exchange: need_taps/taps and
    # side/verdict (2 RTT) + the head (8); the step's own RTT is the verdict's.
    assert sides["tokens_per_s"] == pytest.approx(1000 / (40 + 2 * 50 + 8), rel=1e-6)


def test_draft_ahead_hides_the_link_when_the_gate_stays_closed():
    costs = Costs(rtt_ms=50, step_ms=40)
    result = simulate(Trace([False] * 40), Row("draft", 8), costs)
    assert result["tokens_per_s"] == pytest.approx(1000 / 40, rel=0.02)  # one step per token, as cloud-only


def test_side_outputs_in_flight_beat_one_at_a_time_on_a_slow_link():
    trace = Trace.synthetic(64, 0.3, 0.0)
    costs = Costs(rtt_ms=150, step_ms=10)
    one = simulate(trace, Row("one", 16, 1), costs)
    many = simulate(trace, Row("many", 16, 8), costs)
    assert many["max_in_flight"] > 1 and one["max_in_flight"] == 1
    assert many["tokens_per_s"] > 1.5 * one["tokens_per_s"]


def test_rollbacks_happen_and_cost_throughput():
    costs = Costs(rtt_ms=50, step_ms=10)
    calm = simulate(Trace.synthetic(64, 0.25, 0.0), Row("inflight", 8, 4, push=True), costs)
    rough = simulate(Trace.synthetic(64, 0.25, 0.5), Row("inflight", 8, 4, push=True), costs)
    assert calm["rollbacks"] == 0 and rough["rollbacks"] > 0
    assert rough["tokens_per_s"] < calm["tokens_per_s"]


def test_synthetic_traces_have_the_asked_rates():
    t = Trace.synthetic(100, 0.25, 0.2)
    assert sum(t.sigma) == 25 and sum(t.changed) == 5
    assert not any(c and not s for s, c in zip(t.sigma, t.changed))


def test_the_model_replays_a_committed_link_result():
    result = json.loads((ROOT / "benchmarks/results/link-4g.json").read_text())
    c = compare(result)
    # Every row the committed run measured (it ran a subset of rows) is replayed, and the
    # in-flight rows, the ones the model is used to plan with, come within 20 % of it.
    measured = [name for name, r in c["rows"].items() if r["measured_vs_cloud"] is not None]
    assert {"spa_draft", "spa_inflight", "spa_inflight_push"} <= set(measured)
    for name in ("spa_inflight", "spa_inflight_push"):
        row = c["rows"][name]
        assert row["predicted_vs_cloud"] == pytest.approx(row["measured_vs_cloud"], rel=0.2), name
    rows = predict(Trace.synthetic(32, 0.25, 0.2), Costs(rtt_ms=50, step_ms=10))
    assert set(rows) >= {"cloud_only", "spa_draft", "spa_inflight_push"}


def test_branch_lines_hit_where_the_trace_says_and_a_hit_still_waits_for_the_verdict():
    costs = Costs(rtt_ms=50, step_ms=10, branch_row_cost=0.0)  # branch rows for free: only the protocol counts
    row = Row("branches", 8, 4, push=True, branches=2)
    misses = simulate(Trace.synthetic(64, 0.25, 0.5, hit_rate=0.0), row, costs)
    hits = simulate(Trace.synthetic(64, 0.25, 0.5, hit_rate=1.0), row, costs)
    assert misses["branch_hits"] == 0 and misses["branch_misses"] > 0
    # Nearly all hit: a change is missed only where no branch line was ready (one branch point at a time).
    assert hits["branch_hits"] >= 4 * hits["branch_misses"] > 0 or hits["branch_misses"] == 0 < hits["branch_hits"]
    assert hits["rollbacks"] == misses["rollbacks"] > 0  # a hit is still a changed verdict
    # A hit saves the redraft (the steps the branch line drafted already), not the verdict's round trip.
    span = lambda r: r["commit_ms"][-1] - r["commit_ms"][0]  # noqa: E731
    saved_per_change = (span(misses) - span(hits)) / misses["rollbacks"]
    assert 0 < saved_per_change < costs.rtt_ms
    free = simulate(Trace.synthetic(64, 0.25, 0.0), row, costs)  # no change at all: the bound a hit falls short of
    assert free["tokens_per_s"] > 1.1 * hits["tokens_per_s"]


def test_synthetic_hits_are_a_share_of_the_changes():
    t = Trace.synthetic(100, 0.4, 0.5, hit_rate=0.25)
    assert sum(t.changed) == 20 and sum(t.hit) == 5
    assert all(c for c, h in zip(t.changed, t.hit) if h)


def test_the_losses_add_up_and_each_cause_is_charged_where_it_exists():
    row, trace = Row("inflight_push", 8, 4, push=True), Trace.synthetic(64, 0.3, 0.3)
    why = explain([trace], row, Costs(rtt_ms=50, step_ms=40, head_ms=8, down_mbit=3, up_mbit=3))
    lost = why["lost"]
    assert set(lost) == {"rollbacks", "verdict heads", "link bandwidth", "round-trip stalls"}
    assert why["predicted"] + sum(lost.values()) == pytest.approx(1.0)
    assert lost["rollbacks"] > 0.05 and lost["verdict heads"] > 0.01 and lost["link bandwidth"] > 0.01
    assert why["changes"] == sum(trace.changed) > 0 and why["side_tokens"] == sum(trace.sigma)
    # No changes, free heads, an unlimited link: only the round trip is left, and W = 8 covers it.
    calm = explain([Trace(trace.sigma)], row, Costs(rtt_ms=50, step_ms=40, head_ms=0.0))
    assert calm["lost"]["rollbacks"] == calm["lost"]["verdict heads"] == calm["lost"]["link bandwidth"] == 0
    assert calm["predicted"] > 0.97
    assert "rollbacks 0.00" in format_why(calm)


def test_a_run_with_traces_is_replayed_document_by_document():
    result = json.loads((ROOT / "benchmarks/results/link-4g.json").read_text())
    draft = result["rows"]["spa_draft"]
    draft["traces"] = [{"sigma": "0110000100", "changed": "0100000100"}, {"sigma": "00100", "changed": "00000"}]
    traces = traces_from_result(result, hit_rate=0.0)
    assert [len(t.sigma) for t in traces] == [10, 5] and sum(sum(t.changed) for t in traces) == 2
    assert sum(sum(t.hit) for t in traces_from_result(result, hit_rate=0.5)) == 1  # half the changes branch hits
    costs = Costs(rtt_ms=50, step_ms=40)
    row = Row("draft", 8)
    whole = rate(traces, row, costs)
    parts = [simulate(t, row, costs)["commit_ms"] for t in traces]
    assert whole == pytest.approx(sum(len(c) - 1 for c in parts) / sum(c[-1] - c[0] for c in parts) * 1000)
    why = explain_result(result, "spa_inflight_push")
    assert why["traced"] and why["documents"] == 2 and why["tokens"] == 15 and why["changes"] == 2
    assert why["measured"] == result["rows"]["spa_inflight_push"]["tokens_per_s_vs_cloud_only"]
    assert "replaying the run's 2 documents" in format_why(why)
    for r in result["rows"].values():  # a result saved before traces: its rates over one document of max_new_tokens
        r.pop("traces", None)
    assert "spread over one document" in format_why(explain_result(result, "spa_inflight_push"))


def test_every_row_the_link_bench_may_call_best_is_modelled_with_its_own_taps():
    """`spa bench link` explains its best SPA row with the model, and any SPA row can be the best
    (a CI run once picked spa_draft_proj, which the model did not know, and explained nothing)."""
    from benchmarks.linkbench import SPA_ROWS

    result = json.loads((ROOT / "benchmarks/results/link-4g.json").read_text())
    result["rows"]["spa_draft"]["traces"] = [{"sigma": "0110000100" * 4, "changed": "0100000000" * 4}]
    for name in SPA_ROWS:
        why = explain_result(result, name)
        assert why["row"] == name and why["traced"] and why["documents"] == 1, name
    # spa_draft_proj is spa_draft with r values per tap: never slower, and cheaper on a slow uplink.
    slow = dict(result, link={**result["link"], "measured": {**result["link"]["measured"], "up_mbit": 0.05}})
    proj, full = explain_result(slow, "spa_draft_proj"), explain_result(slow, "spa_draft")
    assert proj["predicted"] > full["predicted"]


def test_a_run_without_the_draft_row_is_replayed_from_another_spa_row():
    """The settlement run (benchmarks/results/settle/) has cloud_only and three SPA rows but no
    spa_draft: the model replays the first SPA row's traces (every SPA row commits the same tokens)."""
    result = json.loads((ROOT / "benchmarks/results/settle/link-4g.json").read_text())
    assert "spa_draft" not in result["rows"]
    why = explain_result(result, "spa_settle")
    assert why["traced"] and why["documents"] == 10 and why["settle"]
    assert why["predicted"] + sum(why["lost"].values()) == pytest.approx(1.0)
