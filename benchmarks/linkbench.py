"""`spa bench link`: every way to split (or not split) generation, side by side over one emulated link.

Rows (the same ACLSum test documents, the same prompt text, greedy):

| row              | what runs                                                                         |
|------------------|-----------------------------------------------------------------------------------|
| cloud_only       | backbone alone in the cloud, tokens streamed as chosen (no plugin, no activations) |
| cloud_plugin     | the plugin hosted in the cloud beside the backbone: SPA's tokens, no RT (ceiling)  |
| side_every_token | SPA gateway, side network on every token (tau < 0), lock-step (W = 0)             |
| per_layer        | adapter/LoRA-style split: one round trip per backbone layer per token              |
| spa_lockstep     | SPA gateway, the plugin's trained tau, W = 0                                       |
| spa_draft        | SPA gateway, the plugin's trained tau, draft-ahead W > 0                           |
| spa_draft_proj   | spa_draft with the cloud-side projection (r values per tap; weights uploaded once) |
| spa_draft_push   | spa_draft_proj with pushed taps (gate uploaded: taps come with the step)           |
| spa_inflight     | spa_draft with several side outputs in flight (the device gates ahead of verdicts) |
| spa_inflight_push| spa_inflight with pushed taps and no projection (the choice for a slow uplink)     |
| spa_branches     | spa_inflight on a second gateway drafting branches (`--branches 2`)               |
| spa_settle       | in flight + pushed taps + projection (by hash) + settlement: the device proves    |
|                  | its side tokens, no verdict waited for, s_t never uploaded for a settled token     |
| spa_settle_branches | spa_settle on the branch gateway: its branch lines streamed to the device      |
| device_only      | the whole backbone as one ExecuTorch program on the device, no network            |

Repeats: every row runs `repeats` times (default 3), the rows interleaved
(each repeat starts one row later), so that a slow minute of a shared machine
does not land on one row. Each row reports the median tokens/s, and its ratio
to cloud-only is the median of the per-repeat ratios (each against the
cloud-only run of the same repeat), with the min and max beside it; its
ratio to the ceiling (cloud_plugin: what a user gets by uploading the whole
plugin, no privacy) likewise. The rows that run the SPA rule at the same tau
(the SPA rows, cloud_plugin) must commit the same tokens: the output says
whether they do (`lossless`).

Process layout: the servers (`spa gateway`, `benchmarks.baseline_server`)
run on the gateway side of the link pinned to CPU 0; each row's device side
(`benchmarks.device_worker`) runs on the device side pinned to CPU 1, one
process per row, ExecuTorch with one thread. Both with OMP_NUM_THREADS=1.

Tear-down: the link, the servers and the workers are stopped in `finally`
blocks; SIGTERM is turned into an exception like SIGINT, so both tear down.
"""

import json
import os
import secrets
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.link import PROFILES, Link, make_link, measure_link
from benchmarks.provision import DEFAULT_SKIP_COST, ensure_plugin, plugin_prompts
from benchmarks.stats import fmt, percentile
from benchmarks.tracemodel import MEASURED, MEASURED_GOALS, explain_result, format_why, traced_row
from cloud_gateway.process import GatewayProcess
from spa.system.children import ServerProcess, pinned, python_command, python_env, run
from spa.errors import SpaError

ROWS = ("cloud_only", "cloud_plugin", "side_every_token", "per_layer", "spa_lockstep", "spa_draft", "spa_draft_proj",
        "spa_draft_push", "spa_inflight", "spa_inflight_push", "spa_branches", "spa_settle", "spa_settle_branches",
        "device_only")
SPA_ROWS = ("spa_lockstep", "spa_draft", "spa_draft_proj", "spa_draft_push", "spa_inflight", "spa_inflight_push",
            "spa_branches", "spa_settle", "spa_settle_branches")
BRANCHES = 2  # the spa_branches row's gateway: `spa gateway --branches 2`
ROW_TITLES = {
    "cloud_only": "cloud-only (backbone alone, streamed)",
    "cloud_plugin": "plugin hosted in the cloud (ceiling: no privacy, no RT)",
    "side_every_token": "side on every token, lock-step",
    "per_layer": "per-layer split (adapter/LoRA, 1 RT/layer)",
    "spa_lockstep": "SPA lock-step (W=0, trained tau)",
    "spa_draft": "SPA draft-ahead (W>0, trained tau)",
    "spa_draft_proj": "SPA draft-ahead + cloud-side projection",
    "spa_draft_push": "SPA draft-ahead + projection + pushed taps",
    "spa_inflight": "SPA draft-ahead + side outputs in flight",
    "spa_inflight_push": "SPA in flight + pushed taps (no projection)",
    "spa_branches": f"SPA in flight + branches K={BRANCHES}",
    "spa_settle": "SPA settled on the device (+ push, projection, in flight)",
    "spa_settle_branches": f"SPA settled + streamed branches K={BRANCHES}",
    "device_only": "device-only (whole backbone, ExecuTorch)",
}
CEILING = "cloud_plugin"  # every SPA row also reads as a share of it
FAIL_ENV = "SPA_BENCH_FAIL_AT"  # test hook: "link" or "servers" raises right after that stage


