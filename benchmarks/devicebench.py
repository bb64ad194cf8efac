"""`spa bench device`: each plugin `.pte` variant's load time, gate/side latency, peak memory and size.

Locally: each `.pte` in its own process (`benchmarks.pte_worker`), pinned to
one CPU with OMP_NUM_THREADS=1 and a one-thread ExecuTorch pool, so variants
do not share caches, allocator state or a warm-up.

On a phone (`--adb [--serial S]`), with the Android app's benchmark mode
(android_demo/README.md, "Benchmark mode"):

    adb install -r APK         (when the app is missing, older, or another build: `ensure_app`)
    adb shell mkdir -p /data/local/tmp/spa
    adb push PTE... /data/local/tmp/spa/
    adb shell rm -f OUT; adb logcat -c
    adb shell am start -S -W -n org.spa.demo/.BenchmarkActivity --es pte P1,P2 \
        --ei iterations N --ei warmup W --es out /sdcard/Android/data/org.spa.demo/files/bench.json
    polled until one of: logcat (`adb logcat -d -s SPA:I`) says SPA_BENCH_DONE <path> or
    SPA_BENCH_FAILED <why>, or the result file (`adb shell cat OUT`, written atomically by the app)
    appears -- whichever comes first; then `adb pull`.

Both produce the app's result file schema (`spa-android-bench/1`), so one
table prints both.

End to end on the phone (`--adb --e2e`, `run_adb_e2e`): the app's benchmark mode
`--es mode summarize` runs one summary with the plugin in ExecuTorch on the
phone and the backbone in a gateway on this host, reached through
`adb reverse tcp:PORT tcp:PORT`; the same summary then runs through the Python
device client here, and both clients' tokens/s, bytes and round trips per
token are reported side by side.

No phone has been attached to the machines this project is built on: the adb
paths are tested with tests/fake_adb/adb, a stand-in.
"""

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.provision import ensure_plugin
from spa.system.children import pinned, python_command, python_env, run
from spa.errors import SpaError

