"""Does a `.pte` ask for anything the APK's ExecuTorch runtime lacks? A static check, run in CI.

The APK built here carries react-native-executorch 0.9.3's `libexecutorch.so`, a fork build
of ExecuTorch (between 1.1 and 1.2, no version string); `spa export` writes programs with
ExecuTorch 1.5.1. ExecuTorch promises that a runtime reads the programs of *older* exporters,
not newer ones, and runtimes before 1.5 check little more than the magic, so a newer program
may load and then misbehave. No phone runs here, so this compares what the program needs with
what the runtime binary registers:

* the program's flatbuffer identifier (`ET12` at bytes 4..8) is one the runtime knows;
* every operator of every method (the kernels not delegated, e.g. `aten::mean.out`) is a
  kernel name registered in the runtime (`aten::...`/`quantized_decomposed::...` strings);
* every delegate id (`XnnpackBackend`) is a backend registered in the runtime;
* every XNNPACK blob's header magic (`XH00`) and flatbuffer identifier (`XN01`) are known to
  the runtime, and every XNNPACK node type in it has its handler in the runtime
  (`XNNFullyConnected` -> `defineFullyConnectedNode`), decoded with the exporter's own
  schema (`runtime_schema.fbs`) by `flatc`.

It does not show that the program computes the same numbers in that runtime (that needs the
runtime running: a phone, or the Python runtimes of benchmarks/pte_compat.py).

    python android_demo/scripts/pte_runtime_check.py LIBEXECUTORCH_SO PTE... [--json]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def runtime_registry(so_bytes: bytes) -> dict:
    """What a libexecutorch.so knows, from its bytes: kernel names, XNNPACK node handlers, magics."""
    text = so_bytes.decode("latin-1")
    return {
        "kernels": set(re.findall(r"(?:aten|quantized_decomposed|dim_order_ops|torchao|llama)::[A-Za-z0-9_]+\.[A-Za-z0-9_]+",
                                  text)),
        "xnn_handlers": set(re.findall(r"define([A-Z][A-Za-z0-9]+)Node", text)),
        "has": lambda token: token.encode() in so_bytes,
    }


def program_needs(pte_bytes: bytes) -> dict:
    """What a .pte asks of a runtime: its identifier, operators, delegate ids, XNNPACK magics and node types."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte_bytes).program
    operators, delegates, blobs = set(), set(), []
    for plan in program.execution_plan:
        operators |= {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
        for d in plan.delegates:
            delegates.add(d.id)
            if d.id == "XnnpackBackend":
                blobs.append(program.backend_delegate_data[d.processed.index].data)
    xnn_magics, node_types = set(), set()
    for blob in blobs:
        blob = bytes(blob)
        magic = blob[4:8]
        xnn_magics.add(magic.decode("latin-1"))
        if magic == b"XH00":  # the XNNPACK header, then the flatbuffer at its offset
            offset = int.from_bytes(blob[10:14], "little")
            size = int.from_bytes(blob[14:18], "little")
            flatbuffer = blob[offset:offset + size]
        else:
            flatbuffer = blob
        xnn_magics.add(flatbuffer[4:8].decode("latin-1"))
        node_types |= _xnn_node_types(flatbuffer)
    return {"identifier": pte_bytes[4:8].decode("latin-1"), "operators": operators, "delegates": delegates,
            "xnn_magics": xnn_magics, "xnn_nodes": node_types}


def _xnn_node_types(flatbuffer: bytes) -> set[str]:
    """The XNode union types of one XNNPACK graph, decoded by flatc with the exporter's schema."""
    import executorch.backends.xnnpack.serialization.xnnpack_graph_serialize as serialize

    schema = Path(serialize.__file__).parent / "runtime_schema.fbs"  # a namespace package: no __init__
    flatc = Path(sys.executable).parent / "flatc"
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "graph.bin"
        blob.write_bytes(flatbuffer)
        subprocess.run([str(flatc if flatc.exists() else "flatc"), "--json", "--strict-json", "--raw-binary",
                        "-o", tmp, str(schema), "--", str(blob)], check=True, capture_output=True)
        graph = json.loads((Path(tmp) / "graph.json").read_text())
    return {node["xnode_union_type"] for node in graph.get("xnodes", [])}


def missing(runtime: dict, needs: dict) -> list[str]:
    """What the program needs that the runtime lacks, one line each (empty: nothing found missing)."""
    out = []
    if not runtime["has"](needs["identifier"]):
        out.append(f"program identifier {needs['identifier']!r}")
    out += [f"operator {op}" for op in sorted(needs["operators"] - runtime["kernels"])]
    out += [f"backend {d}" for d in sorted(needs["delegates"]) if not runtime["has"](d + "\0")]
    out += [f"XNNPACK magic {m!r}" for m in sorted(needs["xnn_magics"]) if not runtime["has"](m)]
    out += [f"XNNPACK node {n}" for n in sorted(needs["xnn_nodes"])
            if not n.startswith("XNN") or n[3:] not in runtime["xnn_handlers"]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runtime", type=Path, help="the APK's libexecutorch.so (any ABI)")
    ap.add_argument("pte", type=Path, nargs="+")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    runtime = runtime_registry(args.runtime.read_bytes())
    report = {}
    for pte in args.pte:
        needs = program_needs(pte.read_bytes())
        report[str(pte)] = {"needs": {k: sorted(v) if isinstance(v, set) else v for k, v in needs.items()},
                            "missing": missing(runtime, needs)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for pte, r in report.items():
            n = r["needs"]
            print(f"{pte}: {n['identifier']}, {len(n['operators'])} operators, delegates {n['delegates']}, "
                  f"XNNPACK {n['xnn_magics']} nodes {n['xnn_nodes']}: "
                  + ("nothing missing" if not r["missing"] else "MISSING " + "; ".join(r["missing"])))
    return 1 if any(r["missing"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
