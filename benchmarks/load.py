"""`spa bench load`: many concurrent device sessions against one gateway.

One real gateway subprocess (SmolLM2, `spa gateway`) and N device sessions
(`device_runtime.client.run_session`, the plugin run by the ExecuTorch
runtime) in this process, all on loopback; N = 1 first, then each requested
count, against the same gateway. Per N it prints: sessions held (completed
concurrently, none refused), tokens/s over all sessions, p95 inter-token
latency (time between a session's consecutive committed tokens), time to first
token, the gateway's peak memory (RSS sampled every 20 ms) and what remains
after the sessions end, and the batching the gateway reports in each `end`
(decode steps that shared a forward with other sessions, mean batch size) —
with ratios against N = 1, measured side by side in one run.

With 2+ CPUs the gateway is pinned to the last CPU and the devices to the
others (taskset / sched_setaffinity); the output says so.
"""

import asyncio
import os
import statistics
import threading
import time
from pathlib import Path

from benchmarks.provision import ensure_plugin
from benchmarks.stats import fmt, percentile, rss
from cloud_gateway.process import GatewayProcess
from spa.children import pinned

QUESTIONS = [
    "What is rain?", "Name a fruit.", "Why do cats purr?", "What is a star?", "Define gravity.",
    "Say hello.", "What is water?", "Name a colour.", "Why is snow white?", "What is a bird?",
    "Describe the sea.", "What is music?", "Name a planet.", "What is bread?", "Why do we sleep?",
    "What is a tree?", "Describe a dog.", "What is light?", "Name a country.", "What is ice?",
    "Why is grass green?", "What is a cloud?", "Describe winter.", "What is a river?", "Name an animal.",
    "What is fire?", "Why do leaves fall?", "What is a book?", "Describe a city.", "What is wind?",
    "Name a flower.", "What is sand?", "Why is the sun hot?", "What is a bee?", "Describe summer.",
    "What is paper?", "Name a tool.", "What is a moon?", "Why do birds sing?", "What is salt?",
    "Describe a forest.", "What is a wave?", "Name a sport.", "What is honey?", "Why is the sea salty?",
    "What is a map?", "Describe a storm.", "What is glass?",
]