def _sigterm_to_exception():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _maybe_fail(stage: str) -> None:
    if os.environ.get(FAIL_ENV) == stage:
        raise RuntimeError(f"injected failure after the {stage} stage ({FAIL_ENV}={stage})")


# --- the device-only model ----------------------------------------------------


def _backbone_fingerprint() -> str:
    from spa.model.backbone import IDENTITY_FILE, default_backbone_dir

    return json.loads((default_backbone_dir() / IDENTITY_FILE).read_text())["fingerprint"]


def device_only_dir() -> Path:
    from spa.system.paths import cache_dir

    return cache_dir() / "device_only"


def ensure_device_only(variant: str, log=print) -> tuple[Path, dict]:
    """The whole-backbone .pte for the device-only row (exported once, cached with its parity report)."""
    out = device_only_dir()
    path, report_file = out / f"backbone-{variant}.pte", out / f"backbone-{variant}.json"
    if path.exists() and report_file.exists():
        report = json.loads(report_file.read_text())
        from export.device_only import MODULE_VERSION

        if (report.get("backbone", {}).get("fingerprint") == _backbone_fingerprint()
                and report.get("module_version") == MODULE_VERSION):
            return path, report
    log(f"exporting the whole backbone to ExecuTorch ({variant}) for the device-only row (once, a few minutes)...")
    proc = run(python_command("export.device_only", "--out", out, "--variant", variant))
    if proc.returncode != 0 or not report_file.exists():
        raise SpaError(f"backbone export failed: {proc.stderr[-3000:]}")
    return path, json.loads(report_file.read_text())


# --- statistics --------------------------------------------------------------


def summarize_row(docs: list[dict], reference: list[list[int]] | None = None) -> dict:
    """Per-row figures from the per-document results of a device worker."""
    tokens = sum(len(d["tokens"]) for d in docs)
    n = max(tokens, 1)
    gaps = [b - a for d in docs for a, b in zip(d["commit_s"], d["commit_s"][1:])]
    decode_tokens = sum(len(d["commit_s"]) - 1 for d in docs)
    decode_time = sum(d["commit_s"][-1] - d["commit_s"][0] for d in docs if d["commit_s"])
    side = sum(d["side_tokens"] for d in docs)
    out = {
        "docs": len(docs),
        "tokens": tokens,
        "tokens_per_s": decode_tokens / decode_time if decode_time > 0 else None,
        "tokens_per_s_end_to_end": tokens / sum(d["commit_s"][-1] for d in docs if d["commit_s"]) if tokens else None,
        # Per document, for ratios paired with the baseline's same document (a document's own
        # length and side usage then cancel out, and the spread narrows).
        "per_doc_tokens_per_s": [(len(d["commit_s"]) - 1) / (d["commit_s"][-1] - d["commit_s"][0])
                                 if len(d["commit_s"]) > 1 and d["commit_s"][-1] > d["commit_s"][0] else None
                                 for d in docs],
        "ttft_s": statistics.mean(d["ttft_s"] for d in docs if d["ttft_s"] is not None) if docs else None,
        "itl_p50_ms": None if not gaps else percentile(gaps, 0.50) * 1000,
        "itl_p95_ms": None if not gaps else percentile(gaps, 0.95) * 1000,
        "bytes_down_per_token": sum(d["bytes_down"] for d in docs) / n,
        "bytes_up_per_token": sum(d["bytes_up"] for d in docs) / n,
        "bytes_per_token": sum(d["bytes_down"] + d["bytes_up"] for d in docs) / n,
        "handshake_bytes": sum(d["handshake_down"] + d["handshake_up"] + d.get("prefill_down", 0) + d.get("prefill_up", 0)
                               for d in docs) / max(len(docs), 1),
        "round_trips_per_token": sum(d["round_trips"] for d in docs) / n,
        "side_usage": side / n,
        "rollbacks": sum(d["rollbacks"] for d in docs),
        "change_rate": sum(d["rollbacks"] for d in docs) / side if side else 0.0,
        # Settlement: side tokens proven on the device, and the side outputs that left it (fallbacks).
        "settled": sum(d.get("settled", 0) for d in docs),
        "side_outputs_up": sum(d.get("messages_up", {}).get("side", 0) for d in docs),
    }
    if reference is not None:
        same = total = 0
        for d, ref in zip(docs, reference):
            for a, b in zip(d["tokens"], ref):
                same += a == b
                total += 1
        out["same_tokens_as_cloud_only"] = same / total if total else None
    if all("changed" in d for d in docs):
        # The per-token trace `spa bench model` replays: per document, sigma and changed as "0"/"1" strings.
        out["traces"] = [{"sigma": "".join(map(str, d["sigmas"])), "changed": "".join(map(str, d["changed"]))}
                         for d in docs]
    return out


