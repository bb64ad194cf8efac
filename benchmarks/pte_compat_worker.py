"""Run plugin `.pte` files in whatever ExecuTorch runtime this Python has (numpy + executorch only).

Run by `benchmarks/pte_compat.py` in a virtual environment that holds an older
ExecuTorch release; imports nothing from this project, so it works there.

    python pte_compat_worker.py INPUTS.npz OUT.json PTE...

INPUTS.npz holds `f` (n, H) and `taps` (n, n_taps, H) float32 and, optionally,
`projected` (n, n_taps, H). For each `.pte` the worker loads the program,
reads `plugin_hash` and `plugin_config`, loads `gate` and `side` (and
`side_projected` if present), runs them on every input row and writes the
outputs (or the error) as JSON.
"""

import json
import sys
import time
import traceback

import numpy as np


def run_one(runtime, path: str, inputs) -> dict:
    import torch

    out = {"pte": path}
    t0 = time.perf_counter()
    try:
        program = runtime.load_program(path)
        names = set(program.method_names)
        out["methods"] = sorted(names)

        def call(name, args):
            return program.load_method(name).execute(args)

        out["plugin_hash"] = "".join(chr(int(c)) for c in call("plugin_hash", [])[0].tolist())
        out["plugin_config"] = json.loads(bytes(int(c) for c in call("plugin_config", [])[0].tolist()).decode())
        gate, side = program.load_method("gate"), program.load_method("side")
        projected = program.load_method("side_projected") if "side_projected" in names else None
        out["load_s"] = time.perf_counter() - t0
        out["gate"], out["side"], out["side_projected"] = [], [], []
        for i in range(len(inputs["f"])):
            f = torch.from_numpy(inputs["f"][i][None].copy())
            taps = torch.from_numpy(inputs["taps"][i][None].copy())
            out["gate"].append(float(gate.execute([f])[0].reshape(-1)[0]))
            out["side"].append(side.execute([taps])[0].reshape(-1).tolist())
            if projected is not None and "projected" in inputs:
                p = torch.from_numpy(inputs["projected"][i][None].copy())
                out["side_projected"].append(projected.execute([p])[0].reshape(-1).tolist())
        out["error"] = None
    except Exception as exc:  # any failure is the finding: report it, go on with the next file
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-3000:]
    return out


def main(argv) -> int:
    inputs_file, out_file, *ptes = argv
    inputs = dict(np.load(inputs_file))
    import executorch
    from executorch.runtime import Runtime

    version = getattr(getattr(executorch, "version", None), "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("executorch")
    runtime = Runtime.get()
    results = [run_one(runtime, p, inputs) for p in ptes]
    with open(out_file, "w") as f:
        json.dump({"executorch": version, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
