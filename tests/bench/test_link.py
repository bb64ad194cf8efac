"""`spa bench link`: the emulated link is set up and always torn down; rows, ratios and JSON have their shape.

These tests check the harness, never timings: performance figures come from
`spa bench link` itself (README, "Performance"). Kernel-level links need root
(network namespaces, tbf, NFQUEUE); without it those tests are skipped and the
userspace proxy is tested instead.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.link import (NS_PREFIX, PROFILES, LinkProfile, NetnsLink, ProxyLink, cleanup_stale, make_link,
                             measure_link, netns_available, our_namespaces, run_command)
from benchmarks.linkbench import add_ratios, format_result, goals, lossless, plot_result, summarize_row
from benchmarks.provision import ensure_plugin, plugin_prompts
from spa.system.children import ROOT, python_command, python_env

NETNS, WHY = netns_available()
needs_netns = pytest.mark.skipif(not NETNS, reason=f"kernel-level link emulation unavailable: {WHY}")
TINY = LinkProfile("tiny", rtt_ms=10.0, down_mbit=50.0, up_mbit=50.0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _interruptible() -> None:
    """In the child: SIGINT as at a terminal. A suite started in the background of a non-interactive
    shell (`cmd &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spa_bench(*args, env_extra=None, merge=True) -> subprocess.Popen:
    return subprocess.Popen(python_command("cli.main", "bench", "link", *args), cwd=ROOT,
                            env=python_env(**(env_extra or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)


def helper_pids(output: str) -> set[int]:
    pids = set()
    for match in re.finditer(r"(?:helper pids: |pid )([\d ]+)", output):
        pids.update(int(p) for p in match.group(1).split())
    return pids


def assert_nothing_left(driver_pid: int, output: str) -> None:
    assert not [ns for ns in our_namespaces() if ns.startswith(f"{NS_PREFIX}{driver_pid}-")], output[-3000:]
    pids = helper_pids(output)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes left behind: {left}\n{output[-3000:]}"


# --- the link itself -----------------------------------------------------------------


@needs_netns
def test_netns_link_has_its_qdiscs_rules_and_delay_program_and_leaves_nothing():
    with NetnsLink(TINY) as link:
        assert {link.ns_gw, link.ns_dev} <= set(our_namespaces())
        qdisc = run_command("ip", "netns", "exec", link.ns_gw, "tc", "qdisc", "show", "dev", link.veth_gw).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc
        rules = run_command("ip", "netns", "exec", link.ns_dev, "iptables", "-t", "mangle", "-S", "PREROUTING").stdout
        assert "NFQUEUE" in rules
        helpers = link.child_pids()
        assert len(helpers) == 2 and all(alive(p) for p in helpers)
        measured = measure_link(link)
        assert measured["rtt_ms"] > 0 and measured["down_mbit"] > 0 and measured["up_mbit"] > 0
        counters = link.counters()
        assert counters["down"] > measured["down_bytes"]  # the probe's bytes crossed the device's veth
    assert not {link.ns_gw, link.ns_dev} & set(our_namespaces())
    assert not [p for p in helpers if alive(p)]
    assert run_command("ip", "link", "show", link.veth_gw, check=False).returncode != 0


@needs_netns
def test_a_failing_setup_removes_what_it_created(monkeypatch):
    import benchmarks.link as link_mod

    real_run = link_mod.run_command

    def failing(*cmd, check=True):
        if "tbf" in cmd:
            raise link_mod.SpaError("injected: tc failed")
        return real_run(*cmd, check=check)

    monkeypatch.setattr(link_mod, "run_command", failing)
    link = NetnsLink(TINY)
    with pytest.raises(link_mod.SpaError, match="injected"):
        with link:
            pass
    assert not {link.ns_gw, link.ns_dev} & set(our_namespaces())
    assert real_run("ip", "link", "show", link.veth_gw, check=False).returncode != 0


@needs_netns
def test_namespaces_of_a_killed_run_are_cleaned_up():
    dead = 4_000_000  # above pid_max: never a live process
    name = f"{NS_PREFIX}{dead}-g"
    run_command("ip", "netns", "add", name)
    try:
        assert name in cleanup_stale()
        assert name not in our_namespaces()
    finally:
        run_command("ip", "netns", "del", name, check=False)


def test_proxy_link_carries_data_and_stops_its_proxies():
    with ProxyLink(TINY) as link:
        measured = measure_link(link, seconds=0.2)
        helpers = link.child_pids()
        assert helpers and all(alive(p) for p in helpers)
    assert measured["rtt_ms"] > 0 and measured["down_mbit"] > 0
    time.sleep(0.2)
    assert not [p for p in helpers if alive(p)]


def test_profiles_and_link_choice():
    assert PROFILES["4g"].rtt_ms == 50 and PROFILES["4g"].down_mbit == 20
    assert make_link(PROFILES["loopback"]).mode == "none"
    assert make_link(PROFILES["4g"], "proxy").mode == "proxy"
    assert make_link(PROFILES["4g"]).mode == ("netns" if NETNS else "proxy")


# --- the quick plugin, from any working directory ----------------------------------------


def test_children_are_given_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = python_command("cli.main", "export", Path("runs/bench/plugin"), "--out", Path("/abs/export"), "--seed", 3)
    assert cmd[-5:] == [str(tmp_path / "runs/bench/plugin"), "--out", "/abs/export", "--seed", "3"]


def test_provisioning_from_another_directory_finds_what_its_children_wrote(quick_plugin_dir, tmp_path, monkeypatch):
    """`spa bench link` outside the repository root once failed: `spa export` ran in the root and wrote there,
    and the bench looked in its own directory ("runs/bench/export-... is not a plugin directory")."""
    monkeypatch.chdir(tmp_path)
    workdir = Path("runs/bench")  # relative, like the default --workdir
    shutil.copytree(quick_plugin_dir, workdir / "plugin-outcome-quick-lambda0.3")  # trained already: only export runs
    pte = ensure_plugin(None, workdir, log=lambda _: None)
    assert pte == workdir / "export-outcome-quick-lambda0.3" / "plugin-fp32.pte"
    assert (tmp_path / pte).is_file() and (tmp_path / pte.parent / "plugin-int8.pte").is_file()
    assert plugin_prompts(pte, ["aclsum:test:0"])[0]  # what a bench reads next, from the same relative path


# --- tear-down of a whole run, on failure and on a signal ---------------------------------


@pytest.mark.parametrize("stage", ["link", "servers"])
def test_a_failure_mid_run_leaves_no_namespace_rule_or_process(pte_path, tmp_path, stage):
    mode = "netns" if NETNS else "proxy"
    proc = spa_bench("--profile", "4g", "--link", mode, "--plugin", pte_path, "--rows", "cloud_only", "spa_draft",
                     "--docs", "aclsum:test:0", "--max-new-tokens", "2", "--out", tmp_path,
                     env_extra={"SPA_BENCH_FAIL_AT": stage})
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "injected failure" in output, output[-3000:]
    if stage == "servers":
        assert "spa gateway pid" in output and "baseline server pid" in output, output[-3000:]
    assert_nothing_left(proc.pid, output)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_tears_everything_down(pte_path, tmp_path, sig):
    mode = "netns" if NETNS else "proxy"
    proc = spa_bench("--profile", "3g", "--link", mode, "--plugin", pte_path, "--rows", "cloud_only",
                     "--docs", "aclsum:test:0", "--max-new-tokens", "2", "--out", tmp_path)
    lines = []
    for line in proc.stdout:  # wait until the link is up and measured
        lines.append(line)
        if line.startswith("link measured"):
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode != 0, output[-3000:]
    assert "interrupted" in output, output[-3000:]
    assert_nothing_left(proc.pid, output)


# --- statistics, ratios, output ---------------------------------------------------------


def _doc(tokens, commit_s, **kw):
    base = {"tokens": tokens, "commit_s": commit_s, "ttft_s": commit_s[0], "bytes_down": 100 * len(tokens),
            "bytes_up": 10 * len(tokens), "handshake_down": 50, "handshake_up": 500, "round_trips": len(tokens),
            "side_tokens": 0, "rollbacks": 0}
    return base | kw


def test_row_summary_ratios_and_goals_are_computed_from_the_documents(tmp_path):
    cloud = [_doc([1, 2, 3], [1.0, 1.1, 1.2]), _doc([4, 5], [2.0, 2.1])]
    spa = [_doc([1, 9, 3], [1.0, 1.2, 1.4], side_tokens=2, rollbacks=1), _doc([4, 5], [2.0, 2.2], side_tokens=1)]
    rows = {"cloud_only": summarize_row(cloud)}
    rows["spa_draft"] = summarize_row(spa, rows["cloud_only"] and [d["tokens"] for d in cloud])
    rows["side_every_token"] = summarize_row([_doc([1, 2], [1.0, 1.5])])
    rows["cloud_plugin"] = summarize_row([_doc([1, 9, 3], [1.0, 1.15, 1.3], side_tokens=2), _doc([4, 5], [2.0, 2.15])])
    for name, docs in (("spa_draft", spa), ("cloud_plugin", spa)):
        rows[name]["per_doc_tokens"] = [d["tokens"] for d in docs]
    c, s = rows["cloud_only"], rows["spa_draft"]
    assert c["tokens"] == 5 and c["tokens_per_s"] == pytest.approx(3 / 0.3)
    assert s["tokens_per_s"] == pytest.approx(3 / 0.6)
    assert s["ttft_s"] == pytest.approx(1.5)
    assert s["itl_p50_ms"] == pytest.approx(200)
    assert s["bytes_down_per_token"] == 100 and s["bytes_up_per_token"] == 10 and s["bytes_per_token"] == 110
    assert s["round_trips_per_token"] == 1 and s["side_usage"] == pytest.approx(3 / 5)
    assert s["change_rate"] == pytest.approx(1 / 3)
    assert s["same_tokens_as_cloud_only"] == pytest.approx(4 / 5)
    add_ratios(rows)
    assert c["tokens_per_s_vs_cloud_only"] == 1.0
    assert s["tokens_per_s_vs_cloud_only"] == pytest.approx(0.5)
    assert s["tokens_per_s_vs_ceiling"] == pytest.approx(0.75)  # against the plugin hosted in the cloud: 5 / 6.67
    assert rows["cloud_plugin"]["tokens_per_s_vs_ceiling"] == 1.0
    result = {"profile": PROFILES["4g"].to_dict(), "rows": rows, "docs": ["a", "b"], "max_new_tokens": 3,
              "per_layer_tokens": 2, "codec": "int8", "window": 8, "link": {"mode": "proxy", "description": "x"},
              "pinning": {"gateway_cpu": "0", "device_cpu": "1", "cpus": 2},
              "load_average_before": (1.0, 1.0, 1.0), "load_average_after": (1.0, 1.0, 1.0)}
    result["lossless"] = lossless(rows)
    assert result["lossless"]["against"] == "cloud_plugin" and result["lossless"]["identical"]
    result["goals"] = goals(result)
    met = {g["goal"].split(" (")[0]: g["met"] for g in result["goals"]}
    best = next(g for g in result["goals"] if g["goal"].startswith("best SPA row (spa_draft)"))
    assert best["met"] is False and best["missed_by"] == pytest.approx(0.45)
    assert best["vs_ceiling"] == pytest.approx(0.75)
    assert met["lossless: the SPA rows' tokens == cloud_plugin's"] is True
    assert met["spa_draft tokens/s >= 0.8x cloud_only"] is False
    assert met["spa_draft tokens/s >= 3x side_every_token"] is False  # 5 vs 2 tokens/s: 2.5x
    assert met["spa_draft bytes on the wire per token <= 2048"] is True
    text = format_result(result)
    assert "SPA draft-ahead" in text and "MISSED" in text and "shared, noisy machine" in text
    assert "x ceiling" in text and "plugin hosted in the cloud" in text
    assert "0.50 -> MISSED by 0.45; 0.75x ceiling (cloud_plugin)" in text  # the 4g goal: 0.95x cloud-only
    assert "best SPA row: spa_draft, 0.50x cloud-only" in text and "0.75x ceiling" in text
    assert "lossless: tokens identical to cloud_plugin (5 tokens) in every repeat: spa_draft yes -> yes" in text
    rows["spa_draft"]["per_doc_tokens"] = [[1, 9, 3], [4, 6]]
    result["lossless"] = lossless(rows)
    assert not result["lossless"]["identical"]
    assert "spa_draft NO (first difference: doc 1, token 1) -> NO" in format_result(result)
    png = plot_result(result, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_link_runs_every_network_row_and_prints_json(pte_path, tmp_path):
    """A short real run: real gateway, real baseline server, real websockets over the emulated 4g link."""
    profile = "4g"
    proc = spa_bench("--profile", profile, "--plugin", pte_path, "--docs", "aclsum:test:0", "--max-new-tokens", "4",
                     "--per-layer-tokens", "2", "--window", "4", "--rows", "cloud_only", "cloud_plugin",
                     "side_every_token", "per_layer", "spa_lockstep", "spa_draft", "spa_draft_proj", "spa_draft_push",
                     "spa_inflight", "spa_inflight_push", "--repeats", "2", "--json", "--out", tmp_path, merge=False)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    result = json.loads(out)
    rows = result["rows"]
    assert set(rows) == {"cloud_only", "cloud_plugin", "side_every_token", "per_layer", "spa_lockstep", "spa_draft",
                         "spa_draft_proj", "spa_draft_push", "spa_inflight", "spa_inflight_push"}, rows
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        for key in ("tokens_per_s", "ttft_s", "itl_p50_ms", "itl_p95_ms", "bytes_down_per_token",
                    "bytes_up_per_token", "round_trips_per_token", "side_usage", "change_rate",
                    "tokens_per_s_vs_cloud_only"):
            assert key in r, (name, key)
    assert rows["cloud_only"]["tokens_per_s_vs_cloud_only"] == 1.0
    assert rows["cloud_only"]["bytes_up_per_token"] == 0 and rows["cloud_only"]["round_trips_per_token"] == 0
    assert rows["side_every_token"]["side_usage"] == 1.0
    assert rows["side_every_token"]["round_trips_per_token"] == 2.0  # need_taps -> taps, side -> verdict
    assert rows["per_layer"]["round_trips_per_token"] == 30  # SmolLM2's 30 layers
    assert rows["spa_lockstep"]["per_doc_tokens"] == rows["spa_draft"]["per_doc_tokens"]  # lossless draft-ahead
    assert rows["spa_draft_push"]["per_doc_tokens"] == rows["spa_draft_proj"]["per_doc_tokens"]  # pushed taps too
    for name in ("spa_inflight", "spa_inflight_push", "cloud_plugin"):  # in flight, and the plugin in the cloud
        assert rows[name]["per_doc_tokens"] == rows["spa_draft"]["per_doc_tokens"], name
    assert result["lossless"]["against"] == "cloud_plugin" and result["lossless"]["identical"], result["lossless"]
    assert rows["cloud_plugin"]["round_trips_per_token"] == 0 and rows["cloud_plugin"]["bytes_up_per_token"] == 0
    for r in rows.values():  # every row ran twice, interleaved; a ratio per repeat, median and spread
        assert r["repeats"] == 2 and len(r["tokens_per_s_runs"]) == 2 and r["same_tokens_every_repeat"]
        assert r["vs_cloud_only_min"] <= r["tokens_per_s_vs_cloud_only"] <= r["vs_cloud_only_max"]
    assert rows["spa_draft_proj"]["handshake_bytes"] > rows["spa_draft"]["handshake_bytes"] + 500_000  # the upload
    assert result["link"]["mode"] == ("netns" if NETNS else "proxy")
    assert result["link"]["measured"]["rtt_ms"] > 0
    assert {g["goal"].split(" (")[0] for g in result["goals"]} >= {"spa_draft tokens/s >= 0.8x cloud_only"}
    # The per-token trace the model replays: every committed token's sigma and whether its verdict changed it.
    draft = rows["spa_draft"]
    assert [len(t["sigma"]) for t in draft["traces"]] == [len(t) for t in draft["per_doc_tokens"]]
    assert sum(t["sigma"].count("1") for t in draft["traces"]) == round(draft["side_usage"] * draft["tokens"])
    assert sum(t["changed"].count("1") for t in draft["traces"]) == draft["rollbacks"]
    assert all(c == "0" or s == "1" for t in draft["traces"] for s, c in zip(t["sigma"], t["changed"]))
    best = next(g for g in result["goals"] if g["goal"].startswith("best SPA row"))
    assert best["why"]["traced"] and best["why"]["documents"] == 1  # replayed from this run's trace
    assert (tmp_path / f"link-{profile}.json").exists() and (tmp_path / f"link-{profile}.png").exists()
    assert_nothing_left(proc.pid, err)


def test_the_plugin_hosted_in_the_cloud_commits_the_spa_tokens_and_is_the_ceiling(pte_path, tmp_path):
    """The ceiling row on loopback, a few tokens: the baseline server runs the .pte beside the backbone with the
    split's step and codec, so its tokens are the SPA row's; every row reads as a share of it."""
    proc = spa_bench("--profile", "loopback", "--plugin", pte_path, "--docs", "aclsum:test:0", "--max-new-tokens", "8",
                     "--rows", "cloud_only", "cloud_plugin", "spa_draft", "--repeats", "1", "--out", tmp_path,
                     merge=False)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    rows = json.loads((tmp_path / "link-loopback.json").read_text())["rows"]
    ceiling, spa = rows["cloud_plugin"], rows["spa_draft"]
    assert "error" not in ceiling, ceiling
    assert ceiling["per_doc_tokens"] == spa["per_doc_tokens"] and ceiling["tokens"] == 8
    assert ceiling["side_usage"] == spa["side_usage"]  # the same gate on the same quantized f_t
    assert ceiling["round_trips_per_token"] == 0 and ceiling["bytes_up_per_token"] == 0
    assert ceiling["tokens_per_s_vs_ceiling"] == 1.0 and spa["tokens_per_s_vs_ceiling"] > 0
    assert re.search(r"^row .* x cloud +min-max +paired +x ceiling", out, re.M), out  # the columns beside x cloud
    assert re.search(r"^best SPA row: spa_draft, [\d.]+x cloud-only .*, [\d.]+x ceiling", out, re.M), out
    assert "lossless: tokens identical to cloud_plugin (8 tokens) in every repeat: spa_draft yes -> yes" in out, out


def test_a_saved_result_is_reported_again_with_why_its_goals_are_missed(tmp_path):
    """`spa bench link --report`: nothing runs; the committed 4g result gets this version's goals, text and plot."""
    proc = spa_bench("--report", ROOT / "benchmarks/results/link-4g.json", "--out", tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    text = (tmp_path / "link-4g.txt").read_text()
    assert "why, from the trace" in text and "lost to rollbacks" in text, text[-2000:]
    saved = json.loads((tmp_path / "link-4g.json").read_text())
    best = next(g for g in saved["goals"] if g["goal"].startswith("best SPA row"))
    assert best["met"] is False and best["why"]["traced"]
    assert best["why"]["predicted"] + sum(best["why"]["lost"].values()) == pytest.approx(1.0)
    assert (tmp_path / "link-4g.png").exists()
    bad = spa_bench("--report", tmp_path / "missing.json", "--out", tmp_path)
    out, _ = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "not a readable spa bench link result" in out and "Traceback" not in out, out