def add_ratios(rows: dict) -> None:
    """Ratios to cloud-only (`..._vs_cloud_only`, `vs_cloud_only_...`) and to the ceiling, the plugin
    hosted in the cloud (`..._vs_ceiling`, `vs_ceiling_...`): per repeat where the rows carry their
    runs (median, min, max), else of the figures."""
    for base_name, key in (("cloud_only", "cloud_only"), (CEILING, "ceiling")):
        base = rows.get(base_name)
        if base is None or "error" in base:
            continue
        for name, r in rows.items():
            if "error" in r:
                continue
            runs, base_runs = r.get("tokens_per_s_runs"), base.get("tokens_per_s_runs")
            if runs and base_runs and len(runs) == len(base_runs) and all(runs + base_runs):
                ratios = [a / b for a, b in zip(runs, base_runs)]
                r[f"vs_{key}_runs"] = ratios
                r[f"tokens_per_s_vs_{key}"] = statistics.median(ratios)
                r[f"vs_{key}_min"], r[f"vs_{key}_max"] = min(ratios), max(ratios)
            else:
                tps, btps = r.get("tokens_per_s"), base.get("tokens_per_s")
                r[f"tokens_per_s_vs_{key}"] = tps / btps if tps and btps else None
            paired = _paired_ratios(r.get("per_doc_tokens_per_s_runs"), base.get("per_doc_tokens_per_s_runs"))
            if paired:
                r[f"vs_{key}_paired"] = {"median": statistics.median(paired), "p25": percentile(paired, 0.25),
                                         "p75": percentile(paired, 0.75), "pairs": len(paired)}
            if key == "cloud_only":
                r["ttft_vs_cloud_only"] = (r["ttft_s"] / base["ttft_s"] if r.get("ttft_s") and base.get("ttft_s")
                                           else None)


def _paired_ratios(runs, base_runs) -> list[float]:
    """Each document's tokens/s over the baseline's on the same document in the same repeat."""
    if not runs or not base_runs or len(runs) != len(base_runs):
        return []
    return [a / b for run, base in zip(runs, base_runs) if run and base and len(run) == len(base)
            for a, b in zip(run, base) if a and b]


def lossless(rows: dict) -> dict | None:
    """Whether the rows that run the SPA rule (the SPA rows and the plugin in the cloud, at the same tau)
    committed the same tokens, in every repeat: each against the plugin in the cloud (the in-process
    reference's step, `spa.model.spa_rule.split_state`), or the first SPA row where that row did not run."""
    names = [n for n in (CEILING, *SPA_ROWS) if n in rows and "error" not in rows[n] and "per_doc_tokens" in rows[n]]
    if len(names) < 2:
        return None
    ref = rows[names[0]]
    out = {"against": names[0], "tokens": ref["tokens"], "rows": {}}
    for name in names[1:]:
        r = rows[name]
        first = next(((d, i) for d, (a, b) in enumerate(zip(r["per_doc_tokens"], ref["per_doc_tokens"]))
                      for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1]), None)
        out["rows"][name] = {"identical": first is None and len(r["per_doc_tokens"]) == len(ref["per_doc_tokens"])
                             and bool(r.get("same_tokens_every_repeat", True)),
                             "first_difference": None if first is None else {"doc": first[0], "position": first[1]}}
    out["against_same_every_repeat"] = bool(ref.get("same_tokens_every_repeat", True))
    out["identical"] = all(v["identical"] for v in out["rows"].values()) and out["against_same_every_repeat"]
    return out


