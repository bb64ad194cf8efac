"""`spa bench device`: the local ExecuTorch measurement and the adb path.

No phone exists here: the adb path is driven by tests/fake_adb/adb, a
STAND-IN that replays device output in the format of adb, `am start -W` and
the app's benchmark mode (tests/fake_adb/replay/README.md). The real `adb` is
used when a phone is attached (`spa bench device --adb`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.devicebench import (DEFAULT_APK, SCHEMA, apk_info, format_e2e, format_table, parse_logcat, run_adb,
                                    run_adb_e2e, run_local, validate)
from spa.errors import SpaError
from tests.conftest import GATEWAY_TOKEN, ROOT, run_spa

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
    result = run_adb(ptes, adb=str(STAND_IN_ADB), iterations=50, warmup=5, poll_s=0.01, install=False, log=lambda _: None)
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
    assert seen.index(["shell", "rm", "-f", "/sdcard/Android/data/org.spa.demo/files/bench.json"]) < seen.index(start)
    assert result["adb"]["completion"] == "logcat"
    table = format_table(result)
    assert "example" in table and "not evaluated" in table


def test_adb_serial_is_passed_and_checked(adb_state, ptes):
    run_adb(ptes[:1], adb=str(STAND_IN_ADB), serial="STANDIN0001", poll_s=0.01, install=False, log=lambda _: None)
    assert all(c[:2] == ["-s", "STANDIN0001"] for c in calls(adb_state)[1:])
    with pytest.raises(SpaError, match="no phone 'OTHER' attached"):
        run_adb(ptes[:1], adb=str(STAND_IN_ADB), serial="OTHER", poll_s=0.01, install=False, log=lambda _: None)


@pytest.mark.parametrize("mode, message", [("no_device", "no phone attached"),
                                           ("app_fails", "benchmark failed: cannot load"),
                                           ("never_done", "no SPA_BENCH_DONE")])
def test_adb_failures_are_one_line_errors(adb_state, ptes, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_ADB_MODE", mode)
    with pytest.raises(SpaError, match=message):
        run_adb(ptes, adb=str(STAND_IN_ADB), timeout=0.3, poll_s=0.05, install=False, log=lambda _: None)


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
    proc = run_spa("bench", "device", "--adb", "--adb-path", STAND_IN_ADB, "--no-install", *ptes, "--json", "--out", tmp_path / "o")
    result = json.loads(proc.stdout)
    assert result["adb"]["serial"] == "STANDIN0001" and len(result["results"]) == 2
    assert json.loads((tmp_path / "o" / "device-adb.json").read_text())["results"] == result["results"]


# --- the app's APK, the result file, and the end-to-end run (stand-in adb: no phone) -------


@pytest.fixture(scope="module")
def built_apk() -> Path:
    """android_demo's APK (android_demo/scripts/build_apk.sh; fast when up to date)."""
    proc = subprocess.run([str(ROOT / "android_demo" / "scripts" / "build_apk.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return DEFAULT_APK


def test_adb_installs_the_apk_when_missing_older_or_another_build(adb_state, ptes, built_apk, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_APP", "none")
    info = apk_info(built_apk)
    quiet = dict(adb=str(STAND_IN_ADB), poll_s=0.01, apk=built_apk, log=lambda _: None)
    first = run_adb(ptes[:1], **quiet)
    assert first["adb"]["app"]["action"] == "installed" and first["adb"]["app"]["reason"] == "not installed"
    installs = [c for c in calls(adb_state) if c[0] == "install"]
    assert installs == [["install", "-r", str(built_apk)]]
    assert calls(adb_state).index(installs[0]) < next(i for i, c in enumerate(calls(adb_state)) if c[:3] == ["shell", "am", "start"])
    second = run_adb(ptes[:1], **quiet)  # same build installed: nothing to do
    assert second["adb"]["app"]["action"] == "up to date"
    assert len([c for c in calls(adb_state) if c[0] == "install"]) == 1
    app = adb_state / "app.json"
    app.write_text(json.dumps({"version_code": info["version_code"] - 1, "sha256": info["sha256"]}))
    assert run_adb(ptes[:1], **quiet)["adb"]["app"]["reason"].startswith("installed versionCode")
    app.write_text(json.dumps({"version_code": info["version_code"], "sha256": "0" * 64}))
    assert run_adb(ptes[:1], **quiet)["adb"]["app"]["reason"] == "another build of the same versionCode"
    assert len([c for c in calls(adb_state) if c[0] == "install"]) == 3


def test_adb_without_the_app_and_no_install_says_so(adb_state, ptes, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_APP", "none")
    with pytest.raises(SpaError, match="org.spa.demo is not installed"):
        run_adb(ptes, adb=str(STAND_IN_ADB), install=False, log=lambda _: None)


def test_completion_is_read_from_the_result_file_when_logcat_has_nothing(adb_state, ptes, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_MODE", "file_only")
    result = run_adb(ptes, adb=str(STAND_IN_ADB), poll_s=0.01, timeout=5, install=False, log=lambda _: None)
    assert result["adb"]["completion"] == "result file"
    assert [r["file_bytes"] for r in result["results"]] == [3000, 1000]
    assert not any(c[0] == "pull" for c in calls(adb_state))


def test_end_to_end_on_the_phone_through_adb_reverse(adb_state, built_apk, pte_path, gateway, monkeypatch):
    """The harness's e2e path: install, reverse, push, am start (mode summarize), result, host comparison.

    The stand-in runs the "phone's" session on this host with the Python client (no phone exists
    here), through the gateway port that the harness reversed.
    """
    monkeypatch.setenv("FAKE_ADB_APP", "none")
    monkeypatch.setenv("FAKE_ADB_PYTHON", sys.executable)
    port = int(gateway.url.rsplit(":", 1)[1])
    r = run_adb_e2e(pte_path, doc="aclsum:test:0", window=2, max_new_tokens=8, gateway_url=gateway.url,
                    token=GATEWAY_TOKEN, adb=str(STAND_IN_ADB), apk=built_apk, poll_s=0.05, timeout=600,
                    log=lambda _: None)
    seen = calls(adb_state)
    assert ["install", "-r", str(built_apk)] in seen
    # the output head `spa export` cached goes where the app looks for it (GatewayConnector.HEADS)
    assert any(c[0] == "push" and c[1].endswith(".safetensors") and c[2] == "/data/local/tmp/spa/heads/" for c in seen)
    rev = seen.index(["reverse", f"tcp:{port}", f"tcp:{port}"])
    start = next(i for i, c in enumerate(seen) if c[:3] == ["shell", "am", "start"])
    assert rev < start < seen.index(["reverse", "--remove", f"tcp:{port}"])  # forwarded for the run, removed after
    args = seen[start]
    assert args[args.index("mode") + 1] == "summarize"
    assert args[args.index("gateway") + 1] == f"ws://127.0.0.1:{port}"
    assert args[args.index("token") + 1] == GATEWAY_TOKEN
    assert r["stand_in"] and "no phone" in r["stand_in"]
    assert len(r["phone"]["tokens"]) == 8 and r["same_tokens"]
    for side in ("phone", "host"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["bytes_down_per_token"] > 0
        assert r[side]["round_trips_per_token"] is not None
    table = format_e2e(r)
    assert "phone (app, Java, ExecuTorch)" in table and "host (Python client)" in table and "NOTE:" in table
