"""The backbone on a GPU: split == in-process reference, batched == solo, in float32 and bfloat16.

    python -m benchmarks.cuda_check [--device cuda] [--dtypes float32 bfloat16] [--out report.json]

Where no CUDA device exists it says so and exits 2: that is not a pass.
`--device cpu` runs the same checks on the CPU (a smoke run of this script,
reported as such, never as a GPU check).

For each dtype, on the default SmolLM2 backbone:

* **batched == solo.** Short chat prompts: the solo step functions' greedy
  tokens (the reference's) against batched prefill + batched decode. float32:
  prompts whose every choice has margin (top-2 gap > 1e-3) must give the same
  tokens. bfloat16: a batched row legitimately differs from the solo row by
  the rounding of a differently shaped product, so the batched steps are fed
  the solo tokens and every choice whose gap exceeds 4 % of the logits' scale
  must agree (tests/model/test_backbones.py uses the same rule).
* **split == reference.** A plugin with random non-zero weights (tau at the
  median gate probability, so the side network takes part), exported to
  `.pte`; sessions through an in-process gateway serving the backbone on the
  device, one at a time, W in {0, 4}: tokens and sigmas bit-identical to
  `reference_generate` in the same dtype. Then 8 sessions at once (their
  rounds batched): equal up to each session's first choice without margin
  (float32: logit gap and |p - tau| > 1e-3; bfloat16: 0.5 and 0.02).
* **settlement and branch lines** (float32 only: a bf16 gateway does not offer
  settlement). The backbone's output head is written where devices find it; a
  gateway with `--branches 2` on the GPU; sessions that settle (pushed taps, 4
  in flight, W = 8) over the userspace delay proxy at the 4g and 3g profiles:
  tokens equal to the reference, tokens settled on the device (> 0), heads
  computed only for fallbacks, branch lines streamed and adopted; and the
  figures measured there: the gateway's decode step (ms, solo) and the
  sessions' tokens/s as a share of cloud-only at that step (1 / step time).
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

BF16_MARGIN = 0.04  # batched vs solo in bfloat16: top-2 gap over the largest |logit|
BF16_GAP, BF16_P = 0.5, 0.02  # the same for whole sessions: absolute (about 4 % of SmolLM2's largest logits)
MARGIN = 1e-3  # float32
STEPS = 12


def _say(text: str) -> None:
    print(f"cuda_check: {text}", file=sys.stderr, flush=True)


def _prompts(n: int) -> list[str]:
    from benchmarks.load import QUESTIONS, chat_prompt

    return [chat_prompt(q) for q in QUESTIONS[:n]]


def _solo(bb, ids):
    """Greedy tokens of the generation loop (the reference's solo functions), each choice's top-2 gap
    and largest |logit|; no EOS stop: every prompt runs STEPS."""
    from spa.model.generate import generate

    gaps, scales = [], []

    def choose(pos, states):
        logits = bb.logits(states[0, -1])
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        scales.append(float(logits.abs().max()))
        return [int(torch.argmax(logits))]

    tokens = [t for _, _, chosen in generate(bb, ids, choose, STEPS, eos_ids=()) for t in chosen]
    return tokens, gaps, scales


def check_batched(bb) -> dict:
    """Batched prefill and decode against the solo functions (see the module docstring)."""
    from spa.model.generate import decode_batch, prefill_batch

    prompts = [bb.encode(p) for p in _prompts(16)]
    solo = [_solo(bb, ids) for ids in prompts]
    caches, states = zip(*prefill_batch(bb, prompts))
    caches, states = list(caches), torch.stack(states)
    bf16 = bb.dtype == torch.bfloat16
    compared = mismatched = 0
    free = [True] * len(prompts)  # float32: rows still on their solo path (fed their own batched choice)
    for step in range(STEPS):
        chosen = torch.argmax(bb.logits(states[:, -1]), dim=-1).tolist()
        for row, (tokens, gaps, scales) in enumerate(solo):
            margin = BF16_MARGIN * scales[step] if bf16 else MARGIN
            if bf16:
                if gaps[step] > margin:
                    compared += 1
                    mismatched += chosen[row] != tokens[step]
            elif free[row]:
                if min(gaps[: step + 1]) > margin:
                    compared += 1
                    mismatched += chosen[row] != tokens[step]
                else:
                    free[row] = False  # a choice without margin: the rest of this row is not compared
        feed = [tokens[step] for tokens, _, _ in solo] if bf16 else chosen
        states = decode_batch(bb, caches, feed)
    return {"prompts": len(prompts), "steps": STEPS, "compared": compared, "mismatched": mismatched,
            "rule": "teacher-forced, gap > 4% of |logit| max" if bf16 else "greedy, every choice gap > 1e-3",
            "ok": mismatched == 0 and compared >= len(prompts) * STEPS // 4}


def _random_plugin(bb, directory: Path) -> Path:
    """A plugin with random non-zero weights, exported to .pte (fp32); tau = the median gate p."""
    from export.export import export_plugin
    from spa.model.generate import prefill
    from spa.model.plugin import Plugin, PluginConfig, every_kth_layer, save_plugin

    torch.manual_seed(0)
    config = PluginConfig(backbone=bb.identity.to_dict(), taps=every_kth_layer(bb.num_layers, 3), rank=16,
                          side_scale=20.0)
    plugin = Plugin(config).eval()
    torch.nn.init.normal_(plugin.side.w_out.weight, std=0.5)
    with torch.no_grad():
        f = torch.stack([prefill(bb, bb.encode(p))[1][-1] for p in _prompts(8)])
        plugin.config.tau = float(plugin.gate(f)[:, 0].median())
    save_plugin(plugin, directory / "plugin")
    export_plugin(directory / "plugin", directory / "pte", variants=["fp32"], progress=lambda _: None)
    return directory / "pte" / "plugin-fp32.pte"


def check_split(bb, pte_path: Path) -> dict:
    from cloud_gateway.process import ThreadedGateway
    from device_runtime.client import run_session
    from spa.protocol import messages as m
    from spa.protocol.limits import Limits
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate

    pte = PtePlugin(pte_path)
    prompts = _prompts(8)
    refs = {p: reference_generate(bb, pte, p, tau=pte.tau, max_new_tokens=STEPS) for p in prompts}
    report = {"solo": {}, "concurrent": {}}
    with ThreadedGateway(bb, Limits(max_sessions=16)) as gw:
        for window in (0, 4):
            same = rollbacks = 0
            for p in prompts[:4]:  # one at a time: each session runs the solo functions
                r = asyncio.run(run_session(gw.url, pte, p, m.Options(window=window, max_new_tokens=STEPS)))
                same += r.tokens == refs[p].tokens and r.sigmas == refs[p].sigmas
                rollbacks += r.stats["rollbacks"]
            report["solo"][f"W={window}"] = {"sessions": 4, "identical": same, "rollbacks": rollbacks}

        async def together():
            return await asyncio.gather(*[run_session(gw.url, pte, p, m.Options(window=4, max_new_tokens=STEPS))
                                          for p in prompts])

        results = asyncio.run(together())
        engine = gw.call(lambda: dict(gw.gateway.engine.stats))
    # Concurrent sessions share batched rounds: each is compared up to its first choice without margin
    # (a logit gap or a gate p too close to call for this dtype's batched-vs-solo rounding).
    gap_margin, p_margin = (BF16_GAP, BF16_P) if bb.dtype == torch.bfloat16 else (MARGIN, MARGIN)
    checked = equal = 0
    for p, r in zip(prompts, results):
        ref = refs[p]
        k = next((i for i, (g, q) in enumerate(zip(ref.logit_gap, ref.gate_p))
                  if g <= gap_margin or abs(q - pte.tau) <= p_margin), len(ref.tokens))
        checked += k
        equal += r.tokens[:k] == ref.tokens[:k] and r.sigmas[:k] == ref.sigmas[:k]
    report["concurrent"] = {"sessions": len(prompts), "choices_with_margin": checked,
                            "sessions_equal_up_to_margin": equal, "max_batch": engine["max_batch"],
                            "margins": {"logit_gap": gap_margin, "gate_p": p_margin}}
    report["side_tokens"] = sum(sum(r.sigmas) for r in refs.values())
    report["ok"] = (all(v["identical"] == v["sessions"] for v in report["solo"].values())
                    and equal == len(prompts) and checked > 0 and report["side_tokens"] > 0)
    return report


def _step_ms(bb) -> float:
    """The gateway's solo decode step on this device, median of STEPS (what cloud-only streams at)."""
    from spa.model.generate import decode_one_token, prefill

    cache, _ = prefill(bb, bb.encode(_prompts(1)[0]))
    times = []
    for token in range(STEPS + 2):
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        decode_one_token(bb, cache, 100 + token)
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times[2:])[len(times[2:]) // 2]


def check_settlement(bb, pte_path: Path, profiles=("4g", "3g")) -> dict:
    from benchmarks.link import PROFILES, ProxyLink
    from cloud_gateway.process import ThreadedGateway
    from device_runtime.client import run_session
    from spa.model.output_head import export_head
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate
    from spa.protocol import messages as m
    from spa.protocol.limits import Limits

    export_head(bb)
    pte = PtePlugin(pte_path)
    prompts = _prompts(4)
    refs = {p: reference_generate(bb, pte, p, tau=pte.tau, max_new_tokens=STEPS * 2) for p in prompts}
    step = _step_ms(bb)
    report = {"step_ms": round(step, 2), "profiles": {}}
    with ThreadedGateway(bb, Limits(max_sessions=16), branches=2) as gw:
        for name in profiles:
            with ProxyLink(PROFILES[name]) as link:
                url = link.device_url("127.0.0.1", gw.port)
                same = settled = heads = streamed = adopted = 0
                tokens = span = 0.0
                for p in prompts:  # one at a time: the solo path, bit-identical to the reference
                    times = []
                    t0 = time.perf_counter()
                    r = asyncio.run(run_session(url, pte, p, m.Options(window=8, max_new_tokens=STEPS * 2),
                                                push_taps=True, max_in_flight=4, settle=True,
                                                on_commit=lambda piece, sigma: times.append(time.perf_counter() - t0)))
                    same += r.tokens == refs[p].tokens
                    g = r.stats["gateway"]
                    settled, heads = settled + g["settled"], heads + g["heads"]
                    streamed, adopted = streamed + g["branch_streamed"], adopted + r.stats["branch_adopted"]
                    tokens, span = tokens + len(times) - 1, span + (times[-1] - times[0] if len(times) > 1 else 0)
                tps = tokens / span if span else None
                report["profiles"][name] = {
                    "sessions": len(prompts), "identical": same, "settled": settled, "heads": heads,
                    "branch_streamed": streamed, "branch_adopted": adopted, "tokens_per_s": tps,
                    "vs_cloud_only_at_this_step": None if tps is None else round(tps * step / 1000, 3)}
    side = sum(sum(r.sigmas) for r in refs.values())
    report["ok"] = all(v["identical"] == v["sessions"] and (v["settled"] > 0 or side == 0)
                       for v in report["profiles"].values())
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = ap.parse_args(argv)
    from spa.system.quiet import quiet_libraries

    quiet_libraries()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"cuda_check: no CUDA device here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda or 'not built in'}): nothing was checked on a GPU", file=sys.stderr)
        return 2
    from spa.model.backbone import load_backbone

    report = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pte_path = None
        for dtype in args.dtypes:
            t0 = time.time()
            bb = load_backbone(dtype=dtype, device=args.device)
            if pte_path is None:
                _say("exporting a random plugin to .pte...")
                pte_path = _random_plugin(bb, Path(tmp))
            _say(f"{dtype}: batched vs solo...")
            batched = check_batched(bb)
            _say(f"{dtype}: {json.dumps(batched)}; split vs reference...")
            split = check_split(bb, pte_path)
            _say(f"{dtype}: {json.dumps(split)}")
            report["checks"][dtype] = {"batched_vs_solo": batched, "split_vs_reference": split,
                                       "seconds": round(time.time() - t0, 1)}
            if dtype == "float32":
                _say("float32: settlement and branch lines over the 4g and 3g profiles...")
                report["checks"][dtype]["settlement"] = settlement = check_settlement(bb, pte_path)
                _say(f"float32: {json.dumps(settlement)}")
            del bb
    report["ok"] = all(c["batched_vs_solo"]["ok"] and c["split_vs_reference"]["ok"]
                       and c.get("settlement", {"ok": True})["ok"] for c in report["checks"].values())
    if not args.device.startswith("cuda"):
        report["note"] = "a smoke run on the CPU: not a GPU check"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
