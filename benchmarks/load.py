"""`spa bench load`: many concurrent device sessions against one gateway.

One real gateway subprocess (`spa gateway`) and N device sessions
(`device_runtime.client.run_session`, the plugin run by the ExecuTorch
runtime) in this process, all on loopback; N = 1 first, then each requested
count, against the same gateway. Per N it prints: sessions held (completed
concurrently, none refused), tokens/s over all sessions, p95 inter-token
latency (time between a session's consecutive committed tokens), time to first
token, the gateway's peak memory (RSS sampled every 20 ms) and what remains
after the sessions end, and the batching the gateway reports in each `end`
(decode steps that shared a forward with other sessions, mean batch size) —
with ratios against N = 1, measured side by side in one run.

`--backbones` and `--dtypes` run each (backbone, dtype) configuration against
its own gateway side by side (a quick plugin trained per backbone; a bfloat16
gateway takes the same plugin as a float32 one: the identity is the float32
checkpoint's), `--repeats` times, interleaved; the table shows medians with
min-max, each row's tokens/s against the first configuration at the same
count, the gateway's RSS per extra session (peak at N minus peak at 1, over
N - 1), and two goals at the largest count: tokens/s >= 6x one session's, and
p95 time to first token <= 5 s when all sessions start together.

With 2+ CPUs the gateway is pinned to the last CPU and the devices to the
others (taskset / sched_setaffinity); the output says so.

`--replicas 1 2` runs the same counts against `spa serve` (Ray Serve) with
each number of replicas instead, side by side and `--repeats` times
interleaved (Ray places the replicas: no pinning; RSS is per replica, the
largest; each run's sessions per replica from the replicas' own counters;
ratios against the fewest replicas), and measures what a resume costs:
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
from spa.system.children import pinned

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


def chat_prompt(question: str, tokenizer=None) -> str:
    """A short chat prompt, one user turn and no system turn (~15 tokens), in `tokenizer`'s chat
    template (None: SmolLM2's, written out)."""
    if tokenizer is None or not tokenizer.chat_template:
        # SmolLM2's own template adds a default system turn (~20 tokens) when none is given;
        # left out so that every backbone's prompts are about as long (prefill cost is per token).
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def backbone_tokenizer(backbone: str | None):
    """The tokenizer whose chat template the prompts use: None for the default SmolLM2 (see
    `chat_prompt`), else the tokenizer of the backbone given as the gateway takes it (name or directory)."""
    from transformers import AutoTokenizer

    from spa.model.backbone import DEFAULT_NAME, backbone_dir

    if backbone in (None, DEFAULT_NAME):
        return None
    return AutoTokenizer.from_pretrained(backbone_dir(backbone))


def prompt_tokens(backbone: str | None, tokenizer, n: int = len(QUESTIONS)) -> float:
    """The mean length in tokens of the first n prompts (what a prefill costs)."""
    from transformers import AutoTokenizer

    from spa.model.backbone import backbone_dir

    counter = tokenizer or AutoTokenizer.from_pretrained(backbone_dir(backbone))
    prompts = [chat_prompt(q, tokenizer) for q in QUESTIONS[:n]]
    return sum(len(counter(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)


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


def _run_sessions(url, pte, n: int, options, tau, gateway_pid, tokenizer=None) -> dict:
    """n concurrent sessions; `gateway_pid`: the gateway's pid, or a list (replicas: RSS of the largest)."""
    from spa.errors import SpaError

    pids = gateway_pid if isinstance(gateway_pid, list) else [gateway_pid]
    prompts = [chat_prompt(QUESTIONS[i % len(QUESTIONS)], tokenizer) for i in range(n)]
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
    ttfts = [times[0] for _, times in done if times]
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
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 0.95) if ttfts else None,
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


GOAL_SPEEDUP, GOAL_TTFT_P95_S = 6.0, 5.0  # at the largest count: tokens/s vs 1 session; p95 first token


def run_load_bench(*, sessions: list[int], backbones: list[str | None], dtypes: list[str], plugin: str | None,
                   max_new_tokens: int, window: int, codec: str, tau: float | None, repeats: int, unbatched: bool,
                   pin: bool, workdir: Path, log=print) -> dict:
    """Each (backbone, dtype) configuration against its own gateway, the counts side by side, `repeats` times.

    The repeats are interleaved (every count of every configuration, then again)
    so that a slow minute on a shared machine does not land on one row.
    """
    from spa.errors import SpaError
    from spa.protocol.messages import Options
    from spa.model.pte_plugin import PtePlugin

    if plugin and len(backbones) > 1:
        raise SpaError("--plugin names one plugin, which belongs to one backbone; give one --backbones entry "
                       "with it, or leave --plugin out to train a quick plugin per backbone")
    counts = [1] + [n for n in sessions if n != 1]
    cpus = _cpus()
    gw_cpu = dev_cpus = None
    if pin and len(cpus) >= 2:
        gw_cpu, dev_cpus = cpus[-1], cpus[:-1]
        os.sched_setaffinity(0, dev_cpus)
    options = Options(window=window, codec=codec, max_new_tokens=max_new_tokens)
    result = {"max_new_tokens": max_new_tokens, "window": window, "codec": codec, "repeats": repeats,
              "cpus": len(cpus), "gateway_cpu": gw_cpu, "device_cpus": dev_cpus,
              "load_before": os.getloadavg(), "configs": []}
    configs = []
    for backbone in backbones:
        pte_path = ensure_plugin(plugin, workdir, backbone=backbone, log=log)
        pte = PtePlugin(pte_path)
        tokenizer = backbone_tokenizer(backbone)
        for dtype in dtypes:
            configs.append({"backbone": backbone or pte.config.backbone["name"], "dtype": dtype,
                            "plugin": str(pte_path), "tau": pte.tau if tau is None else tau, "runs": {},
                            "prompt_tokens": prompt_tokens(backbone, tokenizer),
                            "_pte": pte, "_tokenizer": tokenizer,
                            "_gateway": ("--max-sessions", str(max(counts)), "--resume-grace", "0",
                                         "--dtype", dtype, *(() if backbone is None else ("--backbone", backbone)))})
    for repeat in range(repeats):
        for config in configs:
            name = f"{config['backbone']} {config['dtype']}"
            log(f"[{repeat + 1}/{repeats}] {name}: starting spa gateway (max {max(counts)} sessions"
                f"{'' if gw_cpu is None else f', pinned to CPU {gw_cpu}'})...")
            variants = [("batched", ())] + ([("unbatched", ("--max-batch", "1"))] if unbatched else [])
            for label, extra in variants:
                with GatewayProcess(*config["_gateway"], *extra, prefix=pinned(gw_cpu)) as gw:
                    run = lambda n: _run_sessions(gw.url, config["_pte"], n, options, config["tau"],  # noqa: E731
                                                  gw.proc.pid, config["_tokenizer"])
                    run(1)  # warm-up
                    for n in (counts if label == "batched" else [max(counts)]):
                        row = run(n)
                        log(f"  {n} {label} session{'s' * (n > 1)}: " + _line(row))
                        config["runs"].setdefault(f"{label}:{n}", []).append(row)
    result["load_after"] = os.getloadavg()
    for config in configs:
        result["configs"].append(summarize_config(config, counts))
    compare_configs(result["configs"])
    return result


MEDIAN_KEYS = ("tokens_per_s", "p95_itl_ms", "p50_itl_ms", "ttft_p50_s", "ttft_p95_s", "gateway_rss_peak_mib",
               "gateway_rss_before_mib", "gateway_rss_after_mib", "mean_batch", "side_usage")


def median_row(runs: list[dict]) -> dict:
    """The repeats of one row: the median of each measure with its min-max, the fewest sessions held, step
    counts summed, the largest batch."""
    row = {"runs": runs, "held": min(r["held"] for r in runs), "errors": [e for r in runs for e in r["errors"]][:3]}
    for k in MEDIAN_KEYS:
        values = [r[k] for r in runs if r[k] is not None]
        row[k] = statistics.median(values) if values else None
        row[k + "_range"] = (min(values), max(values)) if values else None
    for k in ("decode_steps", "batched_steps", "rollbacks"):
        row[k] = sum(r[k] for r in runs)
    row["max_batch"] = max((r["max_batch"] or 1) for r in runs)
    return row


def summarize_config(config: dict, counts: list[int]) -> dict:
    """Median over repeats (with min-max) per count, ratios against 1 session, memory per session, goals."""
    rows = []
    for key, runs in config["runs"].items():
        label, n = key.split(":")
        rows.append({"sessions": int(n), "batching": label == "batched", **median_row(runs)})
    base = next(r for r in rows if r["sessions"] == 1 and r["batching"])
    for row in rows:
        for key in ("tokens_per_s", "p95_itl_ms", "gateway_rss_peak_mib"):
            row[key + "_ratio"] = (row[key] / base[key]) if row[key] and base[key] else None
        row["gateway_rss_held_mib"] = row["gateway_rss_peak_mib"] - row["gateway_rss_before_mib"]
        extra = row["sessions"] - 1
        row["rss_per_extra_session_mib"] = ((row["gateway_rss_peak_mib"] - base["gateway_rss_peak_mib"]) / extra
                                            if extra else None)
    top = next(r for r in rows if r["batching"] and r["sessions"] == max(counts))
    goals = []
    if top["sessions"] > 1:
        goals.append({"what": f"{top['sessions']} sessions >= {GOAL_SPEEDUP:g}x the tokens/s of 1 session",
                      "value": top["tokens_per_s_ratio"], "target": GOAL_SPEEDUP, "higher_is_better": True})
        goals.append({"what": f"p95 time to first token <= {GOAL_TTFT_P95_S:g} s when {top['sessions']} sessions "
                              f"start together", "value": top["ttft_p95_s"], "target": GOAL_TTFT_P95_S,
                      "higher_is_better": False})
    for goal in goals:
        v = goal["value"]
        goal["met"] = v is not None and (v >= goal["target"] if goal["higher_is_better"] else v <= goal["target"])
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "runs"} | {"rows": rows,
                                                                                          "goals": goals}


def compare_configs(configs: list[dict]) -> None:
    """Each configuration's tokens/s against the first configuration's at the same session count."""
    first = {(r["sessions"], r["batching"]): r for r in configs[0]["rows"]}
    for config in configs:
        for row in config["rows"]:
            other = first.get((row["sessions"], row["batching"]))
            row["tokens_per_s_vs_first"] = (row["tokens_per_s"] / other["tokens_per_s"]
                                            if other and other["tokens_per_s"] and row["tokens_per_s"] else None)


# --- replicas (spa serve) and the cost of a resume ----------------------------------------------


def run_replica_bench(*, replicas: list[int], sessions: list[int], plugin: str | None, max_new_tokens: int,
                      window: int, codec: str, tau: float | None, workdir: Path, repeats: int = 2,
                      resume_counts=(8, 32, 96), log=print) -> dict:
    """The same session counts against `spa serve --replicas R` for each R, `repeats` times interleaved
    (every R, then again), each row's sessions per replica from the replicas' own counters; then the
    cost of a resume."""
    from cloud_gateway.process import ServeProcess, replica_stats
    from spa.protocol.messages import Options
    from spa.model.pte_plugin import PtePlugin

    pte_path = ensure_plugin(plugin, workdir, log=log)
    pte = PtePlugin(pte_path)
    tau = pte.tau if tau is None else tau
    options = Options(window=window, codec=codec, max_new_tokens=max_new_tokens)
    cpus = len(_cpus())
    result = {"plugin": str(pte_path), "tau": tau, "max_new_tokens": max_new_tokens, "window": window,
              "codec": codec, "cpus": cpus, "repeats": repeats, "load_before": os.getloadavg()}
    runs = {}
    for repeat in range(repeats):
        for r in replicas:
            per = min(1.0, max(0.1, (cpus - 0.5) / r))  # leave room for Ray's proxy and the devices
            log(f"[{repeat + 1}/{repeats}] starting spa serve --replicas {r} ({per:.2g} CPU each)...")
            with ServeProcess("--replicas", str(r), "--replica-cpus", f"{per:.2g}", "--max-sessions",
                              str(max(sessions)), "--resume-grace", "0") as sp:
                before = replica_stats(sp.url, r)
                _run_sessions(sp.url, pte, 1, options, tau, sorted(before))  # warm-up
                for n in sessions:
                    log(f"  {n} concurrent sessions over {r} replica{'s' * (r > 1)}...")
                    before = replica_stats(sp.url, r)
                    row = _run_sessions(sp.url, pte, n, options, tau, sorted(before))
                    after = replica_stats(sp.url, r, fresh_after=time.time())
                    row["per_replica"] = sorted((after[p]["sessions"] - before[p]["sessions"]
                                                 for p in after if p in before), reverse=True)
                    runs.setdefault((r, n), []).append(row)
                    log("    " + _line(row) + ", sessions per replica " + "/".join(map(str, row["per_replica"])))
    result["load_after"] = os.getloadavg()
    result["replica_rows"] = replica_rows(runs)
    result["resume"] = measure_resume_cost(pte, resume_counts, workdir, log=log)
    return result


def replica_rows(runs: dict[tuple[int, int], list[dict]]) -> list[dict]:
    """(replicas, sessions) -> repeats, as rows of medians with min-max; tokens/s and p95 inter-token
    latency against the fewest replicas at the same session count (the baseline, run side by side)."""
    rows = [{"replicas": r, "sessions": n, **median_row(repeats)} for (r, n), repeats in sorted(runs.items())]
    fewest = min(r for r, _ in runs)
    base = {row["sessions"]: row for row in rows if row["replicas"] == fewest}
    for row in rows:
        for key in ("tokens_per_s", "p95_itl_ms"):
            b = base[row["sessions"]][key]
            row[key + "_vs_fewest"] = row[key] / b if row[key] and b else None
        row["per_replica"] = [run["per_replica"] for run in row["runs"]]
    return rows


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
    load = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    fewest = min(r["replicas"] for r in result["replica_rows"])
    lines = [
        f"spa bench load --replicas: {result['max_new_tokens']} new tokens per session, W = {result['window']}, "
        f"{result['codec']}, tau {result['tau']:.3g}, {result['cpus']} CPUs, Ray places the replicas (no pinning), "
        f"median of {result['repeats']} interleaved repeat(s) [min-max]",
        f"load average before {load(result['load_before'])}, after {load(result['load_after'])}; "
        f"(x): against {fewest} replica{'s' * (fewest > 1)} at the same session count",
        "",
        "| replicas | sessions | held | tokens/s (x) [min-max] | p95 inter-token ms (x) | TTFT p50 s "
        "| RSS per replica MiB (peak) | mean batch | sessions per replica, each run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["replica_rows"]:
        lo, hi = r["tokens_per_s_range"] or (None, None)
        lines.append(f"| {r['replicas']} | {r['sessions']} | {r['held']} "
                     f"| {fmt(r['tokens_per_s'], '.1f')} ({fmt(r['tokens_per_s_vs_fewest'], '.2f')}) "
                     f"[{fmt(lo, '.1f')}-{fmt(hi, '.1f')}] "
                     f"| {fmt(r['p95_itl_ms'], '.0f')} ({fmt(r['p95_itl_ms_vs_fewest'], '.2f')}) "
                     f"| {fmt(r['ttft_p50_s'], '.2f')} | {r['gateway_rss_peak_mib']:.0f} | {fmt(r['mean_batch'], '.1f')} "
                     f"| {', '.join('/'.join(map(str, split)) for split in r['per_replica'])} |")
        if r["errors"]:
            lines.append(f"  errors: {'; '.join(r['errors'])}")
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
    load = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    first = result["configs"][0]
    lines = [
        f"spa bench load: {result['max_new_tokens']} new tokens per session, W = {result['window']}, "
        f"{result['codec']}, median of {result['repeats']} interleaved repeat(s) [min-max]",
        f"cpu: {pin}; everything on loopback; load average before {load(result['load_before'])}, "
        f"after {load(result['load_after'])}",
        f"(x): against 1 session of the same configuration; (vs first): against {first['backbone']} "
        f"{first['dtype']} at the same count",
    ]
    for config in result["configs"]:
        lines += [
            "",
            f"### {config['backbone']} {config['dtype']} (plugin {config['plugin']}, tau {config['tau']:.3g}, "
            f"prompts {fmt(config.get('prompt_tokens'), '.1f')} tokens on average)",
            "",
            "| sessions | held | tokens/s (x) [min-max] | vs first | p95 inter-token ms (x) | TTFT p50 s | TTFT p95 s "
            "| gateway peak RSS MiB | per extra session MiB | after MiB | batched steps | mean batch | max batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in config["rows"]:
            label = f"{r['sessions']}" + ("" if r["batching"] else " (no batching)")
            lo, hi = r["tokens_per_s_range"] or (None, None)
            lines.append(
                f"| {label} | {r['held']} | {fmt(r['tokens_per_s'], '.1f')} ({fmt(r['tokens_per_s_ratio'], '.2f')}) "
                f"[{fmt(lo, '.1f')}-{fmt(hi, '.1f')}] | {fmt(r['tokens_per_s_vs_first'], '.2f')} "
                f"| {fmt(r['p95_itl_ms'], '.0f')} ({fmt(r['p95_itl_ms_ratio'], '.2f')}) "
                f"| {fmt(r['ttft_p50_s'], '.2f')} | {fmt(r['ttft_p95_s'], '.2f')} "
                f"| {r['gateway_rss_peak_mib']:.0f} | {fmt(r['rss_per_extra_session_mib'], '.2f')} "
                f"| {r['gateway_rss_after_mib']:.0f} | {r['batched_steps']}/{r['decode_steps']} "
                f"| {fmt(r['mean_batch'], '.1f')} | {fmt(r['max_batch'], 'd')} |")
            if r["errors"]:
                lines.append(f"  errors: {'; '.join(r['errors'])}")
        for goal in config["goals"]:
            v, t = goal["value"], goal["target"]
            verdict = "met" if goal["met"] else (
                "MISSED" + ("" if v is None else f" by {abs(v - t) / t:.1%}"))
            lines.append(f"goal: {goal['what']}: {fmt(v, '.2f')} -> {verdict}")
    return "\n".join(lines)


def plot_load(result: dict, path: Path) -> None:
    """tokens/s and p95 time to first token against concurrent sessions, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for config in result["configs"]:
        rows = sorted((r for r in config["rows"] if r["batching"]), key=lambda r: r["sessions"])
        xs = [r["sessions"] for r in rows]
        label = f"{config['backbone']} {config['dtype']}"
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=label)
        right.plot(xs, [r["ttft_p95_s"] for r in rows], marker="o", label=label)
    right.axhline(GOAL_TTFT_P95_S, color="#c44", linestyle="--", linewidth=1, label="goal")
    for ax, title in ((left, "tokens/s, all sessions (median)"), (right, "p95 time to first token, s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
