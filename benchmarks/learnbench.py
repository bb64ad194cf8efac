"""`spa bench device --learning`: what on-device learning costs and gives, on this CPU.

For one person's first N examples (evaluation/people.py: an ACLSum reader type, N = 20):

1. **The workstation's plugin**: `spa train --examples` (training/examples.py, eager PyTorch).
2. **The phone's plugin**: the same fresh plugin that recipe starts from (same config, same seed,
   so the same initial weights), exported with its training program, then taught on the device:
   `spa personalize` as a child process against a real `spa gateway` (the states over the
   websocket protocol, training in the ExecuTorch runtime), once with the raw taps and once with
   the cloud-side projection (the device then trains the side network after the projections).
3. **Figures**: seconds per example of on-device learning, seconds per training step, the
   device process's peak memory, bytes down (and up) per example with and without the
   projection, the held-out loss of each plugin, and Rouge-L on the person's test documents
   (greedy, <= 48 new tokens; SPA at each plugin's tau, and side always on), the phone's against
   the workstation's with a paired bootstrap 95 % interval. Goal (issue 26): within 0.5 points.

Timings are of this machine as it was (the load average is printed beside them): the two cores
are shared, and a loaded machine is several times slower than a quiet one.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from spa.errors import SpaError
from spa.system.children import python_command, python_env

GOAL_POINTS = 0.5


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def fresh_plugin(backbone, examples, settings, out: Path):
    """The plugin `spa train --examples` starts from (its config and its seeded initial weights), saved."""
    from spa.data.examples import EXAMPLES_INSTRUCTION
    from spa.data.prompts import chat_template
    from spa.model.plugin import Plugin, save_plugin
    from training.examples import example_tokens
    from training.train import new_config

    template = chat_template(backbone.tokenizer)
    tokens = example_tokens(backbone, examples, template)
    config = new_config(backbone, settings, tokens, template, EXAMPLES_INSTRUCTION)
    torch.manual_seed(settings.seed)  # as training/train.py's train_on_tokens, before Plugin(config)
    save_plugin(Plugin(config), out)
    return out


def step_seconds(export: Path, head, repeats: int = 5) -> dict:
    """Median seconds of one side_loss step (64 tokens: forward, backward, AdamW through SGD) in ExecuTorch,
    and of the same step in eager PyTorch, on this CPU."""
    import statistics

    import torch.nn.functional as F

    from export.training_program import SideLoss
    from spa.model.plugin import load_plugin
    from spa.model.train_program import ProgramInfo, Trainee

    info = ProgramInfo.read(export / "plugin-train.json")
    plugin = load_plugin(export)
    c = plugin.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(info.batch, len(c.taps), c.hidden_size, generator=g) * 15
    f, targets, w = x[:, -1].clone(), torch.randint(0, head.vocab_size, (info.batch,), generator=g), torch.ones(info.batch)
    weight = torch.from_numpy(head.weight)
    device = Trainee(export / "plugin-train.pte", export / "plugin-train.ptd", "side_loss", 1e-3)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        device.run((x, f, targets, w, weight))
        device.step()
        times.append(time.perf_counter() - t0)
    eager, loss_of = [], SideLoss(plugin, head, projected=False)
    opt = torch.optim.AdamW(plugin.side.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(loss_of.head(f + plugin.side(x), weight), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        eager.append(time.perf_counter() - t0)
    return {"executorch": statistics.median(times[1:]), "eager": statistics.median(eager[1:]),
            "torch_threads": torch.get_num_threads(), "load_average": load_average()}


def personalize_child(url: str, export: Path, examples: Path, store: Path, projection: bool, log) -> dict:
    """`spa personalize --json` as its own process (the device): its report."""
    args = ["personalize", "--examples", examples, "--plugin", export / "plugin-fp32.pte", "--gateway", url,
            "--out", store, "--json"] + (["--cloud-projection"] if projection else [])
    log(f"  on the device: spa personalize{' --cloud-projection' if projection else ''} (load {load_average()})")
    proc = subprocess.run(python_command("cli.main", *args), capture_output=True, text=True, env=python_env(
        OMP_NUM_THREADS="1"), timeout=7200)
    if proc.returncode != 0:
        raise SpaError(f"spa personalize failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def run_learning(workdir: Path = Path("runs/bench/learning"), person: str = "outcome", n: int = 20, tests: int = 30,
                 max_new_tokens: int = 48, log=print) -> dict:
    from cloud_gateway.process import GatewayProcess
    from evaluation.batched import ALWAYS, NEVER, EagerPlugin, Row, generate_rows
    from evaluation.bootstrap import paired_bootstrap
    from evaluation.people import write_person
    from evaluation.rouge import rouge_l, side_usage
    from export.export import export_plugin
    from export.training_program import export_training_program
    from spa.data.examples import EXAMPLES_INSTRUCTION, read_examples
    from spa.data.prompts import chat_template, format_prompt
    from spa.model.backbone import load_backbone
    from spa.model.output_head import OutputHead, ensure_head
    from spa.model.personal import PersonalStore
    from spa.model.plugin import load_plugin, save_plugin
    from training.examples import example_settings, train_from_examples

    t_start, loads = time.time(), {"start": load_average()}
    workdir.mkdir(parents=True, exist_ok=True)
    files, test_file = write_person(person, workdir / "data", (n,), tests)
    backbone = load_backbone()
    settings = example_settings()
    examples = read_examples(files[n], settings.max_doc_tokens)
    test_set = read_examples(test_file, settings.max_doc_tokens, minimum=1)

    log(f"the workstation: spa train --examples ({n} examples of {person}; load {load_average()})")
    t0 = time.time()
    reference, ref_metrics = train_from_examples(backbone, examples, settings)
    workstation_s = time.time() - t0
    save_plugin(reference, workdir / "workstation")

    log("the phone's starting point: the same fresh plugin, exported with its training program")
    fresh = fresh_plugin(backbone, examples, settings, workdir / "fresh")
    export = workdir / "fresh-export"
    t0 = time.time()
    export_plugin(fresh, export, variants=("fp32",), progress=log)
    head = OutputHead.load(ensure_head(load_plugin(fresh).config.backbone, log=log))
    training_program = export_training_program(fresh, export, head)
    export_s = time.time() - t0

    log(f"one training step, ExecuTorch and eager (load {load_average()})")
    steps = step_seconds(export, head)
    runs = {}
    with GatewayProcess() as gateway:
        for projection in (False, True):
            store = workdir / ("store-projection" if projection else "store")
            if store.exists():
                import shutil

                shutil.rmtree(store)
            runs["projection" if projection else "taps"] = personalize_child(gateway.url, export, files[n], store,
                                                                             projection, log)
    loads["after_learning"] = load_average()

    log(f"Rouge-L on {len(test_set)} test documents of {person} (load {load_average()})")
    plugins = {"workstation": EagerPlugin(reference.eval())}
    for name in runs:
        plugins[f"device ({name})"] = EagerPlugin(load_plugin(PersonalStore(runs[name]["store"]).current))
    rows = [Row("backbone", None, NEVER)]
    for name, plugin in plugins.items():
        rows += [Row(f"{name}: SPA", plugin, plugin.config.tau), Row(f"{name}: side always on", plugin, ALWAYS)]
    template = chat_template(backbone.tokenizer)
    gens = {row.name: [] for row in rows}
    for test in test_set.examples:
        ids = backbone.encode(format_prompt(template, test.document, EXAMPLES_INSTRUCTION))
        for row, gen in zip(rows, generate_rows(backbone, ids, rows, max_new_tokens)):
            gens[row.name].append(gen)
    refs = [t.summary for t in test_set.examples]
    table = {}
    for name, generations in gens.items():
        per_doc = [rouge_l(backbone.decode(g.tokens), ref) for g, ref in zip(generations, refs)]
        table[name] = {"rouge_l": sum(per_doc) / len(per_doc), "per_doc": per_doc,
                       "side_usage": side_usage([g.sigmas for g in generations])}
    against = {name: paired_bootstrap(table[f"{name}: SPA"]["per_doc"], table["workstation: SPA"]["per_doc"])
               for name in plugins if name != "workstation"}
    against_always = {name: paired_bootstrap(table[f"{name}: side always on"]["per_doc"],
                                             table["workstation: side always on"]["per_doc"])
                      for name in plugins if name != "workstation"}
    loads["end"] = load_average()
    return {"person": person, "examples": n, "tests": len(test_set), "max_new_tokens": max_new_tokens,
            "cpu": os.cpu_count(), "load_average": loads, "seconds": round(time.time() - t_start),
            "workstation": {"seconds": round(workstation_s, 1), "tau": reference.config.tau,
                            "val": ref_metrics["val"]},
            "export": {"seconds": round(export_s, 1), "training_program": training_program}, "step_seconds": steps,
            "device": runs, "rouge": table, "device_minus_workstation_spa": against,
            "device_minus_workstation_always_on": against_always, "goal_points": GOAL_POINTS,
            "command": "spa " + " ".join(sys.argv[1:])}


def format_learning(r: dict) -> str:
    lines = [f"On-device learning: {r['examples']} examples of {r['person']}, {r['tests']} test documents "
             f"(load average {r['load_average']['start']} at the start, {r['load_average']['end']} at the end, "
             f"{r['cpu']} cores; {r['seconds'] / 60:.0f} min in all)"]
    w = r["workstation"]
    lines.append(f"workstation (spa train --examples, eager): {w['seconds']:.0f} s; held-out loss "
                 f"{w['val']['loss_backbone']:.3f} -> side always on {w['val']['loss_side_always']:.3f}, gated "
                 f"{w['val']['loss_gated']:.3f} at {w['val']['side_usage']:.0%} usage")
    t = r["export"]["training_program"]
    lines.append(f"training program: {t['bytes'] / 1024:.0f} KB + weights {t['weights_bytes'] / 1024:.0f} KB "
                 f"(the output head, an input: 113 MB the device holds for settlement)")
    st = r.get("step_seconds")
    if st:
        lines.append(f"one step (64 tokens, forward + backward + AdamW): ExecuTorch {st['executorch']:.2f} s, eager "
                     f"PyTorch {st['eager']:.2f} s ({st['torch_threads']} torch threads; load {st['load_average']})")
    lines.append("")
    lines.append(f"{'device run':28} {'s/example':>9} {'peak RSS':>9} {'KB down/ex':>10} {'KB up/ex':>8} "
                 f"{'loss before':>11} {'always on':>9} {'gated':>7} {'usage':>6}")
    for name, d in r["device"].items():
        tr, loss = d["traffic"], d["loss"]
        lines.append(f"{'states ' + ('as projections d' if name == 'projection' else 'as raw taps'):28} "
                     f"{d['seconds_per_example']:>9.1f} {d['peak_rss_mb']:>6.0f} MB "
                     f"{tr['bytes_down_per_example'] / 1024:>10.1f} {tr['bytes_up_per_example'] / 1024:>8.1f} "
                     f"{loss['before']:>11.3f} {loss['side_always']:>9.3f} {loss['gated']:>7.3f} "
                     f"{loss['side_usage']:>6.0%}")
    lines.append("")
    lines.append(f"{'Rouge-L (greedy)':44} {'Rouge-L':>8} {'side usage':>10}")
    for name, row in r["rouge"].items():
        usage = "" if row["side_usage"] is None else f"{row['side_usage']:.0%}"
        lines.append(f"{name:44} {row['rouge_l']:>8.2f} {usage:>10}")
    lines.append("")
    for name, b in r["device_minus_workstation_spa"].items():
        diff, lo, hi = (b[k] for k in ("diff", "low", "high"))
        met = "met" if abs(diff) <= r["goal_points"] else "missed"
        lines.append(f"{name} SPA minus the workstation's: {diff:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                     f"(goal: within {r['goal_points']} points: {met})")
    for name, b in r["device_minus_workstation_always_on"].items():
        diff, lo, hi = (b[k] for k in ("diff", "low", "high"))
        lines.append(f"{name} side always on minus the workstation's: {diff:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return "\n".join(lines)
