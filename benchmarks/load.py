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

`--replicas 1 2` runs the same counts against `spa serve` (Ray Serve) with
each number of replicas instead, side by side (Ray places the replicas: no
pinning; RSS is per replica, the largest), and measures what a resume costs:
two `spa gateway` processes sharing a resume secret, a session cut after k
committed tokens on the first and resumed on the second, which rebuilds it
(prefill + k - 1 one-token steps); the time to `resumed`, against a new
session's time to `ready`, per committed token.
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


def _run_sessions(url, pte, n: int, options, tau, gateway_pid) -> dict:
    """n concurrent sessions; `gateway_pid`: the gateway's pid, or a list (replicas: RSS of the largest)."""
    from spa.errors import SpaError

    pids = gateway_pid if isinstance(gateway_pid, list) else [gateway_pid]
    prompts = [chat_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    rss_before = max(rss(p) for p in pids)
    samplers = [_Sampler(p) for p in pids]

    async def main():
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[_one(url, pte, p, options, tau, t0) for p in prompts], return_exceptions=True)
        return outs, time.perf_counter() - t0

    outs, wall = asyncio.run(main())
    peak = max(sampler.stop() for sampler in samplers)
    time.sleep(0.5)  # the gateway frees sessions as their connections close
    rss_after = max(rss(p) for p in pids)
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


# --- replicas (spa serve) and the cost of a resume ----------------------------------------------


def _replica_pids(url: str, replicas: int, tries: int = 100) -> list[int]:
    """The pids of the deployment's replicas, from GET /stats (routed like any request)."""
    import json
    import urllib.request

    seen = set()
    for _ in range(tries):
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/stats", timeout=30) as r:
            seen.add(json.load(r)["pid"])
        if len(seen) >= replicas:
            break
    return sorted(seen)


def run_replica_bench(*, replicas: list[int], sessions: list[int], plugin: str | None, max_new_tokens: int,
                      window: int, codec: str, tau: float | None, workdir: Path, resume_counts=(8, 32, 96),
                      log=print) -> dict:
    """The same session counts against `spa serve --replicas R` for each R, then the cost of a resume."""
    from cloud_gateway.process import ServeProcess
    from spa.protocol.messages import Options
    from spa.pte import PtePlugin

    pte_path = ensure_plugin(plugin, workdir, log=log)
    pte = PtePlugin(pte_path)
    tau = pte.tau if tau is None else tau
    options = Options(window=window, codec=codec, max_new_tokens=max_new_tokens)
    cpus = len(_cpus())
    result = {"plugin": str(pte_path), "tau": tau, "max_new_tokens": max_new_tokens, "window": window,
              "codec": codec, "cpus": cpus, "replica_rows": []}
    for r in replicas:
        per = min(1.0, max(0.1, (cpus - 0.5) / r))  # leave room for Ray's proxy and the devices
        log(f"starting spa serve --replicas {r} ({per:.2g} CPU each)...")
        with ServeProcess("--replicas", str(r), "--replica-cpus", f"{per:.2g}", "--max-sessions",
                          str(max(sessions)), "--resume-grace", "0") as sp:
            pids = _replica_pids(sp.url, r)
            _run_sessions(sp.url, pte, 1, options, tau, pids)  # warm-up
            for n in sessions:
                log(f"  {n} concurrent sessions over {r} replica{'s' * (r > 1)}...")
                row = _run_sessions(sp.url, pte, n, options, tau, pids)
                row["replicas"] = r
                result["replica_rows"].append(row)
                log("    " + _line(row))
    result["resume"] = measure_resume_cost(pte, resume_counts, workdir, log=log)
    return result


