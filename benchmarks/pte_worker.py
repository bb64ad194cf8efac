"""Measure one plugin `.pte` in this process, the way the Android app's benchmark mode does on a phone.

    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.pte_worker PTE --iterations 200 --warmup 20

Prints one JSON object with the keys of one `results` entry of the app's
benchmark file (android_demo/README.md, "Benchmark result file"):
file_bytes, load_ms, content_hash, hidden_size, n_taps, gate_ms, side_ms,
gate_p, side_max_abs, rss_kb_before, rss_kb_after, peak_rss_kb,
peak_rss_reset, native_heap_kb (-1 here), error.

Latency per call: `execute` of the loaded method on inputs built once, plus
reading the output floats. Memory: VmRSS / VmHWM from /proc/self/status,
the peak reset through /proc/self/clear_refs before loading (as the app).
Inputs: N(0, 15) with channels 3, 77, 300 near +-2000 (the app's shape).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def proc_status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def latency_stats(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000
    return {"median": float(np.median(ms)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "calls": len(ms)}


def states(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    x = (rng.standard_normal((rows, hidden)) * 15).astype(np.float32)
    for c in (3, 77, 300):
        if c < hidden:
            x[:, c] = np.where(rng.random(rows) < 0.5, -1, 1) * (1500 + 1000 * rng.random(rows))
    return x


def measure(path: str, iterations: int, warmup: int) -> dict:
    import torch

    from spa.model.plugin import MARGIN_GATE
    from spa.model.pte_plugin import executorch_runtime
    from spa.system.quiet import quiet_native_stderr

    out = {"pte": path, "file_bytes": Path(path).stat().st_size if Path(path).exists() else 0, "error": None}
    if not Path(path).exists():
        return out | {"error": "no such file"}
    runtime = executorch_runtime()  # import and initialize the runtime before the memory baseline
    out["peak_rss_reset"] = reset_peak()
    out["rss_kb_before"] = proc_status_kb("VmRSS")
    t = time.perf_counter()
    with quiet_native_stderr():
        program = runtime.load_program(Path(path))
        gate, side = program.load_method("gate"), program.load_method("side")
    out["load_ms"] = (time.perf_counter() - t) * 1000
    out["content_hash"] = "".join(chr(c) for c in program.load_method("plugin_hash").execute([])[0].tolist())
    config = json.loads(bytes(program.load_method("plugin_config").execute([])[0].tolist()).decode())
    hidden, n_taps = config["backbone"]["hidden_size"], len(config["taps"])
    out["hidden_size"], out["n_taps"] = hidden, n_taps
    rng = np.random.default_rng(0)
    f = torch.from_numpy(states(rng, 1, hidden))
    if config.get("gate_input") == MARGIN_GATE:  # the gate reads [f, margin]
        f = torch.cat([f, torch.ones(1, 1)], dim=1)
    taps = torch.from_numpy(states(rng, n_taps, hidden)).unsqueeze(0)
    for name, method, inputs in (("gate", gate, [f]), ("side", side, [taps])):
        with quiet_native_stderr():
            for _ in range(warmup):
                method.execute(inputs)[0].numpy()
        samples = []
        for _ in range(iterations):
            t = time.perf_counter()
            result = method.execute(inputs)[0].numpy()
            samples.append(time.perf_counter() - t)
        out[f"{name}_ms"] = latency_stats(samples)
        if name == "gate":
            out["gate_p"] = float(result.reshape(-1)[0])
        else:
            out["side_max_abs"] = float(np.abs(result).max())
    out["rss_kb_after"] = proc_status_kb("VmRSS")
    out["peak_rss_kb"] = proc_status_kb("VmHWM")
    out["native_heap_kb"] = -1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="ExecuTorch threadpool size (default 1)")
    args = ap.parse_args(argv)
    from spa.system.quiet import quiet_libraries

    quiet_libraries()
    try:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(args.threads)
    except (ImportError, AttributeError):
        pass
    try:
        result = measure(args.pte, args.iterations, args.warmup)
    except Exception as exc:  # one bad .pte is a row with an error, not a crash of the table
        result = {"pte": args.pte, "file_bytes": os.path.getsize(args.pte) if os.path.exists(args.pte) else 0,
                  "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
