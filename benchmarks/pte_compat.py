"""Does a plugin `.pte` exported here load, and compute what eager PyTorch computes, in an OLDER ExecuTorch runtime?

The exporter is executorch 1.5.1 (scripts/setup.sh). The runtime inside the
APK that android_demo/scripts/build_apk.sh builds comes from the npm package
react-native-executorch@0.9.3: a build between ExecuTorch 1.1.0 and 1.2.0 (its
strings match neither release exactly), and the Gradle build pins the
published AAR `org.pytorch:executorch-android:1.2.0`. No phone runs here, so
this script checks the same programs with the Python runtime of those releases
from PyPI, each in its own virtual environment under `.venv-et-compat/<version>`
(created on first use: executorch <version> and the torch release its
pybindings were built against; a few GB with torch's CUDA libraries, a few
minutes on a fast link).

    python -m benchmarks.pte_compat [EXPORT_DIR] [--runtime 1.1.0 --runtime 1.2.0] [--json]

EXPORT_DIR is a `spa export` output (plugin-fp32.pte, plugin-int8.pte,
config.json, plugin.safetensors); default: the repository's test-vector
plugin (tests/vectors/plugin_vectors), exported once into
runs/pte-compat/export. For each runtime and each `.pte`: the program loads, its
`plugin_hash` and `plugin_config` match the export, and `gate`, `side` and
`side_projected` on the export's parity inputs match eager PyTorch within the
export's own tolerances (export/export.py) — and the current runtime's outputs
are shown beside them. Exit status 0 when every runtime passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV_ROOT = ROOT / ".venv-et-compat"
WORKER = Path(__file__).resolve().parent / "pte_compat_worker.py"
# executorch release -> the torch release its Python bindings are linked against (an
# executorch wheel's _portable_lib needs exactly that libtorch; PyPI's torch for Linux x86-64 is
# the CUDA build, hence the size of these environments).
RUNTIMES = {"1.1.0": "2.10.0", "1.2.0": "2.11.0"}
DEFAULT_RUNTIMES = ("1.1.0", "1.2.0")
RUNTIME_DEPS = ("numpy", "flatbuffers", "packaging", "pyyaml", "typing-extensions", "ruamel.yaml", "tabulate")


def venv_python(version: str) -> Path:
    return VENV_ROOT / version / "bin" / "python"


def ensure_runtime(version: str, log=print) -> Path:
    """The Python of a virtual environment holding executorch `version` (created on first use)."""
    if version not in RUNTIMES:
        raise SystemExit(f"pte_compat: no torch pairing known for executorch {version} (known: {', '.join(RUNTIMES)})")
    python, ready = venv_python(version), VENV_ROOT / version / ".ready"
    if ready.is_file() and python.is_file():
        return python
    log(f"creating {python.parent.parent} (executorch {version}, torch {RUNTIMES[version]}; downloads a few GB once)...")
    t0 = time.monotonic()
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", "--clear", str(python.parent.parent)],
        [str(python), "-m", "pip", "install", "-q", f"torch=={RUNTIMES[version]}", *RUNTIME_DEPS],
        # executorch's own requirements (coremltools, pandas, torchao, ...) serve the exporter, not the runtime
        [str(python), "-m", "pip", "install", "-q", "--no-deps", f"executorch=={version}"],
        [str(python), "-c", "from executorch.runtime import Runtime; Runtime.get()"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"pte_compat: {' '.join(cmd[:6])} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    ready.write_text(f"executorch {version}, torch {RUNTIMES[version]}\n")
    log(f"  ready in {time.monotonic() - t0:.0f} s")
    return python


def default_export(log=print) -> Path:
    """The test-vector plugin, exported once (spa export) into runs/pte-compat/export."""
    from benchmarks.provision import run_spa

    src = ROOT / "tests" / "vectors" / "plugin_vectors"
    out = ROOT / "runs" / "pte-compat" / "export"
    manifest = out / "manifest.json"
    want = json.loads((src / "config.json").read_text())
    if manifest.is_file() and (out / "plugin-fp32.pte").is_file():
        if json.loads((out / "config.json").read_text()) == want:
            return out
    log(f"exporting {src.relative_to(ROOT)} to {out.relative_to(ROOT)} (spa export)...")
    run_spa("export", src, "--out", out)
    return out


def check(export_dir: Path, runtimes=DEFAULT_RUNTIMES, log=print, include_current: bool = True) -> dict:
    """Run every `.pte` of `export_dir` in each runtime (and the current one); compare with eager."""
    import torch

    from export.export import TOLERANCE, parity_inputs, side_tolerance
    from spa.model.plugin import load_plugin

    plugin = load_plugin(export_dir).eval()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    ptes = {v: export_dir / info["file"] for v, info in manifest["variants"].items()}
    rows = parity_inputs(plugin)
    f = np.stack([r[0].numpy() for r in rows]).astype(np.float32)
    taps = np.stack([r[1].numpy() for r in rows]).astype(np.float32)
    with torch.no_grad():
        projected = np.stack([plugin.side.project(r[1]).numpy() for r in rows]).astype(np.float32)
        eager_gate = np.array([plugin.gate(r[0])[0].item() for r in rows])
        eager_side = np.stack([plugin.side(r[1]).numpy().reshape(-1) for r in rows])
    side_max = float(np.abs(eager_side).max())

    report = {"export_dir": str(export_dir), "content_hash": manifest["content_hash"], "runtimes": {}}
    with tempfile.TemporaryDirectory(prefix="pte-compat-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, f=f, taps=taps, projected=projected)
        for version in (["current"] if include_current else []) + list(runtimes):
            python = Path(sys.executable) if version == "current" else ensure_runtime(version, log)
            out = Path(tmp) / f"{version}.json"
            t0 = time.monotonic()
            proc = subprocess.run([str(python), str(WORKER), str(inputs), str(out), *map(str, ptes.values())],
                                  capture_output=True, text=True, timeout=900)
            seconds = time.monotonic() - t0
            if proc.returncode != 0:
                report["runtimes"][version] = {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:], "seconds": seconds}
                continue
            got = json.loads(out.read_text())
            variants = {}
            for (variant, path), res in zip(ptes.items(), got["results"]):
                row = {"pte": path.name, "error": res["error"]}
                if res["error"] is None:
                    tol = TOLERANCE[variant]
                    side_tol = side_tolerance(variant, side_max)
                    gate_err = float(np.abs(np.array(res["gate"]) - eager_gate).max())
                    side_err = float(np.abs(np.array(res["side"]) - eager_side).max())
                    if res["side_projected"]:
                        side_err = max(side_err, float(np.abs(np.array(res["side_projected"]) - eager_side).max()))
                    row |= {"gate_max_abs_err": gate_err, "side_max_abs_err": side_err, "gate_tolerance": tol["gate"],
                            "side_tolerance": side_tol, "load_s": res["load_s"],
                            "hash_ok": res["plugin_hash"] == manifest["content_hash"],
                            "config_ok": res["plugin_config"].get("content_hash") == manifest["content_hash"],
                            "side_projected": bool(res["side_projected"])}
                    row["ok"] = (row["hash_ok"] and row["config_ok"] and gate_err <= tol["gate"] and side_err <= side_tol)
                else:
                    row["ok"] = False
                    row["traceback"] = res.get("traceback")
                variants[variant] = row
            report["runtimes"][version] = {"executorch": got["executorch"], "seconds": seconds, "variants": variants,
                                           "ok": all(v["ok"] for v in variants.values())}
    report["ok"] = all(r["ok"] for r in report["runtimes"].values())
    return report


def format_report(report: dict) -> str:
    lines = [f"plugin {report['content_hash']} from {report['export_dir']}",
             f"{'runtime':22} {'pte':18} {'gate err':>10} {'side err':>10} {'side tol':>10}  result"]
    for version, r in report["runtimes"].items():
        name = f"{r.get('executorch', version)}" + (" (exporter's)" if version == "current" else "")
        if "variants" not in r:
            lines.append(f"{name:22} {'-':18} worker failed: {r['error'][-300:]}")
            continue
        for v in r["variants"].values():
            if v["error"]:
                lines.append(f"{name:22} {v['pte']:18} {'':>10} {'':>10} {'':>10}  DOES NOT LOAD: {v['error'][:200]}")
            else:
                lines.append(f"{name:22} {v['pte']:18} {v['gate_max_abs_err']:>10.2e} {v['side_max_abs_err']:>10.2e} "
                             f"{v['side_tolerance']:>10.2e}  {'ok' if v['ok'] else 'FAIL'}"
                             + ("" if v["side_projected"] else " (no side_projected)"))
        lines.append(f"{'':22} ({r['seconds']:.1f} s)")
    lines.append("every runtime reads these programs and matches eager" if report["ok"] else "INCOMPATIBLE: see above")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", nargs="?", type=Path, default=None)
    ap.add_argument("--runtime", action="append", choices=sorted(RUNTIMES), help="executorch release(s) to check")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    t0 = time.monotonic()
    export_dir = args.export_dir or default_export(log)
    report = check(export_dir, tuple(args.runtime or DEFAULT_RUNTIMES), log)
    report["seconds"] = time.monotonic() - t0
    print(json.dumps(report, indent=1) if args.json else format_report(report) + f"\n({report['seconds']:.0f} s in all)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
