"""`spa bench load`'s arithmetic on known runs: medians over repeats, ratios, memory per session, goals.

The benchmark itself (real gateways, 64 sessions) is run by hand on a quiet
machine (README, benchmarks/results/load.txt); this checks what it prints
from what it measured.
"""

from benchmarks.load import compare_configs, format_load, format_replicas, replica_rows, summarize_config


def _run(n, tokens_per_s, ttft_p95, rss_peak, held=None):
    return {"sessions": n, "held": n if held is None else held, "errors": [], "tokens": 16 * n, "wall_s": 1.0,
            "tokens_per_s": tokens_per_s, "p95_itl_ms": 100.0, "p50_itl_ms": 50.0, "ttft_p50_s": ttft_p95 / 2,
            "ttft_p95_s": ttft_p95, "gateway_rss_before_mib": 900.0, "gateway_rss_peak_mib": rss_peak,
            "gateway_rss_after_mib": 905.0, "decode_steps": 16 * n, "batched_steps": 16 * (n - 1),
            "mean_batch": float(n), "max_batch": n, "side_usage": 0.3, "rollbacks": 1}


def _config(name, runs):
    return {"backbone": name, "dtype": "float32", "plugin": "p.pte", "tau": 0.5, "runs": runs}


def test_medians_ratios_memory_per_session_and_goals():
    fast = summarize_config(_config("a", {
        "batched:1": [_run(1, 10.0, 0.2, 1000.0), _run(1, 12.0, 0.3, 1000.0), _run(1, 11.0, 0.25, 1000.0)],
        "batched:64": [_run(64, 70.0, 4.0, 1126.0), _run(64, 80.0, 6.0, 1126.0), _run(64, 72.0, 4.5, 1126.0)],
    }), [1, 64])
    one, many = fast["rows"]
    assert one["tokens_per_s"] == 11.0 and one["tokens_per_s_range"] == (10.0, 12.0)
    assert many["tokens_per_s"] == 72.0 and abs(many["tokens_per_s_ratio"] - 72.0 / 11.0) < 1e-9
    assert many["ttft_p95_s"] == 4.5
    assert abs(many["rss_per_extra_session_mib"] - 2.0) < 1e-9  # (1126 - 1000) / 63
    assert many["decode_steps"] == 3 * 16 * 64  # summed over repeats
    speedup, ttft = fast["goals"]
    assert speedup["met"] and ttft["met"]

    slow = summarize_config(_config("b", {
        "batched:1": [_run(1, 20.0, 0.2, 500.0)],
        "batched:64": [_run(64, 60.0, 9.0, 600.0, held=63)],
    }), [1, 64])
    speedup, ttft = slow["goals"]
    assert not speedup["met"] and abs(speedup["value"] - 3.0) < 1e-9
    assert not ttft["met"] and slow["rows"][1]["held"] == 63

    compare_configs([fast, slow])
    assert abs(slow["rows"][1]["tokens_per_s_vs_first"] - 60.0 / 72.0) < 1e-9
    text = format_load({"max_new_tokens": 16, "window": 4, "codec": "int8", "repeats": 3, "cpus": 2,
                        "gateway_cpu": 1, "device_cpus": [0], "load_before": (0.5, 0.5, 0.5),
                        "load_after": (1.0, 1.0, 1.0), "configs": [fast, slow]})
    assert "64 sessions >= 6x the tokens/s of 1 session: 6.55 -> met" in text
    assert "3.00 -> MISSED by 50.0%" in text
    assert "load average before 0.50 0.50 0.50" in text


def test_replica_rows_compare_each_count_with_the_fewest_replicas_and_keep_each_runs_spread():
    runs = {
        (1, 16): [{**_run(16, 36.0, 2.0, 1050.0), "per_replica": [16]},
                  {**_run(16, 38.0, 2.0, 1060.0), "per_replica": [16]}],
        (2, 16): [{**_run(16, 40.0, 1.0, 1040.0), "per_replica": [8, 8]},
                  {**_run(16, 34.0, 1.0, 1030.0), "per_replica": [9, 7]}],
    }
    one, two = replica_rows(runs)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["tokens_per_s"] == 37.0 and one["tokens_per_s_vs_fewest"] == 1.0
    assert two["tokens_per_s"] == 37.0 and two["tokens_per_s_range"] == (34.0, 40.0)
    assert two["per_replica"] == [[8, 8], [9, 7]]
    text = format_replicas({"max_new_tokens": 16, "window": 4, "codec": "int8", "tau": 0.3, "cpus": 2, "repeats": 2,
                            "load_before": (0.25, 0.5, 0.5), "load_after": (1.0, 1.0, 1.0),
                            "replica_rows": [one, two],
                            "resume": {"ready_s": 0.1, "rows": [{"committed": 8, "resume_s": 0.5}],
                                       "rebuild_ms_per_token": 45.0}})
    assert "| 2 | 16 | 16 | 37.0 (1.00) [34.0-40.0] |" in text
    assert "| 8/8, 9/7 |" in text
    assert "load average before 0.25 0.50 0.50" in text