def merge_repeats(summaries: list[dict]) -> dict:
    """One row from its repeats: the first repeat's figures (bytes, round trips and tokens do not
    depend on timing), the median of the timed ones, and every repeat's tokens/s."""
    row = dict(summaries[0])
    for key in ("tokens_per_s", "tokens_per_s_end_to_end", "ttft_s", "itl_p50_ms", "itl_p95_ms", "wall_s"):
        values = [s[key] for s in summaries if s.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["tokens_per_s_runs"] = [s.get("tokens_per_s") for s in summaries]
    row["per_doc_tokens_per_s_runs"] = [s.get("per_doc_tokens_per_s") for s in summaries]
    row["repeats"] = len(summaries)
    row["same_tokens_every_repeat"] = all(s["per_doc_tokens"] == row["per_doc_tokens"] for s in summaries)
    return row


def goals(result: dict) -> list[dict]:
    """The issue's goals, measured against this run (not faked: missing rows are 'not measured')."""
    rows = result["rows"]
    out = []

    def ratio(a, b):
        ra, rb = rows.get(a, {}), rows.get(b, {})
        x, y = ra.get("tokens_per_s"), rb.get("tokens_per_s")
        return x / y if x and y else None

    profile = result["profile"]["name"]
    target = MEASURED_GOALS.get(profile)
    best = _best_spa(rows)
    if target is not None and best:
        value = rows[best]["tokens_per_s_vs_cloud_only"]
        out.append({"goal": f"best SPA row ({best}) tokens/s >= {target:g}x cloud_only ({profile}, median over "
                            f"repeats)", "value": value, "target": target, "met": value >= target,
                    "missed_by": max(target - value, 0.0), "vs_ceiling": rows[best].get("tokens_per_s_vs_ceiling"),
                    "why": _why(result, best)})
    same = result.get("lossless")
    if same:
        value = sum(v["identical"] for v in same["rows"].values()) / len(same["rows"])
        out.append({"goal": f"lossless: the SPA rows' tokens == {same['against']}'s (share of rows identical in every "
                            f"repeat)", "value": value, "target": 1.0, "met": same["identical"],
                    "missed_by": 1.0 - value})
    for a in ("spa_draft", "spa_draft_push"):
        for b, target in (("cloud_only", 0.8), ("side_every_token", 3.0)):
            value = ratio(a, b)
            if value is None and a != "spa_draft":
                continue
            out.append({"goal": f"{a} tokens/s >= {target:g}x {b} ({profile}; the goal is stated for 4g)",
                        "value": value, "target": target, "met": None if value is None else value >= target,
                        "missed_by": None if value is None else max(target - value, 0.0)})
    for name in ("spa_settle", "spa_settle_branches"):
        r = rows.get(name, {})
        if "settled" not in r or "error" in r:
            continue
        side = round(r["side_usage"] * r["tokens"])
        value = r["settled"] / side if side else None
        # A settled position never sends its side output (DeviceProtocol.certified sends `settled` instead);
        # the uploads counted are the unproven tokens' and those of positions an earlier change voided.
        out.append({"goal": f"{name}: share of side tokens settled on the device >= 0.95 ({r['settled']} of {side} "
                            f"committed; side outputs uploaded: {r['side_outputs_up']}, for unproven or voided "
                            f"positions, none for a settled one)", "value": value, "target": 0.95,
                    "met": None if value is None else value >= 0.95,
                    "missed_by": None if value is None else max(0.95 - value, 0.0)})
    if profile == "3g":
        for name in ("spa_draft_proj", "spa_draft_push", "spa_settle", "spa_settle_branches"):
            r = rows.get(name, {})
            if r.get("ttft_s") is not None:
                out.append({"goal": f"{name} TTFT <= 2 s with the projection on (3g; median over repeats of the "
                                    f"documents' mean: the weights cross once per gateway, named by hash after)",
                            "value": r["ttft_s"], "target": 2.0, "met": r["ttft_s"] <= 2.0,
                            "missed_by": max(r["ttft_s"] - 2.0, 0.0)})
    for name in ("spa_draft", "spa_draft_proj", "spa_draft_push"):
        if "bytes_per_token" in rows.get(name, {}):
            value = rows[name]["bytes_per_token"]
            out.append({"goal": f"{name} bytes on the wire per token <= 2048 (websocket payload, both directions, "
                                f"handshake apart)", "value": value, "target": 2048, "met": value <= 2048,
                        "missed_by": max(value - 2048, 0.0)})
    return out


def _why(result: dict, row: str) -> dict | None:
    """Where the row's speed went, from this run's trace (benchmarks/tracemodel.py's `explain`):
    the losses to rollbacks, verdict heads, link bandwidth and round-trip stalls."""
    if (row not in MEASURED or traced_row(result) is None or "cloud_only" not in result["rows"]
            or not result.get("plugin_info")):
        return None  # the model replays only its own rows, from an SPA row's traces (or rates) and the plugin's taps
    return explain_result(result, row)


# --- the run -------------------------------------------------------------------


def _run_worker(link: Link, job: dict, core: str | None, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="spabench-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        os.chmod(tmp, 0o755)
        worker = python_command("benchmarks.device_worker", job_file, out_file)
        if job.get("client") == "java":  # the Android app's Java device, same JOB/OUT (org.spa.protocol.BenchWorker)
            worker = [str(Path(__file__).resolve().parents[1] / "android_demo" / "scripts" / "bench_worker.sh"),
                      str(job_file), str(out_file)]
        cmd = [*link.device_prefix(), *pinned(core), *worker]
        proc = run(cmd, env=python_env(OMP_NUM_THREADS="1"), timeout=timeout)
        if proc.returncode != 0 or not out_file.exists():
            raise SpaError(f"device worker ({job['mode']}) failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
        return json.loads(out_file.read_text())


def _plugin_info(pte_path: Path) -> dict:
    from spa.model.plugin import read_config

    config, digest = read_config(pte_path.parent)
    training = config.training if isinstance(config.training, dict) else {}
    val = (training.get("metrics") or {}).get("val", {})
    return {"content_hash": digest, "taps": len(config.taps), "tau": config.tau, "rank": config.rank,
            "skip_cost": (training.get("settings") or {}).get("skip_cost"),
            "val_loss_backbone": val.get("loss_backbone"), "val_loss_gated": val.get("loss_gated"),
            "val_side_usage": val.get("side_usage")}


def run_link_bench(profile_name: str, *, plugin: str | None = None, docs: list[str], max_new_tokens: int = 32,
                   per_layer_tokens: int = 8, window: int = 8, codec: str = "int8", rows=ROWS,
                   link_mode: str = "auto", device_variant: str = "fp32", workdir: Path = Path("runs/bench"),
                   pin: bool = True, tau: float | None = None, skip_cost: float = DEFAULT_SKIP_COST,
                   repeats: int = 3, in_flight: int = 4, device_client: str = "python", log=print) -> dict:
    profile = PROFILES[profile_name]
    workdir.mkdir(parents=True, exist_ok=True)
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SpaError(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if repeats < 1 or in_flight < 1:
        raise SpaError(f"--repeats and --in-flight must be at least 1 (got {repeats}, {in_flight})")
    needs_plugin = True  # the prompts come from the plugin's template, for every row
    pte_path = ensure_plugin(plugin, workdir, skip_cost=skip_cost, log=log) if needs_plugin else None
    prompts = plugin_prompts(pte_path, docs)
    backbone_pte, device_report = (ensure_device_only(device_variant, log=log) if "device_only" in rows
                                   else (None, None))
    cores = os.cpu_count() or 1
    gw_core, dev_core = ("0", "1") if pin and cores >= 2 else (None, None)
    plugin_info = _plugin_info(pte_path)
    result = {"profile": profile.to_dict(), "docs": docs, "max_new_tokens": max_new_tokens,
              "plugin_info": plugin_info | {"tau_used": plugin_info["tau"] if tau is None else tau},
              "per_layer_tokens": per_layer_tokens, "window": window, "codec": codec, "plugin": str(pte_path),
              "repeats": repeats, "in_flight": in_flight, "device_client": device_client,
              "pinning": {"gateway_cpu": gw_core, "device_cpu": dev_core, "cpus": cores},
              "load_average_before": os.getloadavg(), "rows": {}}
    if device_report:
        result["device_only_model"] = {k: device_report[k] for k in ("file", "variant", "bytes", "parity")}
    token = secrets.token_hex(8)
    previous = _sigterm_to_exception()
    servers: list[ServerProcess] = []
    link = make_link(profile, link_mode)
    try:
        with link:
            result["link"] = {"mode": link.mode, "description": link.describe()}
            log(f"link: {link.describe()} (helper pids: {' '.join(map(str, link.child_pids())) or 'none'})")
            _maybe_fail("link")
            if profile_name != "loopback" or link.mode != "none":
                result["link"]["measured"] = measured = measure_link(link)
                log(f"link measured: RTT {measured['rtt_ms']:.1f} ms (median of 20), "
                    f"{measured['down_mbit']:.1f} Mbit/s down, {measured['up_mbit']:.1f} Mbit/s up "
                    f"(helper pids: {' '.join(map(str, link.child_pids())) or 'none'})")
            on_gateway_side = [*link.gateway_prefix(), *pinned(gw_core)]
            one_thread = {"OMP_NUM_THREADS": "1"}
            host = link.gateway_host
            need_gateway = any(r in rows for r in ("side_every_token", *SPA_ROWS))
            need_baseline = any(r in rows for r in ("cloud_only", "per_layer", CEILING))
            if need_gateway:
                log("starting spa gateway on the gateway side...")
                servers.append(GatewayProcess("--host", host, "--token", token, prefix=on_gateway_side,
                                              env=one_thread))
                gateway = servers[-1]
                log(f"  spa gateway pid {gateway.pid} at {gateway.url}")
            if "spa_branches" in rows or "spa_settle_branches" in rows:  # the gateway's option: a gateway of its own
                log(f"starting spa gateway --branches {BRANCHES} on the gateway side...")
                servers.append(GatewayProcess("--host", host, "--token", token, "--branches", str(BRANCHES),
                                              prefix=on_gateway_side, env=one_thread))
                branch_gateway = servers[-1]
                log(f"  spa gateway pid {branch_gateway.pid} at {branch_gateway.url}")
            if need_baseline:
                log("starting the baseline server (cloud-only stream, per-layer split, plugin in the cloud) on the "
                    "gateway side...")
                servers.append(ServerProcess([*on_gateway_side, *python_command(
                    "benchmarks.baseline_server", "--host", host, "--port", "0", "--token", token)],
                    "baseline server", env=python_env(**one_thread)))
                baseline = servers[-1]
                log(f"  baseline server pid {baseline.pid} at {baseline.url}")
            _maybe_fail("servers")
            common = {"prompts": prompts, "token": token, "pte": str(pte_path.resolve()), "threads": 1 if dev_core else None,
                      "options": {"window": 0, "codec": codec, "outliers": 8}}
            def spa_job(tau_used, window_used=0, **extra):
                return {"mode": "spa", "max_new_tokens": max_new_tokens, "tau": tau_used,
                        "url": link.device_url(host, gateway.port),
                        "options": {"window": window_used, "codec": codec, "outliers": 8}, "client": device_client,
                        **extra}

            jobs = {
                "cloud_only": lambda: {"mode": "stream", "max_new_tokens": max_new_tokens,
                                       "url": link.device_url(host, baseline.port)},
                # the same .pte path as the device's: server and device share this machine's files
                CEILING: lambda: {"mode": "cloud_plugin", "max_new_tokens": max_new_tokens, "tau": tau,
                                  "url": link.device_url(host, baseline.port)},
                "side_every_token": lambda: spa_job(-1.0),
                "per_layer": lambda: {"mode": "per_layer", "max_new_tokens": min(per_layer_tokens, max_new_tokens),
                                      "rank": 16, "url": link.device_url(host, baseline.port)},
                "spa_lockstep": lambda: spa_job(tau),
                "spa_draft": lambda: spa_job(tau, window),
                "spa_draft_proj": lambda: spa_job(tau, window, cloud_projection=True),
                "spa_draft_push": lambda: spa_job(tau, window, cloud_projection=True, push_taps=True),
                "spa_inflight": lambda: spa_job(tau, window, max_in_flight=in_flight),
                "spa_inflight_push": lambda: spa_job(tau, window, max_in_flight=in_flight, push_taps=True),
                "spa_branches": lambda: spa_job(tau, window, max_in_flight=in_flight,
                                                url=link.device_url(host, branch_gateway.port)),
                "spa_settle": lambda: spa_job(tau, window, max_in_flight=in_flight, push_taps=True, settle=True,
                                              cloud_projection=True),
                "spa_settle_branches": lambda: spa_job(tau, window, max_in_flight=in_flight, push_taps=True,
                                                       settle=True, cloud_projection=True,
                                                       url=link.device_url(host, branch_gateway.port)),
                "device_only": lambda: {"mode": "device_only", "max_new_tokens": max_new_tokens,
                                        "backbone_pte": str(backbone_pte), "eos_ids": _eos_ids()},
            }
            order = [r for r in ROWS if r in rows]
            runs: dict[str, list[dict]] = {name: [] for name in order}
            for repeat in range(repeats):
                turn = order[repeat % len(order):] + order[:repeat % len(order)]  # interleaved
                for name in turn:
                    if "error" in result["rows"].get(name, {}):
                        continue
                    log(f"row {name} (repeat {repeat + 1}/{repeats}): {ROW_TITLES[name]} ({len(docs)} docs)...")
                    job = common | jobs[name]()
                    before = link.counters()
                    t = time.perf_counter()
                    try:
                        out = _run_worker(link, job, dev_core, timeout=1800)
                    except SpaError as exc:
                        result["rows"][name] = {"error": str(exc)}
                        log(f"  failed: {str(exc)[:500]}")
                        continue
                    after = link.counters()
                    summary = summarize_row(out["docs"])
                    summary["wall_s"] = time.perf_counter() - t
                    summary["load_s"] = out["load_s"]
                    if before and after:
                        n = max(summary["tokens"], 1)
                        summary["link_bytes_down_per_token"] = (after["down"] - before["down"]) / n
                        summary["link_bytes_up_per_token"] = (after["up"] - before["up"]) / n
                    summary["per_doc_tokens"] = [d["tokens"] for d in out["docs"]]
                    summary["docs_raw"] = out["docs"]
                    runs[name].append(summary)
                    log("  " + _one_line(summary))
            reference = runs["cloud_only"][0]["per_doc_tokens"] if runs.get("cloud_only") else None
            for name, summaries in runs.items():
                if "error" in result["rows"].get(name, {}) or not summaries:
                    continue
                if reference is not None:  # same tokens as cloud-only, position by position
                    summaries[0] |= {k: v for k, v in summarize_row(summaries[0]["docs_raw"], reference).items()
                                     if k == "same_tokens_as_cloud_only"}
                for summary in summaries:
                    summary.pop("docs_raw")
                result["rows"][name] = merge_repeats(summaries)
    finally:
        for server in reversed(servers):
            server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    result["load_average_after"] = os.getloadavg()
    add_ratios(result["rows"])
    result["lossless"] = lossless(result["rows"])
    result["goals"] = goals(result)
    return result


def _eos_ids() -> list[int]:
    from spa.model.backbone import default_backbone_dir

    cfg = json.loads((default_backbone_dir() / "generation_config.json").read_text())
    ids = cfg.get("eos_token_id")
    return ids if isinstance(ids, list) else [ids]


# --- output ------------------------------------------------------------------------


def _one_line(s: dict) -> str:
    return (f"{s['tokens']} tokens, {fmt(s['tokens_per_s'], '.1f')} tok/s, TTFT {fmt(s['ttft_s'], '.2f')} s, "
            f"{s['bytes_down_per_token']:.0f} B down/{s['bytes_up_per_token']:.0f} B up per token, "
            f"{s['round_trips_per_token']:.2f} RT/token, side {s['side_usage']:.0%}")


def format_result(result: dict) -> str:
    p = result["profile"]
    lines = [f"spa bench link --profile {p['name']}: {len(result['docs'])} docs ({', '.join(result['docs'])}), "
             f"{result['max_new_tokens']} new tokens (per-layer row: {result['per_layer_tokens']}), greedy, "
             f"codec {result['codec']}, draft window W={result['window']}, side outputs in flight "
             f"{result.get('in_flight', 1)} (in-flight rows), {result.get('repeats', 1)} repeat(s), rows interleaved"
             + ("; SPA rows' device: the Java client (host JVM, plugin and output head in pure Java)"
                if result.get("device_client") == "java" else "")]
    pi = result.get("plugin_info")
    if pi:
        lines.append(f"plugin: {result['plugin']} ({pi['taps']} taps, r={pi['rank']}, lambda {pi['skip_cost']}, "
                     f"tau {pi['tau_used']:.3g}; val loss {fmt(pi['val_loss_backbone'], '.3f')} backbone -> "
                     f"{fmt(pi['val_loss_gated'], '.3f')} gated at {fmt(pi['val_side_usage'], '.0%')} side usage)")
    link = result.get("link", {})
    lines.append(f"link: {link.get('description', '-')}")
    m = link.get("measured")
    if m:
        lines.append(f"      measured RTT {m['rtt_ms']:.1f} ms (min {m['rtt_min_ms']:.1f}), "
                     f"{m['down_mbit']:.1f} Mbit/s down, {m['up_mbit']:.1f} Mbit/s up "
                     f"(target {p['rtt_ms']:g} ms, {p['down_mbit'] or '-'} / {p['up_mbit'] or '-'} Mbit/s)")
    pin = result["pinning"]
    lines.append(f"cpu: gateway pinned to CPU {pin['gateway_cpu']}, device to CPU {pin['device_cpu']} (taskset) of "
                 f"{pin['cpus']}; load average before {result['load_average_before'][0]:.2f}, after "
                 f"{result['load_average_after'][0]:.2f}" + (" — a shared, noisy machine: read ratios, not absolutes"
                                                              if result['load_average_before'][0] > 0.5 else ""))
    cloud = result["rows"].get("cloud_only", {})
    if cloud.get("tokens_per_s"):
        lines.append(f"gateway: a decode step of {1000 / cloud['tokens_per_s']:.1f} ms (cloud-only's tokens/s; the "
                     f"ratios below depend on it: spa bench model gives them for 10, 20 and 40 ms)")
    w = max((len(ROW_TITLES[n]) for n in ROWS if n in result["rows"]), default=44)
    header = (f"{'row':{w}} {'tok/s':>6} {'x cloud':>7} {'min-max':>9} {'paired':>16} {'x ceiling':>9} {'TTFT s':>7} {'ITL p50':>8} "
              f"{'ITL p95':>8} {'B down/t':>9} {'B up/t':>7} {'hs KB':>6} {'RT/t':>6} {'side':>5} {'chg':>5} {'=cloud':>6}")
    lines += ["", header, "-" * len(header)]
    for name in ROWS:
        r = result["rows"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{ROW_TITLES[name]:{w}} failed: {r['error'][:200]}")
            continue
        lines.append(
            f"{ROW_TITLES[name]:{w}} {fmt(r['tokens_per_s'], '6.1f'):>6} "
            f"{fmt(r.get('tokens_per_s_vs_cloud_only'), '6.2f'):>7} {_spread(r):>9} {_paired(r):>16} "
            f"{fmt(r.get('tokens_per_s_vs_ceiling'), '9.2f'):>9} "
            f"{fmt(r['ttft_s'], '7.2f'):>7} {fmt(r['itl_p50_ms'], '8.1f'):>8} {fmt(r['itl_p95_ms'], '8.1f'):>8} "
            f"{r['bytes_down_per_token']:>9.0f} {r['bytes_up_per_token']:>7.0f} {r['handshake_bytes'] / 1e3:>6.1f} "
            f"{r['round_trips_per_token']:>6.2f} "
            f"{r['side_usage']:>5.0%} {r['change_rate']:>5.0%} {fmt(r.get('same_tokens_as_cloud_only'), '6.0%'):>6}")
    lines.append("tok/s: median over repeats of committed tokens per second after the first (decode); x cloud: median "
                 "of the per-repeat ratios to cloud-only, min-max beside it; paired: the median of each "
                 "document's ratio to the same document's cloud-only run in the same repeat [25th-75th "
                 "percentile]; x ceiling: the same against the plugin "
                 "hosted in the cloud (cloud_plugin: SPA's tokens without privacy or round trips); "
                 "TTFT from opening the connection; "
                 "ITL: inter-token latency as committed; B/t: websocket payload bytes per token after the handshake; "
                 "hs KB: handshake per document, both ways (prompt; the projection weights for +proj); "
                 "RT/t: round trips the device waits on per token; chg: rollbacks / side tokens; "
                 "=cloud: tokens identical to cloud-only at the same position.")
    best = _best_spa(result["rows"])
    if best:
        r = result["rows"][best]
        lines.append(f"best SPA row: {best}, {fmt(r.get('tokens_per_s_vs_cloud_only'), '.2f')}x cloud-only "
                     f"({_spread(r)}), {fmt(r.get('tokens_per_s_vs_ceiling'), '.2f')}x ceiling "
                     f"({_spread(r, 'ceiling')}; the plugin hosted in the cloud)")
    same = result.get("lossless")
    if same:
        each = ", ".join(f"{n} {_same_text(v)}" for n, v in same["rows"].items())
        varied = "" if same["against_same_every_repeat"] else f" ({same['against']} itself varied between repeats)"
        lines.append(f"lossless: tokens identical to {same['against']} ({same['tokens']} tokens) in every repeat: "
                     f"{each} -> {'yes' if same['identical'] else 'NO'}{varied}")
    dev = result.get("device_only_model")
    if dev:
        par = dev["parity"]
        same = (f"identical on {par['checked']} tokens with margin" if par["identical"] else
                f"the same for the first {par.get('first_divergence', '?')} of {len(par['eager'])} tokens")
        lines.append(f"device-only model: {dev['file']} ({dev['bytes'] / 2**20:.0f} MiB), greedy tokens vs the eager "
                     f"backbone on a fixed prompt: {same}")
    wire = [f"{ROW_TITLES[n].split(' (')[0]} {r['link_bytes_down_per_token']:.0f}/{r['link_bytes_up_per_token']:.0f}"
            for n, r in result["rows"].items() if "link_bytes_down_per_token" in r]
    if wire:
        lines.append("bytes on the veth per token (down/up, with TCP/IP headers, handshake and prompt): " + "; ".join(wire))
    if result.get("goals"):
        lines.append("")
        lines.append("goals:")
        for g in result["goals"]:
            state = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
            if g["met"] is False and g.get("missed_by") is not None:
                state += f" by {g['missed_by']:.2f}"
            value = "-" if g["value"] is None else f"{g['value']:.2f}"
            ceiling = "" if g.get("vs_ceiling") is None else f"; {g['vs_ceiling']:.2f}x ceiling ({CEILING})"
            lines.append(f"  {g['goal']}: {value} -> {state}{ceiling}")
            if g["met"] is False and g.get("why"):
                lines.append(f"    why, from the trace (spa bench model): {format_why(g['why'])}")
    return "\n".join(lines)


def _spread(r: dict, key: str = "cloud_only") -> str:
    lo, hi = r.get(f"vs_{key}_min"), r.get(f"vs_{key}_max")
    return "-" if lo is None else f"{lo:.2f}-{hi:.2f}"


def _paired(r: dict, key: str = "cloud_only") -> str:
    p = r.get(f"vs_{key}_paired")
    return "-" if p is None else f"{p['median']:.2f} [{p['p25']:.2f}-{p['p75']:.2f}]"


def _same_text(v: dict) -> str:
    d = v["first_difference"]
    if v["identical"]:
        return "yes"
    if d is None:
        return "NO (not the same in every repeat)"
    return f"NO (first difference: doc {d['doc']}, token {d['position']})"


def _best_spa(rows: dict) -> str | None:
    """The SPA row with the highest median ratio to cloud-only, if any ran."""
    spa = [n for n in SPA_ROWS if rows.get(n, {}).get("tokens_per_s_vs_cloud_only") is not None]
    return max(spa, key=lambda n: rows[n]["tokens_per_s_vs_cloud_only"]) if spa else None


def plot_result(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in result["rows"] and "error" not in result["rows"][n]]
    labels = [ROW_TITLES[n].split(" (")[0] for n in names]
    panels = (("tokens_per_s", "tokens/s"), ("ttft_s", "time to first token (s)"),
              ("bytes_per_token", "bytes per token (down + up)"), ("round_trips_per_token", "round trips per token"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, (key, title) in zip(axes, panels):
        values = [result["rows"][n].get(key) or 0 for n in names]
        ax.barh(labels, values, color=["#888" if n == "cloud_only" else "#48c" if n == CEILING
                                       else "#3a7" if n.startswith("spa") else "#c84" for n in names])
        if key == "tokens_per_s" and CEILING in names:  # the ceiling every SPA row reads against
            ax.axvline(values[names.index(CEILING)], color="#48c", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.invert_yaxis()
        if key == "bytes_per_token" and any(values):
            ax.set_xscale("symlog")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    m = result.get("link", {}).get("measured")
    sub = f", measured RTT {m['rtt_ms']:.0f} ms, {m['down_mbit']:.0f} Mbit/s" if m else ""
    fig.suptitle(f"spa bench link --profile {result['profile']['name']}{sub} ({result['link']['mode']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
