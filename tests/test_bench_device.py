"""`spa bench device`: the local ExecuTorch measurement and the adb path.

No phone exists here: the adb path is driven by tests/fake_adb/adb, a
STAND-IN that replays device output in the format of adb, `am start -W` and
the app's benchmark mode (tests/fake_adb/replay/README.md). The real `adb` is
used when a phone is attached (`spa bench device --adb`).
"""

import json
import os
from pathlib import Path

import pytest

from benchmarks.devicebench import SCHEMA, format_table, parse_logcat, run_adb, run_local, validate
from spa.errors import SpaError
from tests.conftest import ROOT, run_spa

STAND_IN_ADB = ROOT / "tests" / "fake_adb" / "adb"


@pytest.fixture
def adb_state(tmp_path, monkeypatch):
    state = tmp_path / "phone-state"
    monkeypatch.setenv("FAKE_ADB_STATE", str(state))
    monkeypatch.delenv("FAKE_ADB_MODE", raising=False)
    return state


@pytest.fixture
def ptes(tmp_path):
    paths = []
    for name, size in (("plugin-fp32.pte", 3000), ("plugin-int8.pte", 1000)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def test_local_measurement_of_each_variant_in_its_own_process(exported):
    out, manifest = exported
    files = [out / v["file"] for v in manifest["variants"].values()]
    result = run_local(files, iterations=10, warmup=2, log=lambda _: None)
    validate(result)
    assert result["schema"] == SCHEMA and result["ok"], result
    assert [r["pte"] for r in result["results"]] == [str(f) for f in files]
    for r, f in zip(result["results"], files):
        assert r["file_bytes"] == f.stat().st_size
        assert r["content_hash"] == manifest["content_hash"] and r["n_taps"] == len(manifest["taps"])
        for method in ("gate_ms", "side_ms"):
            stats = r[method]
            assert stats["calls"] == 10 and 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
        assert r["load_ms"] > 0 and r["peak_rss_kb"] >= r["rss_kb_before"] > 0
        assert 0 <= r["gate_p"] <= 1
    table = format_table(result)
    assert "plugin-fp32.pte" in table and "plugin-int8.pte" in table and "goal gate + side" in table


def test_local_measurement_reports_a_broken_file_as_an_error_row(tmp_path):
    bad = tmp_path / "broken.pte"
    bad.write_bytes(b"not a program")
    result = run_local([bad], iterations=2, warmup=0, log=lambda _: None)
    assert not result["ok"] and result["results"][0]["error"]
    assert "error" in format_table(result)


def test_adb_path_pushes_starts_the_benchmark_activity_polls_and_pulls(adb_state, ptes, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_POLLS", "3")  # SPA_BENCH_DONE appears on the third logcat poll
    result = run_adb(ptes, adb=str(STAND_IN_ADB), iterations=50, warmup=5, poll_s=0.01, log=lambda _: None)
    assert result["schema"] == SCHEMA and result["example"] is True  # replayed example data, never a measurement
    assert [r["pte"] for r in result["results"]] == ["/data/local/tmp/spa/plugin-fp32.pte",
                                                     "/data/local/tmp/spa/plugin-int8.pte"]
    assert [r["file_bytes"] for r in result["results"]] == [3000, 1000]  # what was pushed
    assert result["iterations"] == 50 and result["warmup"] == 5
    seen = calls(adb_state)
    assert seen[0] == ["devices"]
    assert ["shell", "mkdir", "-p", "/data/local/tmp/spa"] in seen
    assert ["push", *map(str, ptes), "/data/local/tmp/spa/"] in seen
    start = next(c for c in seen if c[:3] == ["shell", "am", "start"])
    assert start[start.index("-n") + 1] == "org.spa.demo/.BenchmarkActivity" and "-S" in start and "-W" in start
    assert start[start.index("pte") + 1] == "/data/local/tmp/spa/plugin-fp32.pte,/data/local/tmp/spa/plugin-int8.pte"
    assert seen.index(["logcat", "-c"]) < seen.index(start)
    assert sum(c[:2] == ["logcat", "-d"] for c in seen) == 3
    assert seen[-1][0] == "pull" and seen[-1][1] == "/sdcard/Android/data/org.spa.demo/files/bench.json"
    table = format_table(result)
    assert "example" in table and "not evaluated" in table


def test_adb_serial_is_passed_and_checked(adb_state, ptes):
    run_adb(ptes[:1], adb=str(STAND_IN_ADB), serial="STANDIN0001", poll_s=0.01, log=lambda _: None)
    assert all(c[:2] == ["-s", "STANDIN0001"] for c in calls(adb_state)[1:])
    with pytest.raises(SpaError, match="no phone 'OTHER' attached"):
        run_adb(ptes[:1], adb=str(STAND_IN_ADB), serial="OTHER", poll_s=0.01, log=lambda _: None)


@pytest.mark.parametrize("mode, message", [("no_device", "no phone attached"),
                                           ("app_fails", "benchmark failed: cannot load"),
                                           ("never_done", "no SPA_BENCH_DONE")])
def test_adb_failures_are_one_line_errors(adb_state, ptes, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_ADB_MODE", mode)
    with pytest.raises(SpaError, match=message):
        run_adb(ptes, adb=str(STAND_IN_ADB), timeout=0.3, poll_s=0.05, log=lambda _: None)


def test_missing_adb_and_missing_files_are_reported(ptes, tmp_path):
    with pytest.raises(SpaError, match="adb not found"):
        run_adb(ptes, adb=str(tmp_path / "no-adb"), log=lambda _: None)
    with pytest.raises(SpaError, match="no such .pte"):
        run_adb([tmp_path / "missing.pte"], adb=str(STAND_IN_ADB), log=lambda _: None)


def test_logcat_parsing_and_schema_validation():
    state, path, results = parse_logcat('I SPA : SPA_BENCH_RESULT {"pte": "a", "file_bytes": 1, "error": "x"}\n'
                                        "I SPA : SPA_BENCH_DONE /sdcard/x.json\n")
    assert state == "done" and path == "/sdcard/x.json" and results[0]["pte"] == "a"
    assert parse_logcat("E SPA : SPA_BENCH_FAILED no --es pte")[:2] == ("failed", "no --es pte")
    assert parse_logcat("--------- beginning of main")[0] == "running"
    example = json.loads((ROOT / "android_demo" / "bench_example.json").read_text())
    validate(example)  # the app's documented example has the schema this tool reads
    broken = dict(example, results=[{"pte": "a", "file_bytes": 1, "error": None}])
    with pytest.raises(SpaError, match="lacks load_ms"):
        validate(broken)
    with pytest.raises(SpaError, match="not a spa-android-bench/1"):
        validate({"schema": "other"})


def test_cli_adb_json(adb_state, ptes, tmp_path):
    proc = run_spa("bench", "device", "--adb", "--adb-path", STAND_IN_ADB, *ptes, "--json", "--out", tmp_path / "o")
    result = json.loads(proc.stdout)
    assert result["adb"]["serial"] == "STANDIN0001" and len(result["results"]) == 2
    assert json.loads((tmp_path / "o" / "device-adb.json").read_text())["results"] == result["results"]
