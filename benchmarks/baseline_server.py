"""A benchmark-only server for the three baselines the SPA gateway does not serve.

Same backbone, same step functions (`spa.model.generate`), same framing (one zstd
frame of one msgpack map per binary websocket message, `FrameCodec`), same
websockets settings and one compute thread, as `spa gateway` — so that rows
differ only in what the split sends and waits for.

* **stream** (the *cloud-only* row: no plugin at all): prefill, then greedy
  decoding with the backbone alone; every token is sent as soon as it is
  chosen (`token`: pos, token, piece). The device only displays text. No
  activation crosses the wire.
* **per_layer** (the paper's adapter/LoRA row: a personalization that lives
  *inside* the backbone's layers on the device): for every forward pass (the
  prompt's prefill, then each token) and every decoder layer l, the server
  sends that layer's output `h^l` (`act`: [T, H], the wire codec) and waits for
  the device's `delta` ([T, H]) which it adds before layer l + 1 (a hook on
  the model's own decoder layers: `Backbone.forward(..., layer_hook=...)`).
  One round trip per layer per token. The device really computes a rank-r adapter
  (`B @ A @ rms(h)`, fixed random weights scaled small) — a latency and
  bytes row, not a quality one.
* **cloud_plugin** (the *ceiling*: the plugin hosted in the cloud — the user
  uploads the whole side network and the server runs it beside the backbone:
  no privacy, no round trip): the hello names the plugin's `.pte` **by its
  path** (`pte`; the benchmark runs server and device on one machine, so a
  path stands in for the upload) and its threshold (`tau`, null: the
  plugin's own); the server loads it once with the ExecuTorch runtime
  (`spa.model.pte_plugin.PtePlugin`, one thread: the same program the device runs) and
  decides every position with the SPA step of the split
  (`spa.model.spa_rule.split_state`: gate on dequant(Q(f_t)), side on dequant(Q(T_t))
  where it opens, f_t + dequant(Q(s_t))) with the session's codec — the same
  tokens as the SPA rows and the in-process reference, greedy — then streams
  each token as `stream` does, with its sigma.

Messages (benchmark-only, not part of docs/PROTOCOL.md):

    device -> server  hello {mode, prompt, max_new_tokens, codec, outliers, token,
                             pte, tau}             (pte, tau: cloud_plugin only)
    server -> device  ready {prompt_tokens, num_layers, hidden_size}
    server -> device  act {layer, pos, h}          (per_layer only)
    device -> server  delta {layer, pos, d}        (per_layer only)
    server -> device  token {pos, token, piece[, sigma]}   (sigma: cloud_plugin only)
    server -> device  end {tokens, reason}

    python -m benchmarks.baseline_server --host H --port 0 [--token T]
"""

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from spa.protocol import codec
from spa.model.generate import choose_token, decode_one_token, finish_reason, generate, logit_margin, prefill
from spa.protocol.frames import FrameCodec
from spa.protocol.limits import Limits
from spa.model.pte_plugin import PtePlugin, executorch_runtime, set_threads
from spa.model.spa_rule import quantizing_wire, split_state
from spa.model.token_bytes import token_pieces

log = logging.getLogger("spa.bench.server")
LIMITS = Limits()
MODES = ("stream", "per_layer", "cloud_plugin")


