"""`spa bench device`: each plugin `.pte` variant's load time, gate/side latency, peak memory and size.

Locally: each `.pte` in its own process (`benchmarks.pte_worker`), pinned to
one CPU with OMP_NUM_THREADS=1 and a one-thread ExecuTorch pool, so variants
do not share caches, allocator state or a warm-up.

On a phone (`--adb [--serial S]`), with the Android app's benchmark mode
(android_demo/README.md, "Benchmark mode"):

    adb shell mkdir -p /data/local/tmp/spa
    adb push PTE... /data/local/tmp/spa/
    adb logcat -c
    adb shell am start -S -W -n org.spa.demo/.BenchmarkActivity --es pte P1,P2 \
        --ei iterations N --ei warmup W --es out /sdcard/Android/data/org.spa.demo/files/bench.json
    adb logcat -d -s SPA:I     (polled until SPA_BENCH_DONE <path> or SPA_BENCH_FAILED <why>)
    adb pull <path> LOCAL

Both produce the app's result file schema (`spa-android-bench/1`), so one
table prints both.
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.provision import ensure_plugin
from spa.children import pinned, python_command, python_env, run
from spa.errors import SpaError

SCHEMA = "spa-android-bench/1"
REMOTE_DIR = "/data/local/tmp/spa"
REMOTE_OUT = "/sdcard/Android/data/org.spa.demo/files/bench.json"
ACTIVITY = "org.spa.demo/.BenchmarkActivity"
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


def run_adb(ptes, *, plugin_dir: Path = Path("runs/bench"), serial: str | None = None, adb: str = "adb",
            iterations: int = 200, warmup: int = 20, timeout: float = 300.0, poll_s: float = 1.0, log=print) -> dict:
    ptes = [Path(p) for p in (ptes or default_ptes(plugin_dir, log))]
    missing = [str(p) for p in ptes if not p.is_file()]
    if missing:
        raise SpaError(f"no such .pte: {', '.join(missing)}")
    phone = Adb(adb, serial, log)
    serial = phone.check_device()
    log(f"phone {serial}: pushing {len(ptes)} .pte file(s) to {REMOTE_DIR}...")
    phone("shell", "mkdir", "-p", REMOTE_DIR)
    phone("push", *map(str, ptes), REMOTE_DIR + "/", timeout=600)
    remote = [f"{REMOTE_DIR}/{p.name}" for p in ptes]
    phone("logcat", "-c")
    log(f"starting the app's benchmark mode ({ACTIVITY})...")
    started = phone("shell", "am", "start", "-S", "-W", "-n", ACTIVITY, "--es", "pte", ",".join(remote),
                    "--ei", "iterations", str(iterations), "--ei", "warmup", str(warmup), "--es", "out", REMOTE_OUT)
    if "Error" in started or "Exception" in started:
        raise SpaError(f"am start failed (is the app installed? see android_demo/README.md):\n{started.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        state, detail, _ = parse_logcat(phone("logcat", "-d", "-s", "SPA:I"))
        if state == "failed":
            raise SpaError(f"the app's benchmark failed: {detail}")
        if state == "done":
            break
        if time.monotonic() > deadline:
            raise SpaError(f"no SPA_BENCH_DONE in logcat after {timeout:g} s")
        time.sleep(poll_s)
    with tempfile.TemporaryDirectory(prefix="spabench-adb-") as tmp:
        local = Path(tmp) / "bench.json"
        phone("pull", detail, str(local))
        try:
            result = json.loads(local.read_text())
        except json.JSONDecodeError as exc:
            raise SpaError(f"the pulled benchmark file is not JSON: {exc}") from None
    result = validate(result)
    result["adb"] = {"serial": serial, "remote_files": remote, "result_file": detail}
    return result


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