SCHEMA = "spa-android-bench/1"
PACKAGE = "org.spa.demo"
REMOTE_DIR = "/data/local/tmp/spa"
REMOTE_HEADS = f"{REMOTE_DIR}/heads"  # where the app looks for output heads (GatewayConnector.HEADS)
REMOTE_FILES = f"/sdcard/Android/data/{PACKAGE}/files"
REMOTE_OUT = f"{REMOTE_FILES}/bench.json"
ACTIVITY = f"{PACKAGE}/.BenchmarkActivity"
ROOT_DIR = Path(__file__).resolve().parent.parent
BUILD_APK = ROOT_DIR / "android_demo" / "scripts" / "build_apk.sh"
DEFAULT_APK = ROOT_DIR / "android_demo" / "build" / "apk" / "spa-demo-debug.apk"
RESULT_KEYS = ("pte", "file_bytes", "error")
MEASURED_KEYS = ("load_ms", "gate_ms", "side_ms", "peak_rss_kb", "rss_kb_before")
GOAL_MS = 0.5


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_ptes(workdir: Path, log=print) -> list[Path]:
    fp32 = ensure_plugin(None, workdir, log=log)
    return [fp32, fp32.parent / "plugin-int8.pte"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_local(ptes, *, workdir: Path = Path("runs/bench"), iterations: int = 200, warmup: int = 20,
              core: str | None = None, log=print) -> dict:
    ptes = [Path(p) for p in (ptes or default_ptes(workdir, log))]
    cores = os.cpu_count() or 1
    core = core if core is not None else ("1" if cores >= 2 else None)
    result = {"schema": SCHEMA, "started_at": _now(),
              "device": {"manufacturer": "local host", "model": _cpu_model(), "android_sdk": 0,
                         "abi": platform.machine(), "cores": cores},
              "runtime": "ExecuTorch Python runtime, one process per .pte, "
                         + (f"pinned to CPU {core} (taskset), " if core else "") + "OMP_NUM_THREADS=1, 1 XNNPACK thread",
              "iterations": iterations, "warmup": warmup, "results": [],
              "load_average": os.getloadavg()}
    for pte in ptes:
        log(f"measuring {pte} ({iterations} calls per method after {warmup} warm-up)...")
        proc = run([*pinned(core), *python_command("benchmarks.pte_worker", pte, "--iterations", iterations,
                                                   "--warmup", warmup)],
                   env=python_env(OMP_NUM_THREADS="1"), timeout=900)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            row = {"pte": str(pte), "file_bytes": pte.stat().st_size if pte.exists() else 0,
                   "error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        result["results"].append(row)
    result["finished_at"] = _now()
    result["ok"] = not any(r.get("error") for r in result["results"])
    return result


# --- adb ---------------------------------------------------------------------------


class Adb:
    def __init__(self, adb: str = "adb", serial: str | None = None, log=print):
        path = shutil.which(adb) if os.sep not in adb else adb
        if not path or not os.path.exists(path):
            raise SpaError(f"adb not found ({adb}); install it (Debian: apt-get install adb) or pass --adb-path")
        self.cmd = [path] + (["-s", serial] if serial else [])
        self.log = log

    def __call__(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        proc = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SpaError(f"adb {' '.join(args)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def check_device(self) -> str:
        """The serial of the one phone to use; errors if none (or several without --serial)."""
        out = subprocess.run([self.cmd[0], "devices"], capture_output=True, text=True, timeout=60).stdout
        devices = [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("device")]
        if len(self.cmd) > 1:
            serial = self.cmd[2]
            if serial not in devices:
                raise SpaError(f"no phone {serial!r} attached (adb devices: {', '.join(devices) or 'none'})")
            return serial
        if not devices:
            raise SpaError("no phone attached (adb devices lists none); connect one with USB debugging on")
        if len(devices) > 1:
            raise SpaError(f"several phones attached ({', '.join(devices)}): pass --serial")
        return devices[0]


def parse_logcat(text: str) -> tuple[str, str | None, list[dict]]:
    """(state, path or reason, results) from `logcat -s SPA:I` lines: state is done, failed or running."""
    results, state, detail = [], "running", None
    for line in text.splitlines():
        if "SPA_BENCH_RESULT " in line:
            try:
                results.append(json.loads(line.split("SPA_BENCH_RESULT ", 1)[1]))
            except json.JSONDecodeError:
                pass
        elif "SPA_BENCH_DONE " in line:
            state, detail = "done", line.split("SPA_BENCH_DONE ", 1)[1].strip()
        elif "SPA_BENCH_FAILED" in line:
            state, detail = "failed", line.split("SPA_BENCH_FAILED", 1)[1].strip()
    return state, detail, results


def validate(result: dict) -> dict:
    """Check a benchmark file against the app's schema; raises SpaError naming the first problem."""
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise SpaError(f"not a {SCHEMA} result (schema: {result.get('schema') if isinstance(result, dict) else None!r})")
    for key in ("device", "iterations", "warmup", "results", "ok"):
        if key not in result:
            raise SpaError(f"benchmark result lacks {key!r}")
    for i, r in enumerate(result["results"]):
        missing = [k for k in RESULT_KEYS if k not in r]
        if not r.get("error"):
            missing += [k for k in MEASURED_KEYS if k not in r]
        if missing:
            raise SpaError(f"result {i} ({r.get('pte')}) lacks {', '.join(missing)}")
    return result


# --- the app on the phone -----------------------------------------------------------


def apk_info(apk: Path) -> dict:
    """package, versionCode and SHA-256 of an APK (`aapt dump badging`)."""
    import hashlib

    aapt = shutil.which("aapt")
    if not aapt:
        raise SpaError("aapt not found (Debian: apt-get install aapt; android_demo/scripts/build_apk.sh installs it)")
    proc = subprocess.run([aapt, "dump", "badging", str(apk)], capture_output=True, text=True, timeout=60)
    m = re.search(r"^package: name='([^']+)' versionCode='(\d+)'", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        raise SpaError(f"{apk} is not an APK aapt can read: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return {"package": m.group(1), "version_code": int(m.group(2)),
            "sha256": hashlib.sha256(Path(apk).read_bytes()).hexdigest()}


def default_apk(log=print) -> Path:
    """The APK android_demo/scripts/build_apk.sh builds (run here; fast when it is up to date)."""
    log("building the app's APK (android_demo/scripts/build_apk.sh; fast when up to date)...")
    proc = subprocess.run([str(BUILD_APK)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not DEFAULT_APK.is_file():
        raise SpaError(f"build_apk.sh failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return DEFAULT_APK


def installed_app(phone: "Adb", package: str = PACKAGE) -> dict | None:
    """The installed app's versionCode and the SHA-256 of its base APK (None where unknown); None if absent."""
    out = phone("shell", "dumpsys", "package", package, check=False)
    m = re.search(r"versionCode=(\d+)", out)
    if not m:
        return None
    info = {"version_code": int(m.group(1)), "sha256": None}
    path = phone("shell", "pm", "path", package, check=False).strip()
    if path.startswith("package:"):
        digest = phone("shell", "sha256sum", path.split(":", 1)[1].splitlines()[0].strip(), check=False).split()
        if digest and re.fullmatch(r"[0-9a-f]{64}", digest[0]):
            info["sha256"] = digest[0]
    return info


def ensure_app(phone: "Adb", apk: Path | None = None, install: bool = True, log=print) -> dict:
    """Install the app's APK when it is missing, older (versionCode), or another build of the same version.

    `apk`: the APK to install (default: build android_demo's with build_apk.sh).
    `install=False`: only report what is installed (the benchmark then needs it).
    """
    have = installed_app(phone)
    if not install:
        if have is None:
            raise SpaError(f"{PACKAGE} is not installed on the phone (drop --no-install, or adb install the APK)")
        return {"installed": have, "action": "not checked (--no-install)"}
    apk = Path(apk) if apk else default_apk(log)
    if not apk.is_file():
        raise SpaError(f"no such APK: {apk}")
    want = apk_info(apk)
    if want["package"] != PACKAGE:
        raise SpaError(f"{apk} is {want['package']}, not {PACKAGE}")
    if have is None:
        reason = "not installed"
    elif have["version_code"] < want["version_code"]:
        reason = f"installed versionCode {have['version_code']} < {want['version_code']}"
    elif have["version_code"] == want["version_code"] and have["sha256"] not in (None, want["sha256"]):
        reason = "another build of the same versionCode"
    else:
        return {"apk": str(apk), "version_code": want["version_code"], "installed": have, "action": "up to date"}
    log(f"installing {apk.name} (versionCode {want['version_code']}): {reason}...")
    out = phone("install", "-r", str(apk), timeout=600)
    if "Success" not in out:
        raise SpaError(f"adb install {apk} did not succeed: {out.strip()[-500:]}")
    return {"apk": str(apk), "version_code": want["version_code"], "installed_before": have, "action": "installed",
            "reason": reason}


def _wait_for_result(phone: "Adb", remote_out: str, timeout: float, poll_s: float) -> tuple[dict, str]:
    """(result, how completion was seen): logcat's SPA_BENCH_DONE/FAILED or the result file, whichever first."""
    deadline = time.monotonic() + timeout
    while True:
        state, detail, _ = parse_logcat(phone("logcat", "-d", "-s", "SPA:I"))
        if state == "failed":
            raise SpaError(f"the app's benchmark failed: {detail}")
        if state == "done":
            with tempfile.TemporaryDirectory(prefix="spabench-adb-") as tmp:
                local = Path(tmp) / "bench.json"
                phone("pull", detail, str(local))
                try:
                    return json.loads(local.read_text()), "logcat"
                except json.JSONDecodeError as exc:
                    raise SpaError(f"the pulled benchmark file is not JSON: {exc}") from None
        # the result file is renamed into place complete, so whatever `cat` shows is whole
        text = phone("shell", "cat", remote_out, check=False)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            if doc.get("failure"):
                raise SpaError(f"the app's benchmark failed: {doc['failure']}")
            return doc, "result file"
        if time.monotonic() > deadline:
            raise SpaError(f"no SPA_BENCH_DONE in logcat and no result file {remote_out} after {timeout:g} s")
        time.sleep(poll_s)


def run_adb(ptes, *, plugin_dir: Path = Path("runs/bench"), serial: str | None = None, adb: str = "adb",
            iterations: int = 200, warmup: int = 20, timeout: float = 300.0, poll_s: float = 1.0,
            apk: Path | None = None, install: bool = True, log=print) -> dict:
    ptes = [Path(p) for p in (ptes or default_ptes(plugin_dir, log))]
    missing = [str(p) for p in ptes if not p.is_file()]
    if missing:
        raise SpaError(f"no such .pte: {', '.join(missing)}")
    phone = Adb(adb, serial, log)
    serial = phone.check_device()
    app = ensure_app(phone, apk, install, log)
    log(f"phone {serial}: pushing {len(ptes)} .pte file(s) to {REMOTE_DIR}...")
    phone("shell", "mkdir", "-p", REMOTE_DIR)
    phone("push", *map(str, ptes), REMOTE_DIR + "/", timeout=600)
    remote = [f"{REMOTE_DIR}/{p.name}" for p in ptes]
    phone("shell", "rm", "-f", REMOTE_OUT, check=False)  # a stale result must not count as this run's
    phone("logcat", "-c")
    log(f"starting the app's benchmark mode ({ACTIVITY})...")
    started = phone("shell", "am", "start", "-S", "-W", "-n", ACTIVITY, "--es", "pte", ",".join(remote),
                    "--ei", "iterations", str(iterations), "--ei", "warmup", str(warmup), "--es", "out", REMOTE_OUT)
    if "Error" in started or "Exception" in started:
        raise SpaError(f"am start failed (is the app installed? see android_demo/README.md):\n{started.strip()}")
    result, seen = _wait_for_result(phone, REMOTE_OUT, timeout, poll_s)
    result = validate(result)
    result["adb"] = {"serial": serial, "remote_files": remote, "result_file": REMOTE_OUT, "completion": seen, "app": app}
    return result


E2E_OUT = f"{REMOTE_FILES}/e2e.json"
E2E_PROMPT = f"{REMOTE_FILES}/prompt.txt"
E2E_KEYS = ("tokens_per_s", "bytes_down_per_token", "bytes_up_per_token", "round_trips_per_token", "ttft_s", "settled")


def run_adb_e2e(pte: Path | None = None, *, doc: str = "aclsum:test:0", window: int = 4, max_new_tokens: int = 32,
                tau: float | None = None, gateway_url: str | None = None, token: str = "", port: int = 8765,
                plugin_dir: Path = Path("runs/bench"), serial: str | None = None, adb: str = "adb",
                apk: Path | None = None, install: bool = True, timeout: float = 600.0, poll_s: float = 1.0,
                log=print) -> dict:
    """One summary of the split on the phone (through `adb reverse`) beside the same run of the Python client here.

    `gateway_url`: a running gateway on this host (ws://127.0.0.1:PORT); default: start
    `spa gateway` on `port` for the run.
    """
    import asyncio
    from urllib.parse import urlparse

    from device_runtime.client import run_session
    from device_runtime.documents import device_prompt, load_document
    from spa.protocol.messages import Options
    from spa.model.output_head import head_path
    from spa.model.pte_plugin import PtePlugin

    pte = Path(pte) if pte else default_ptes(plugin_dir, log)[0]
    if not pte.is_file():
        raise SpaError(f"no such .pte: {pte}")
    phone = Adb(adb, serial, log)
    serial = phone.check_device()
    app = ensure_app(phone, apk, install, log)
    plugin = PtePlugin(pte)
    prompt = device_prompt(plugin.config, load_document(doc, plugin.config.max_doc_tokens))
    gw = None
    if gateway_url is None:
        from cloud_gateway.process import GatewayProcess

        log(f"starting spa gateway on 127.0.0.1:{port}...")
        gw = GatewayProcess(*(["--token", token] if token else []), port=port)
        gw.__enter__()
        gateway_url = gw.url
    port = urlparse(gateway_url).port
    phone_url = f"ws://127.0.0.1:{port}"
    reversed_ = False
    try:
        phone("reverse", f"tcp:{port}", f"tcp:{port}")  # the phone's 127.0.0.1:PORT is this host's
        reversed_ = True
        with tempfile.TemporaryDirectory(prefix="spa-e2e-") as tmp:
            local_prompt = Path(tmp) / "prompt.txt"
            local_prompt.write_text(prompt)
            phone("shell", "mkdir", "-p", REMOTE_DIR)
            phone("push", str(pte), REMOTE_DIR + "/", timeout=600)
            phone("push", str(local_prompt), E2E_PROMPT, timeout=120)
            head = head_path(plugin.config.backbone["fingerprint"])
            if head.is_file():  # the app settles side tokens with it (android_demo/README.md, "Device-side settlement")
                log(f"phone {serial}: pushing the output head {head.name} ({head.stat().st_size >> 20} MB) for settlement...")
                phone("shell", "mkdir", "-p", REMOTE_HEADS)
                phone("push", str(head), REMOTE_HEADS + "/", timeout=900)
            else:
                log(f"no output head at {head} (spa export writes it): the app takes the gateway's verdicts")
        remote_pte = f"{REMOTE_DIR}/{pte.name}"
        phone("shell", "rm", "-f", E2E_OUT, check=False)
        phone("logcat", "-c")
        args = ["--es", "mode", "summarize", "--es", "pte", remote_pte, "--es", "gateway", phone_url,
                "--es", "prompt_file", E2E_PROMPT, "--ei", "window", str(window),
                "--ei", "max_new_tokens", str(max_new_tokens), "--es", "out", E2E_OUT]
        if token:
            args += ["--es", "token", token]
        if tau is not None:
            args += ["--es", "tau", repr(tau)]
        log(f"phone {serial}: summarizing {doc} through {phone_url} (adb reverse) in the app...")
        started = phone("shell", "am", "start", "-S", "-W", "-n", ACTIVITY, *args)
        if "Error" in started or "Exception" in started:
            raise SpaError(f"am start failed (is the app installed?):\n{started.strip()}")
        on_phone, seen = _wait_for_result(phone, E2E_OUT, timeout, poll_s)
        row = (on_phone.get("results") or [{}])[0]
        if row.get("error"):
            raise SpaError(f"the app's end-to-end run failed: {row['error']}")
        log("the same summary through the Python device client on this host...")
        host = asyncio.run(run_session(gateway_url, plugin, prompt, Options(window=window, max_new_tokens=max_new_tokens),
                                       tau=tau, token=token))
    finally:
        if reversed_:
            phone("reverse", "--remove", f"tcp:{port}", check=False)
        if gw is not None:
            gw.__exit__(None, None, None)
    phone_stats, host_stats = row.get("stats", {}), host.stats
    return {
        "schema": "spa-e2e-adb/1", "doc": doc, "pte": str(pte), "window": window, "max_new_tokens": max_new_tokens,
        "tau": tau, "gateway": gateway_url, "phone_url": phone_url,
        "example": bool(on_phone.get("example")), "stand_in": on_phone.get("stand_in"),
        "device": on_phone.get("device"),
        "phone": {"client": phone_stats.get("client", "java"), "tokens": row.get("tokens"),
                  **{k: phone_stats.get(k) for k in E2E_KEYS}},
        "host": {"client": "python", "tokens": list(host.tokens), **{k: host_stats.get(k) for k in E2E_KEYS}},
        "same_tokens": row.get("tokens") == list(host.tokens),
        "adb": {"serial": serial, "completion": seen, "result_file": E2E_OUT, "app": app, "reverse": f"tcp:{port}"},
    }


def format_e2e(r: dict) -> str:
    head = f"{'client':24} {'tokens':>6} {'tokens/s':>9} {'B down/tok':>11} {'B up/tok':>9} {'RT/tok':>7} {'TTFT s':>7} {'settled':>7}"
    lines = [f"spa bench device --adb --e2e: {r['doc']}, W={r['window']}, {r['max_new_tokens']} new tokens, "
             f"gateway {r['gateway']} (phone: {r['phone_url']} through adb reverse)"]
    if r.get("stand_in"):
        lines.append(f"NOTE: {r['stand_in']}")
    lines += [head, "-" * len(head)]

    def fmt(v, f):
        return format(v, f) if isinstance(v, (int, float)) else "-"

    for name, row in (("phone (app, Java, ExecuTorch)", r["phone"]), ("host (Python client)", r["host"])):
        lines.append(f"{name:24} {len(row['tokens'] or []):>6} {fmt(row['tokens_per_s'], '9.1f')} "
                     f"{fmt(row['bytes_down_per_token'], '11.0f')} {fmt(row['bytes_up_per_token'], '9.0f')} "
                     f"{fmt(row['round_trips_per_token'], '7.2f')} {fmt(row['ttft_s'], '7.2f')} "
                     f"{fmt(row.get('settled'), '7d')}")
    lines.append("same tokens on both clients" if r["same_tokens"] else
                 "the clients' tokens differ (different numerics: compare with the margin rules of tests/android/test_java_client_live.py)")
    return "\n".join(lines)


# --- output ---------------------------------------------------------------------------


def format_table(result: dict) -> str:
    d = result.get("device", {})
    lines = [f"spa bench device: {d.get('manufacturer')} {d.get('model')} ({d.get('abi')}, {d.get('cores')} cores"
             + (f", Android SDK {d['android_sdk']}" if d.get("android_sdk") else "") + f"); "
             f"{result['iterations']} calls per method after {result['warmup']} warm-up"]
    if result.get("runtime"):
        lines.append(f"runtime: {result['runtime']}")
    if result.get("example"):
        lines.append("NOTE: this result is marked as an example (made-up numbers), not a measurement")
    if result.get("load_average"):
        lines.append(f"load average {result['load_average'][0]:.2f} (a shared machine: timings are noisy)")
    names = [Path(r["pte"]).name for r in result["results"]]
    if len(set(names)) < len(names):  # several exports: name them by folder too
        names = ["/".join(Path(r["pte"]).parts[-2:])[-44:] for r in result["results"]]
    width = max([28] + [len(n) for n in names])
    head = (f"{'pte':{width}} {'size':>9} {'load ms':>8} {'gate p50':>9} {'gate p95':>9} {'side p50':>9} {'side p95':>9} "
            f"{'gate+side':>9} {'peak MB':>8} {'+MB':>6}")
    lines += [head, "-" * len(head)]
    for name, r in zip(names, result["results"]):
        if r.get("error"):
            lines.append(f"{name:{width}} {r.get('file_bytes', 0) / 1024:>6.0f} KB  error: {r['error']}")
            continue
        g, s = r["gate_ms"], r["side_ms"]
        peak = r["peak_rss_kb"] / 1024 if r.get("peak_rss_kb", -1) >= 0 else float("nan")
        delta = (r["peak_rss_kb"] - r["rss_kb_before"]) / 1024 if r.get("rss_kb_before", -1) >= 0 else float("nan")
        lines.append(f"{name:{width}} {r['file_bytes'] / 1024:>6.0f} KB {r['load_ms']:>8.1f} {g['median'] * 1000:>7.0f}us "
                     f"{g['p95'] * 1000:>7.0f}us {s['median'] * 1000:>7.0f}us {s['p95'] * 1000:>7.0f}us "
                     f"{g['median'] + s['median']:>7.3f}ms {peak:>8.0f} {delta:>6.1f}")
    ok = [r for r in result["results"] if not r.get("error")]
    if ok and result.get("example"):
        lines.append(f"goal gate + side <= {GOAL_MS} ms per token: not evaluated (example data, not a measurement)")
    elif ok:
        totals = [(r["gate_ms"]["median"] + r["side_ms"]["median"], n) for n, r in zip(names, result["results"])
                  if not r.get("error")]
        slow, fast = max(totals), min(totals)
        missed = [f"{n} ({t:.3f} ms, over by {t - GOAL_MS:.3f} ms)" for t, n in totals if t > GOAL_MS]
        verdict = (f"met by every variant (slowest {slow[1]}: {slow[0]:.3f} ms, fastest {fast[1]}: {fast[0]:.3f} ms)"
                   if not missed else "MISSED by " + "; ".join(missed))
        lines.append(f"goal gate + side <= {GOAL_MS} ms per token (median, side on every token): {verdict}")
    lines.append("peak MB: VmHWM of the measuring process (peak reset before loading where the kernel allows); "
                 "+MB: peak minus the resident set before loading the .pte")
    return "\n".join(lines)
