"""The device side of one `spa bench link` row, run as its own process on the device's side of the link.

    python -m benchmarks.device_worker JOB.json OUT.json

JOB: {"mode": "spa" | "stream" | "per_layer" | "cloud_plugin" | "device_only", "prompts": [...],
      "max_new_tokens": n, "url": ws://..., "token": auth, "pte": plugin .pte,
      "options": {window, codec, outliers}, "tau": float | null (spa, cloud_plugin), "rank": r,
      "max_in_flight": side outputs in flight (spa), "push_taps", "cloud_projection",
      "backbone_pte": path (device_only), "threads": ExecuTorch threads}
OUT: {"mode", "load_s", "docs": [{tokens, commit_s (seconds since the
      session started, one per token), ttft_s, bytes_down, bytes_up,
      handshake_down, handshake_up, round_trips, side_tokens, rollbacks}]}

Every row measures the same way: the clock starts before the connection is
opened (device-only: before tokenizing), a token counts when it is committed
(shown to the user), and bytes are websocket payload bytes (compressed
frames) after the handshake, each direction.
"""

import asyncio
import json
import sys
import time

import numpy as np


async def _spa(job, pte, prompt) -> dict:
    from device_runtime.client import run_session
    from spa.protocol.messages import Options

    o = job["options"]
    options = Options(window=o["window"], codec=o["codec"], outliers=o["outliers"],
                      max_new_tokens=job["max_new_tokens"], temperature=0.0, seed=0)
    times = []
    t0 = time.perf_counter()
    result = await run_session(job["url"], pte, prompt, options, tau=job.get("tau"), token=job.get("token", ""),
                               on_commit=lambda piece, sigma: times.append(time.perf_counter() - t0),
                               cloud_projection=job.get("cloud_projection", False),
                               push_taps=job.get("push_taps", False),
                               max_in_flight=job.get("max_in_flight", 1), settle=job.get("settle", False))
    s = result.stats
    return {"tokens": result.tokens, "sigmas": result.sigmas, "changed": result.changed, "commit_s": times,
            "ttft_s": times[0] if times else None,
            "bytes_down": s["bytes_down"], "bytes_up": s["bytes_up"], "handshake_down": s["handshake_bytes_down"],
            "handshake_up": s["handshake_bytes_up"], "round_trips": s["round_trips"], "side_tokens": s["side_tokens"],
            "rollbacks": s["rollbacks"], "messages_down": s["messages_down"], "messages_up": s["messages_up"],
            "settled": s["settled"]}


class _Adapter:
    """The device's share of a per-layer split: a rank-r adapter per layer (fixed random weights, small output)."""

    def __init__(self, layers: int, hidden: int, rank: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = [(rng.standard_normal((rank, hidden)) / np.sqrt(hidden)).astype(np.float32) for _ in range(layers)]
        self.b = [(rng.standard_normal((hidden, rank)) * 1e-3).astype(np.float32) for _ in range(layers)]

    def delta(self, layer: int, h: np.ndarray) -> np.ndarray:
        x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return (x @ self.a[layer - 1].T) @ self.b[layer - 1].T


async def _baseline(job, prompt, mode: str) -> dict:
    from websockets.asyncio.client import connect

    from spa.protocol import codec
    from spa.protocol.frames import FrameCodec

    frames = FrameCodec()
    opts = job.get("options") or {}
    scheme, outliers = opts.get("codec", "int8"), opts.get("outliers", 8)
    out = {"tokens": [], "commit_s": [], "bytes_down": 0, "bytes_up": 0, "handshake_down": 0, "handshake_up": 0,
           "prefill_down": 0, "prefill_up": 0, "round_trips": 0, "side_tokens": 0, "rollbacks": 0}
    t0 = time.perf_counter()
    async with connect(job["url"], compression=None, max_size=frames.max_frame_bytes, open_timeout=60) as conn:
        hello = {"type": "hello", "mode": mode, "prompt": prompt, "max_new_tokens": job["max_new_tokens"],
                 "codec": scheme, "outliers": outliers, "token": job.get("token", "")}
        if mode == "cloud_plugin":  # the plugin hosted in the cloud: the server reads the .pte from this path
            hello |= {"pte": job["pte"], "tau": job.get("tau")}
        hello = frames.pack(hello)
        out["handshake_up"] += len(hello)
        await conn.send(hello)
        data = await conn.recv()
        out["handshake_down"] += len(data)
        ready = frames.unpack(data)
        if ready.get("type") != "ready":
            raise RuntimeError(f"baseline server refused: {ready}")
        adapter = _Adapter(ready["num_layers"], ready["hidden_size"], job.get("rank", 16)) if mode == "per_layer" else None
        while True:
            data = await conn.recv()
            prefill = not out["tokens"]
            out["prefill_down" if prefill else "bytes_down"] += len(data)
            msg = frames.unpack(data)
            kind = msg.get("type")
            if kind == "token":
                out["commit_s"].append(time.perf_counter() - t0)
                out["tokens"].append(msg["token"])
                out["side_tokens"] += int(msg.get("sigma", 0))
            elif kind == "act":
                h = codec.decode(msg["h"])
                reply = frames.pack({"type": "delta", "layer": msg["layer"], "pos": msg["pos"],
                                     "d": codec.encode(adapter.delta(msg["layer"], h), scheme, outliers)})
                out["prefill_up" if prefill else "bytes_up"] += len(reply)
                out["round_trips"] += 1  # the prompt's pass yields the first token: L per token in all
                await conn.send(reply)
            elif kind == "end":
                break
            else:
                raise RuntimeError(f"baseline server: {msg}")
    out["ttft_s"] = out["commit_s"][0] if out["commit_s"] else None
    return out


def _device_only(job, prompts) -> tuple[float, list[dict]]:
    from transformers import AutoTokenizer

    from export.device_only import PteBackbone
    from spa.model.backbone import default_backbone_dir

    t = time.perf_counter()
    model = PteBackbone(job["backbone_pte"])
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_dir())
    eos = set(job.get("eos_ids", []))
    load_s = time.perf_counter() - t
    docs = []
    for prompt in prompts:
        times = []
        t0 = time.perf_counter()
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens = model.generate(ids, job["max_new_tokens"], eos, on_token=lambda _: times.append(time.perf_counter() - t0))
        docs.append({"tokens": tokens, "commit_s": times, "ttft_s": times[0], "bytes_down": 0, "bytes_up": 0,
                     "handshake_down": 0, "handshake_up": 0, "round_trips": 0, "side_tokens": 0, "rollbacks": 0,
                     "prompt_tokens": len(ids)})
    return load_s, docs


def run_job(job: dict) -> dict:
    from spa.model.pte_plugin import set_threads

    set_threads(job.get("threads"))
    mode, prompts = job["mode"], job["prompts"]
    t = time.perf_counter()
    if mode == "device_only":
        load_s, docs = _device_only(job, prompts)
        return {"mode": mode, "load_s": load_s, "docs": docs}
    pte = None
    if mode == "spa":
        from spa.model.pte_plugin import PtePlugin

        pte = PtePlugin(job["pte"])
    load_s = time.perf_counter() - t
    docs = []
    for prompt in prompts:
        if mode == "spa":
            docs.append(asyncio.run(_spa(job, pte, prompt)))
        else:
            docs.append(asyncio.run(_baseline(job, prompt, mode)))
    return {"mode": mode, "load_s": load_s, "docs": docs}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.device_worker JOB.json OUT.json", file=sys.stderr)
        return 2
    from spa.system.quiet import quiet_libraries

    quiet_libraries()
    with open(argv[0]) as f:
        job = json.load(f)
    result = run_job(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