def chat_prompt(question: str) -> str:
    """A short chat prompt in SmolLM2's template (no system turn: ~15 tokens)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# --- measuring -----------------------------------------------------------------------------


class _Sampler:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every, self.peak = pid, every, rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss(self.pid))


async def _one(url, pte, prompt, options, tau, t0):
    from device_runtime.client import run_session

    times = []
    result = await run_session(url, pte, prompt, options, tau=tau,
                               on_commit=lambda piece, sigma: times.append(time.perf_counter() - t0))
    return result, times


def _run_sessions(url, pte, n: int, options, tau, gateway_pid: int) -> dict:
    from spa.errors import SpaError

    prompts = [chat_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    rss_before = rss(gateway_pid)
    sampler = _Sampler(gateway_pid)

    async def main():
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[_one(url, pte, p, options, tau, t0) for p in prompts], return_exceptions=True)
        return outs, time.perf_counter() - t0

    outs, wall = asyncio.run(main())
    peak = sampler.stop()
    time.sleep(0.5)  # the gateway frees sessions as their connections close
    rss_after = rss(gateway_pid)
    done = [o for o in outs if not isinstance(o, BaseException)]
    errors = [str(o) for o in outs if isinstance(o, SpaError)]
    for o in outs:
        if isinstance(o, BaseException) and not isinstance(o, SpaError):
            raise o
    tokens = sum(len(r.tokens) for r, _ in done)
    gaps = [b - a for _, times in done for a, b in zip(times, times[1:])]
    gw = [r.stats["gateway"] for r, _ in done]
    steps = sum(g.get("decode_steps", 0) for g in gw)
    return {
        "sessions": n,
        "held": len(done),
        "errors": errors[:3],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "p95_itl_ms": None if not gaps else 1000 * percentile(gaps, 0.95),
        "p50_itl_ms": None if not gaps else 1000 * percentile(gaps, 0.5),
        "ttft_p50_s": statistics.median([t[0] for _, t in done if t]) if done else None,
        "gateway_rss_before_mib": rss_before / 2**20,
        "gateway_rss_peak_mib": peak / 2**20,
        "gateway_rss_after_mib": rss_after / 2**20,
        "decode_steps": steps,
        "batched_steps": sum(g.get("batched_steps", 0) for g in gw),
        "mean_batch": (sum(g.get("mean_batch", 1) * g.get("decode_steps", 0) for g in gw) / steps) if steps else None,
        "max_batch": max((g.get("max_batch", 1) for g in gw), default=None),
        "side_usage": (sum(sum(r.sigmas) for r, _ in done) / tokens) if tokens else None,
        "rollbacks": sum(r.stats["rollbacks"] for r, _ in done),
    }


def _cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def run_load_bench(*, sessions: list[int], plugin: str | None, max_new_tokens: int, window: int, codec: str,
                   tau: float | None, unbatched: bool, pin: bool, workdir: Path, log=print) -> dict:
    from spa.protocol.messages import Options
    from spa.pte import PtePlugin

    pte_path = ensure_plugin(plugin, workdir, log=log)
    pte = PtePlugin(pte_path)
    tau = pte.tau if tau is None else tau
    options = Options(window=window, codec=codec, max_new_tokens=max_new_tokens)
    counts = [1] + [n for n in sessions if n != 1]
    cpus = _cpus()
    gw_cpu = dev_cpus = None
    if pin and len(cpus) >= 2:
        gw_cpu, dev_cpus = cpus[-1], cpus[:-1]
        os.sched_setaffinity(0, dev_cpus)
    result = {"plugin": str(pte_path), "tau": tau, "max_new_tokens": max_new_tokens, "window": window, "codec": codec,
              "cpus": len(cpus), "gateway_cpu": gw_cpu, "device_cpus": dev_cpus, "rows": []}

    def gateway(*extra):
        return GatewayProcess("--max-sessions", str(max(counts)), "--resume-grace", "0", *extra,
                              prefix=pinned(gw_cpu))

    log(f"starting spa gateway (max {max(counts)} sessions"
        f"{'' if gw_cpu is None else f', pinned to CPU {gw_cpu}'})...")
    with gateway() as gw:
        log("warm-up session...")
        _run_sessions(gw.url, pte, 1, options, tau, gw.proc.pid)
        for n in counts:
            log(f"{n} concurrent session{'s' * (n > 1)}...")
            row = _run_sessions(gw.url, pte, n, options, tau, gw.proc.pid)
            row["batching"] = True
            result["rows"].append(row)
            log("  " + _line(row))
    if unbatched:
        n = max(counts)
        with gateway("--max-batch", "1") as gw:
            log(f"{n} concurrent sessions against a gateway with --max-batch 1 (no batching)...")
            _run_sessions(gw.url, pte, 1, options, tau, gw.proc.pid)
            row = _run_sessions(gw.url, pte, n, options, tau, gw.proc.pid)
            row["batching"] = False
            result["rows"].append(row)
            log("  " + _line(row))
    base = result["rows"][0]
    for row in result["rows"]:
        for key in ("tokens_per_s", "p95_itl_ms", "gateway_rss_peak_mib"):
            row[key + "_ratio"] = (row[key] / base[key]) if row[key] and base[key] else None
        row["gateway_rss_held_mib"] = row["gateway_rss_peak_mib"] - row["gateway_rss_before_mib"]
    return result


# --- printing -------------------------------------------------------------------------------


def _line(row: dict) -> str:
    return (f"{row['held']}/{row['sessions']} held, {fmt(row['tokens_per_s'], '.1f')} tokens/s, "
            f"p95 inter-token {fmt(row['p95_itl_ms'], '.0f')} ms, gateway peak RSS "
            f"{row['gateway_rss_peak_mib']:.0f} MiB, mean batch {fmt(row['mean_batch'], '.1f')}")


def format_load(result: dict) -> str:
    pin = ("gateway pinned to CPU %s, devices to CPU %s (taskset/sched_setaffinity) of %d"
           % (result["gateway_cpu"], ",".join(map(str, result["device_cpus"])), result["cpus"])
           if result["gateway_cpu"] is not None else f"not pinned ({result['cpus']} CPUs)")
    lines = [
        f"spa bench load: {result['max_new_tokens']} new tokens per session, W = {result['window']}, "
        f"{result['codec']}, tau {result['tau']:.3g}, plugin {result['plugin']}",
        f"cpu: {pin}; everything on loopback; ratios are against 1 session, same run",
        "",
        "| sessions | held | tokens/s (x) | p95 inter-token ms (x) | p50 ms | TTFT p50 s | gateway peak RSS MiB (x) "
        "| held by sessions MiB | after MiB | batched steps | mean batch | max batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        label = f"{r['sessions']}" + ("" if r["batching"] else " (no batching)")
        lines.append(
            f"| {label} | {r['held']} | {fmt(r['tokens_per_s'], '.1f')} ({fmt(r['tokens_per_s_ratio'], '.2f')}) "
            f"| {fmt(r['p95_itl_ms'], '.0f')} ({fmt(r['p95_itl_ms_ratio'], '.2f')}) | {fmt(r['p50_itl_ms'], '.0f')} "
            f"| {fmt(r['ttft_p50_s'], '.2f')} "
            f"| {r['gateway_rss_peak_mib']:.0f} ({fmt(r['gateway_rss_peak_mib_ratio'], '.2f')}) "
            f"| {r['gateway_rss_held_mib']:.0f} | {r['gateway_rss_after_mib']:.0f} "
            f"| {r['batched_steps']}/{r['decode_steps']} | {fmt(r['mean_batch'], '.1f')} | {fmt(r['max_batch'], 'd')} |")
        if r["errors"]:
            lines.append(f"  errors: {'; '.join(r['errors'])}")
    return "\n".join(lines)
