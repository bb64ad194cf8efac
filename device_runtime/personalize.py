"""`spa personalize`: the device learns from its user's examples and keeps the new plugin.

    1. the plugin to teach: an export (its training program, written by `spa export`) or a
       personal plugin store from an earlier run (learning goes on from its current version);
    2. the examples file (spa/data/examples.py: the same files and checks as `spa train --examples`),
       each example's prompt built from the plugin's own template, as `spa summarize` builds one;
    3. the states from the gateway (device_runtime/teach_client.py);
    4. the recipe on the device (device_runtime/learning.py, in the ExecuTorch runtime);
    5. the new version written atomically into the store (spa/model/personal.py).

`spa summarize --plugin STORE` then generates with it.
"""

import resource
import sys
import time
from pathlib import Path

import torch

from device_runtime.documents import device_prompt
from device_runtime.learning import DeviceTokens, Program, learn
from device_runtime.teach_client import fetch_states
from spa.data.examples import read_examples
from spa.errors import SpaError
from spa.model.output_head import find_head
from spa.model.personal import PersonalStore, is_store
from spa.model.plugin import CONFIG_FILE, read_config
from spa.model.projection import projection_weights
from spa.protocol import messages as m

STORE_NAME = "personal"


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux; ru_maxrss would carry the parent's peak over a
    fork and exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def find_store(plugin: Path, out: Path | None) -> tuple[PersonalStore | None, Path, Path]:
    """(the store to learn into, or None where it is still to be made; the export; the store's directory).
    `plugin`: a store, an export directory or a `.pte` in one; `out`: where to make the store (default:
    `personal/` in the export directory). Nothing is written here."""
    plugin = Path(plugin)
    if is_store(plugin):
        if out is not None and Path(out).resolve() != plugin.resolve():
            raise SpaError(f"{plugin} is a personal plugin store already: it learns in place (drop --out)")
        return PersonalStore(plugin), plugin.parent, plugin
    export_dir = plugin.parent if plugin.is_file() else plugin
    if not export_dir.is_dir() or not (export_dir / CONFIG_FILE).is_file():
        raise SpaError(f"{plugin}: no such export (give the .pte or the directory `spa export` wrote)")
    root = Path(out) if out is not None else export_dir / STORE_NAME
    return (PersonalStore(root) if is_store(root) else None), export_dir, root


def projection_upload(weights: dict, taps: int) -> m.Projection:
    w, b = projection_weights({k: torch.from_numpy(v) for k, v in weights.items()}, taps)
    return m.Projection(w.shape[1], w.astype("<f2").tobytes(), b.astype("<f4").tobytes())


async def personalize(url: str, plugin: Path, examples_path: Path, *, out: Path | None = None, token: str = "",
                      cafile: str | None = None, codec: str = "int8", outliers: int = 8,
                      cloud_projection: bool = False, settings=None, progress=None, log=print,
                      on_frame=None) -> dict:
    """Learn from the examples file; returns the report (`spa personalize --json`)."""
    store, export_dir, root = find_store(plugin, out)
    config, _ = read_config(store.current if store is not None else export_dir)
    examples = read_examples(examples_path, config.max_doc_tokens)  # bad files fail before any traffic or file
    if examples.note():
        log(f"spa personalize: {examples.note()}")
    head = find_head(config.backbone["fingerprint"])
    if head is None:
        raise SpaError(f"this device holds no output head for backbone {config.backbone.get('name')!r}; the loss "
                       f"needs it: run `spa export` of the plugin on this machine (it writes the head)")
    made = store is None
    store = store or PersonalStore.create(export_dir, root)
    if head.vocab_size != store.info.vocab_size:
        raise SpaError(f"the output head has {head.vocab_size} tokens, the training program {store.info.vocab_size}")
    start = store.weights()
    wire_plugin = m.Plugin(config.backbone["fingerprint"], tuple(config.taps), store.config()["content_hash"])
    pairs = [(device_prompt(config, e.document), e.summary) for e in examples.examples]
    parts, traffic = await fetch_states(
        url, wire_plugin, pairs, hidden=config.hidden_size, rank=config.rank, token=token, codec=codec,
        outliers=outliers, margin=config.gate_margin, cafile=cafile, on_frame=on_frame,
        projection=projection_upload(start, len(config.taps)) if cloud_projection else None,
        progress=None if progress is None else lambda done, total: progress(done, total, "states from the gateway"))
    tokens = DeviceTokens.join(parts)
    program = Program(store.pte, store.weights_bytes(), store.info, torch.from_numpy(head.weight),
                      projected=cloud_projection)
    t0 = time.perf_counter()
    learned = learn(program, tokens, settings, progress)
    seconds = time.perf_counter() - t0
    record = learned.record | {"examples_sha256": examples.sha256, "codec": codec, "cloud_projection": cloud_projection,
                               "bytes_down": sum(traffic.bytes_down), "bytes_up": sum(traffic.bytes_up),
                               "metrics": {k: v for k, v in learned.metrics.items() if k in ("train", "val")}}
    version = store.write(learned.weights, learned.tau, record)
    val = learned.metrics["val"]
    return {"store": str(store.root), "version": version.name, "created": made, "cloud_projection": cloud_projection,
            "content_hash": store.config()["content_hash"], "tau": learned.tau, "examples": len(examples),
            "tokens": len(tokens), "validation": learned.record["validation"],
            "seconds_learning": round(seconds, 1), "seconds_per_example": round(seconds / len(examples), 2),
            "training_batches": learned.record["training_batches"],
            # this process's peak memory: Python, torch and ExecuTorch, the output head, the states, the programs
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "traffic": traffic.to_dict(), "metrics": learned.metrics,
            "loss": {"backbone": val["loss_backbone"], "before": val["loss_side_before"],
                     "side_always": val["loss_side_always"], "gated": val["loss_gated"],
                     "side_usage": val["side_usage"]}}


def print_report(report: dict, out=sys.stdout) -> None:
    loss, traffic = report["loss"], report["traffic"]
    print(f"learned from {report['examples']} examples ({report['tokens']} summary tokens; validation: "
          f"{report['validation']}) in {report['seconds_learning']:.0f} s on this device "
          f"({report['seconds_per_example']:.1f} s per example)", file=out)
    print(f"held-out loss: backbone {loss['backbone']:.3f} | plugin before {loss['before']:.3f} | after, side always "
          f"on {loss['side_always']:.3f} | gated at tau {report['tau']:.3g}: {loss['gated']:.3f} with side usage "
          f"{loss['side_usage']:.0%}", file=out)
    kept = ("the weights it learned never left this device (the projection's, which stay as they were, "
            "went to the gateway as spa summarize sends them)" if report["cloud_projection"]
            else "the plugin's weights never left this device")
    print(f"states from the gateway: {traffic['bytes_down_per_example'] / 1024:.0f} KB down and "
          f"{traffic['bytes_up_per_example'] / 1024:.1f} KB up per example; {kept}", file=out)
    print(f"saved {report['store']} ({report['version']}, plugin {report['content_hash']}); "
          f"spa summarize --plugin {report['store']} uses it", file=out)