def measure_resume_cost(pte, counts, workdir: Path, log=print) -> dict:
    """Time for a gateway that does not hold a session to rebuild it, per committed token."""
    import secrets as _secrets

    from cloud_gateway.process import GatewayProcess

    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "resume-bench.secret"
    secret.write_text(_secrets.token_hex(32))
    args = ("--resume-grace", "60", "--resume-secret-file", secret, "--max-new-tokens", str(max(counts) + 64))
    prompt = chat_prompt("Count from 1 to 500, separated by commas.")
    rows = []
    log("resume cost: two spa gateway processes sharing a resume secret...")
    with GatewayProcess(*args) as a, GatewayProcess(*args) as b:
        ready_s = asyncio.run(_time_to_ready(b.url, pte, prompt))
        for k in counts:
            hello = asyncio.run(_cut_after(a.url, pte, prompt, k, max(counts) + 64))
            seconds = asyncio.run(_time_to_resumed(b.url, hello))
            rows.append({"committed": k, "resume_s": seconds})
            log(f"  {k} committed tokens: resumed on the other gateway after {seconds:.2f} s "
                f"(a new session's ready: {ready_s:.2f} s)")
    ks = [r["committed"] for r in rows]
    ts = [r["resume_s"] for r in rows]
    mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / max(sum((k - mean_k) ** 2 for k in ks), 1e-9)
    return {"ready_s": ready_s, "rows": rows, "rebuild_ms_per_token": 1000 * slope}


def _plugin_of(pte):
    from spa.protocol import messages as m

    return m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)


async def _time_to_ready(url, pte, prompt) -> float:
    from websockets.asyncio.client import connect

    from spa.protocol import messages as m
    from spa.protocol.frames import FrameCodec

    frames = FrameCodec()
    async with connect(url, compression=None) as conn:
        t0 = time.perf_counter()
        await conn.send(frames.pack(m.Hello("", _plugin_of(pte), prompt, m.Options(max_new_tokens=8)).to_dict()))
        await conn.recv()
        seconds = time.perf_counter() - t0
        await conn.send(frames.pack(m.Bye().to_dict()))
    return seconds


async def _cut_after(url, pte, prompt, k: int, max_new: int) -> dict:
    """A gate-closed session until k tokens are committed, then the TCP connection reset: its resume hello."""
    from websockets.asyncio.client import connect

    from spa.protocol import messages as m
    from spa.protocol.device import DeviceProtocol, RunGate
    from spa.protocol.frames import FrameCodec

    frames = FrameCodec()
    dp = DeviceProtocol(m.Hello("", _plugin_of(pte), prompt, m.Options(window=4, max_new_tokens=max_new)))
    conn = await connect(url, compression=None)
    await conn.send(frames.pack(dp.hello_message()))
    while len(dp.committed) < k:
        dp.receive(frames.unpack(await conn.recv()))
        while isinstance(action := dp.next_action(), RunGate):
            dp.gated(action.pos, False)
        for msg in dp.flush():
            await conn.send(frames.pack(msg))
    conn.transport.abort()
    return dp.resume_hello()


async def _time_to_resumed(url, hello: dict) -> float:
    from websockets.asyncio.client import connect

    from spa.protocol.frames import FrameCodec

    frames = FrameCodec()
    async with connect(url, compression=None) as conn:
        t0 = time.perf_counter()
        await conn.send(frames.pack(hello))
        msg = frames.unpack(await conn.recv())
        seconds = time.perf_counter() - t0
        if msg.get("type") != "resumed":
            raise RuntimeError(f"the resume was refused: {msg}")
        await conn.send(frames.pack({"type": "bye"}))
    return seconds


def format_replicas(result: dict) -> str:
    lines = [
        f"spa bench load --replicas: {result['max_new_tokens']} new tokens per session, W = {result['window']}, "
        f"{result['codec']}, tau {result['tau']:.3g}, {result['cpus']} CPUs, Ray places the replicas (no pinning)",
        "",
        "| replicas | sessions | held | tokens/s | p95 inter-token ms | TTFT p50 s | RSS per replica MiB (peak) "
        "| mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["replica_rows"]:
        lines.append(f"| {r['replicas']} | {r['sessions']} | {r['held']} | {fmt(r['tokens_per_s'], '.1f')} "
                     f"| {fmt(r['p95_itl_ms'], '.0f')} | {fmt(r['ttft_p50_s'], '.2f')} "
                     f"| {r['gateway_rss_peak_mib']:.0f} | {fmt(r['mean_batch'], '.1f')} |")
    res = result["resume"]
    lines += ["", f"resume on a gateway that does not hold the session (rebuild): a new session's ready "
                  f"{res['ready_s']:.2f} s; " + ", ".join(f"{r['committed']} tokens {r['resume_s']:.2f} s"
                                                         for r in res["rows"])
              + f"; {res['rebuild_ms_per_token']:.1f} ms per committed token"]
    return "\n".join(lines)


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