class BaselineServer:
    def __init__(self, backbone, auth_token: str | None = None):
        self.backbone = backbone
        self.auth_token = auth_token
        self.pieces = token_pieces(backbone.tokenizer)
        self.eos = backbone.eos_token_ids
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-bench-compute")
        self.plugins: dict[tuple, PtePlugin] = {}  # cloud_plugin: loaded once per file (the upload is kept)
        cache, _ = prefill(backbone, backbone.encode("warm up the backbone"))  # pay torch's lazy init now
        decode_one_token(backbone, cache, 0)
        executorch_runtime()  # and the ExecuTorch runtime's import (seconds): not a cloud_plugin session's TTFT

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def handle(self, conn) -> None:
        frames = FrameCodec(LIMITS.max_frame_bytes, LIMITS.max_message_bytes)
        try:
            hello = frames.unpack(await conn.recv())
            if hello.get("type") != "hello" or hello.get("mode") not in MODES:
                raise ValueError(f"expected hello with mode {', '.join(MODES)}")
            if self.auth_token is not None and not hmac.compare_digest(
                    str(hello.get("token", "")).encode(), self.auth_token.encode()):
                raise ValueError("wrong auth token")
            max_new = int(hello["max_new_tokens"])
            ids = self.backbone.encode(hello["prompt"])
            if hello["mode"] == "stream":
                await self._stream(conn, frames, ids, max_new)
            elif hello["mode"] == "cloud_plugin":
                await self._cloud_plugin(conn, frames, ids, max_new, hello)
            else:
                await self._per_layer(conn, frames, ids, max_new, hello.get("codec", "int8"),
                                      int(hello.get("outliers", 8)))
        except ConnectionClosed:
            pass
        except Exception as exc:  # benchmark tool: report and close this connection only
            log.warning("baseline session failed: %s", exc)
            try:
                await conn.send(frames.pack({"type": "error", "code": "internal", "message": str(exc)[:4000]}))
                await conn.close(1011)
            except ConnectionClosed:
                pass

    async def _stream(self, conn, frames, ids, max_new) -> None:
        def choose(st, p) -> tuple[int, dict]:  # the backbone alone, greedy
            return choose_token(self.backbone.logits(st[-1]), 0.0, 0, p), {}

        await self._generate(conn, frames, ids, max_new, choose)

    async def _generate(self, conn, frames, ids, max_new, choose) -> None:
        """The generation loop (`spa.model.generate.generate`) a position at a time on the compute
        thread: per position `choose(states, pos)` -> (token, further fields of its `token` message),
        each token sent at once; `end` after EOS or max_new tokens."""
        extras = []

        def pick(pos, states):
            token, extra = choose(states[0], pos)
            extras.append(extra)
            return [token]

        steps = generate(self.backbone, ids, pick, max_new)
        tokens = []
        while (step := await self.run(next, steps, None)) is not None:  # the first one prefills
            if not tokens:
                await conn.send(frames.pack(self._ready(ids)))
            pos, _, (token,) = step
            tokens.append(token)
            await conn.send(frames.pack({"type": "token", "pos": pos, "token": token, "piece": self.pieces[token],
                                         **extras[-1]}))
        await conn.send(frames.pack({"type": "end", "tokens": len(tokens),
                                     "reason": finish_reason(tokens, self.eos)}))
        await conn.close()

    def _plugin(self, path: str) -> PtePlugin:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        if key not in self.plugins:
            set_threads(1)  # one compute thread, like the device's ExecuTorch in the link benchmark
            self.plugins[key] = PtePlugin(path)
        return self.plugins[key]

    async def _cloud_plugin(self, conn, frames, ids, max_new, hello) -> None:
        bb = self.backbone
        if not isinstance(hello.get("pte"), str):
            raise ValueError("cloud_plugin: the hello needs pte, the plugin's .pte path on this machine")
        plugin = await self.run(self._plugin, hello["pte"])
        if plugin.config.combination != "add":
            raise ValueError(f"{plugin.path}: only additive plugins run as SPA")
        tau = plugin.tau if hello.get("tau") is None else float(hello["tau"])
        wire = quantizing_wire(hello.get("codec", "int8"), int(hello.get("outliers", 8)))

        def choose(st, p) -> tuple[int, dict]:  # the SPA step of one position, then greedy
            margin = logit_margin(bb.logits(st[-1])) if plugin.config.gate_margin else None
            decision, x = split_state(plugin, st, tau, wire, margin=margin)
            return choose_token(bb.logits(x), 0.0, 0, p), {"sigma": int(decision.sigma)}

        await self._generate(conn, frames, ids, max_new, choose)

    async def _per_layer(self, conn, frames, ids, max_new, scheme, outliers) -> None:
        bb, loop = self.backbone, asyncio.get_running_loop()
        cache = bb.new_cache()
        await conn.send(frames.pack(self._ready(ids)))
        feed, pos, n = ids, 0, 0

        async def exchange(layer: int, h) -> torch.Tensor:  # on the event loop
            await conn.send(frames.pack({"type": "act", "layer": layer, "pos": pos,
                                         "h": codec.encode(h, scheme, outliers)}))
            reply = frames.unpack(await conn.recv())
            if reply.get("type") != "delta" or reply.get("layer") != layer:
                raise ValueError(f"expected delta for layer {layer}, got {reply.get('type')}")
            return torch.from_numpy(codec.decode(reply["d"]))[None]

        def add_device_delta(layer: int, h: torch.Tensor) -> torch.Tensor:
            # Called by the backbone between decoder layers l and l + 1 (a hook on the model's own
            # layer): wait for the device's delta for h^l and let layer l + 1 read h^l + delta.
            delta = asyncio.run_coroutine_threadsafe(
                exchange(layer, h[0].to("cpu", torch.float32).numpy()), loop).result()
            return h + delta.to(h.device, h.dtype)

        while True:
            # The forward waits on the network between layers: it runs on a thread of its own, not on
            # the compute thread that the stream sessions share.
            states = await loop.run_in_executor(None, lambda: bb.forward(
                torch.tensor([feed]), cache, last_only=True, layer_hook=add_device_delta))
            last = pos + len(feed) - 1
            token = await self.run(lambda: choose_token(bb.logits(states[0, -1, -1]), 0.0, 0, last))
            n += 1
            await conn.send(frames.pack({"type": "token", "pos": last, "token": token, "piece": self.pieces[token]}))
            if token in self.eos or n >= max_new:
                await conn.send(frames.pack({"type": "end", "tokens": n, "reason": "eos" if token in self.eos
                                             else "max_tokens"}))
                await conn.close()
                return
            pos, feed = last + 1, [token]

    def _ready(self, ids) -> dict:
        return {"type": "ready", "prompt_tokens": len(ids), "num_layers": self.backbone.num_layers,
                "hidden_size": self.backbone.hidden_size}


async def _main(host: str, port: int, token: str | None) -> None:
    from spa.model.backbone import load_backbone

    server = BaselineServer(load_backbone(), token)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(server.handle, host, port, compression=None, max_size=LIMITS.max_frame_bytes,
                     max_queue=16, ping_interval=None) as ws:
        bound = ws.sockets[0].getsockname()
        print(f"spa baseline server: cloud-only stream, per-layer split and plugin in the cloud on ws://{bound[0]}:{bound[1]} "
              f"(pid {os.getpid()})", flush=True)
        await stop
    server.thread.shutdown(wait=False, cancel_futures=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", default=os.environ.get("SPA_GATEWAY_TOKEN") or None)
    args = ap.parse_args(argv)
    from spa.system.quiet import quiet_libraries

    quiet_libraries()
    asyncio.run(_main(args.host, args.port, args.token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
