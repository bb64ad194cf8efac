"""`spa bench bytes`: the ways to fewer bytes per token, each beside its effect on the tokens.

One lock-step session per configuration with both protocol machines in this
process (spa/protocol/loopback.py: the gateway's step functions on the real
backbone, the device's `.pte`), whose messages are packed with the wire's
`FrameCodec` (msgpack + zstd at the given level):

    down: step (f_t, draft) every token; taps + verdict for sigma = 1 tokens; end
    up:   need_taps + side for sigma = 1 tokens; one accept per run of sigma = 0 tokens

That is the lock-step message set (draft-ahead adds the drafts a rollback
discards; `spa bench link` measures those). Sizes are compressed websocket
payloads, as `spa summarize` counts them.

Ways down, measured:
* codec: int8 / int4 with 8 fp16 outlier channels per row, without outliers,
  and f32 (the reference every other codec is compared with);
* zstd level (lossless: the tokens cannot change, only bytes and CPU time);
* fewer taps: quick plugins tapping every k-th layer (`spa train --tap-every k`),
  compared with their own f32 run, and with their validation loss beside;
* the cloud-side projection (`spa summarize`'s default): the gateway
  applies the side network's per-tap projections and sends r values per tap
  instead of H; rows "int8+proj" and "int4+proj", with the one-off upload of
  the weights (hello) beside them.

Agreement = share of generated positions whose token equals the f32 run's
token at the same position (per plugin).
"""

import time
from pathlib import Path


from spa.model.backbone_lines import BackboneLines
from spa.model.spa_rule import gate_input
from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.frames import FrameCodec
from spa.protocol.gateway import GatewayProtocol
from spa.protocol.loopback import DeviceHost, GatewayHost, Loopback

# (codec, outlier channels, cloud-side projection); the first is the reference.
WAYS = (("f32", 0, False), ("int8", 8, False), ("int4", 8, False), ("int8", 0, False), ("int4", 0, False),
        ("int8", 8, True), ("int4", 8, True))


def trajectory(backbone, pte, prompt: str, *, tau: float, max_new_tokens: int, scheme: str, outliers: int,
               pieces, projection: tuple | None = None) -> dict:
    """Tokens and the protocol messages (as maps) of one lock-step session, both protocol machines
    driven in this process (spa/protocol/loopback.py) with the real backbone and `.pte`;
    `projection`: (weight, bias) for the cloud-side projection, or None. The messages are those
    after the handshake (docs/PROTOCOL.md §10)."""
    upload = None
    if projection is not None:
        upload = m.Projection(projection[0].shape[1], projection[0].astype("<f2").tobytes(),
                              projection[1].astype("<f4").tobytes())
    config = pte.config
    hello = m.Hello("", m.Plugin(backbone.identity.fingerprint, tuple(config.taps), pte.content_hash), prompt,
                    m.Options(window=0, codec=scheme, outliers=outliers, max_new_tokens=max_new_tokens,
                              gate_margin=config.gate_margin), projection=upload)
    gateway = GatewayHost(GatewayProtocol(backbone.wire_info, backbone.eos_token_ids),
                          BackboneLines(backbone, prompt, pieces, config.taps, projection=projection))
    device = DeviceHost(DeviceProtocol(hello),
                        lambda pos, f, margin: pte.gate(gate_input(pte, f, margin)) > tau,
                        lambda pos, taps, projected: (pte.side_projected if projected else pte.side)(taps)[None])
    pair = Loopback(gateway, device, frames=None)
    pair.run()
    committed = device.proto.committed
    sent = [(way, d) for way, d, _ in pair.sent if d["type"] not in ("hello", "ready")]
    return {"tokens": [c.token for c in committed], "sigmas": [int(c.sigma) for c in committed],
            "down": [d for way, d in sent if way == "down"], "up": [d for way, d in sent if way == "up"]}


def packed_sizes(runs: list[dict], level: int) -> dict:
    frames = FrameCodec(level=level)
    n = sum(len(r["tokens"]) for r in runs)
    t = time.perf_counter()
    down = sum(len(frames.pack(msg)) for r in runs for msg in r["down"])
    up = sum(len(frames.pack(msg)) for r in runs for msg in r["up"])
    pack_s = time.perf_counter() - t
    by_type: dict[str, int] = {}
    for r in runs:
        for msg in r["down"]:
            by_type[msg["type"]] = by_type.get(msg["type"], 0) + len(frames.pack(msg))
    return {"down_per_token": down / n, "up_per_token": up / n, "per_token": (down + up) / n,
            "down_by_type_per_token": {k: v / n for k, v in by_type.items()},
            "pack_us_per_message": pack_s / max(sum(len(r["down"]) + len(r["up"]) for r in runs), 1) * 1e6}


def agreement(runs: list[dict], reference: list[dict]) -> float:
    same = total = 0
    for r, ref in zip(runs, reference):
        for i, token in enumerate(ref["tokens"]):
            total += 1
            same += i < len(r["tokens"]) and r["tokens"][i] == token
    return same / total if total else 1.0


def run_bytes_bench(*, plugin: str | None, docs: list[str], max_new_tokens: int = 32, tap_every=(3, 5),
                    levels=(1, 3, 9, 19), workdir: Path = Path("runs/bench"), tau: float | None = None,
                    skip_cost: float = 0.3, backbone=None, log=print) -> dict:
    from benchmarks.provision import ensure_plugin, plugin_prompts
    from spa.model.backbone import load_backbone
    from spa.model.plugin import read_config
    from spa.model.pte_plugin import PtePlugin
    from spa.model.token_bytes import token_pieces

    plugins = [("all taps", ensure_plugin(plugin, workdir, skip_cost=skip_cost, log=log))]
    for k in tap_every or ():
        plugins.append((f"taps every {k} layers", ensure_plugin(None, workdir, tap_every=k, skip_cost=skip_cost,
                                                                  log=log)))
    if backbone is None:
        log("loading the backbone...")
        backbone = load_backbone()
    pieces = token_pieces(backbone.tokenizer)
    result = {"docs": docs, "max_new_tokens": max_new_tokens, "levels": list(levels), "plugins": []}
    for label, pte_path in plugins:
        pte = PtePlugin(pte_path)
        config, _ = read_config(pte_path.parent)
        threshold = pte.tau if tau is None else tau
        prompts = plugin_prompts(pte_path, docs)
        val = (config.training.get("metrics") or {}).get("val", {}) if isinstance(config.training, dict) else {}
        entry = {"label": label, "pte": str(pte_path), "taps": len(config.taps), "tau": threshold,
                 "val_loss_gated": val.get("loss_gated"), "val_loss_backbone": val.get("loss_backbone"),
                 "rows": []}
        reference = None
        weights = pte.projection_weights()
        upload = m.Projection(weights[0].shape[1], weights[0].astype("<f2").tobytes(),
                              weights[1].astype("<f4").tobytes())
        for scheme, outliers, projected in WAYS:
            log(f"{label} ({len(config.taps)} taps): codec {scheme}, {outliers} outliers"
                f"{', cloud-side projection' if projected else ''}...")
            runs = [trajectory(backbone, pte, prompt, tau=threshold, max_new_tokens=max_new_tokens, scheme=scheme,
                               outliers=outliers, pieces=pieces, projection=weights if projected else None)
                    for prompt in prompts]
            if reference is None:
                reference = runs
            n = sum(len(r["tokens"]) for r in runs)
            row = {"codec": scheme, "outliers": outliers, "cloud_projection": projected, "tokens": n,
                   "side_usage": sum(sum(r["sigmas"]) for r in runs) / n,
                   "agreement_with_f32": agreement(runs, reference),
                   "sizes": {str(level): packed_sizes(runs, level) for level in levels}}
            if projected:  # once per session, in the hello
                row["upload_bytes"] = len(FrameCodec().pack({"projection": upload.to_dict()}))
            entry["rows"].append(row)
        result["plugins"].append(entry)
    return result


def format_bytes(result: dict) -> str:
    levels = result["levels"]
    lines = [f"spa bench bytes: {len(result['docs'])} docs, {result['max_new_tokens']} new tokens, lock-step message set; "
             f"bytes per token = compressed websocket payload (msgpack + zstd), down/up"]
    head = f"{'plugin':22} {'taps':>4} {'val loss':>8} {'codec':>9} {'outl':>4} {'side':>5} {'=f32':>6} " + " ".join(
        f"{'zstd ' + str(lv) + ' down/up':>17}" for lv in levels)
    lines += [head, "-" * len(head)]
    for p in result["plugins"]:
        loss = "-" if p["val_loss_gated"] is None else f"{p['val_loss_gated']:.3f}"
        for r in p["rows"]:
            sizes = " ".join(f"{r['sizes'][str(lv)]['down_per_token']:>9.0f}/{r['sizes'][str(lv)]['up_per_token']:<7.0f}"
                             for lv in levels)
            way = r["codec"] + ("+proj" if r.get("cloud_projection") else "")
            lines.append(f"{p['label']:22} {p['taps']:>4} {loss:>8} {way:>9} {r['outliers']:>4} "
                         f"{r['side_usage']:>5.0%} {r['agreement_with_f32']:>6.0%} {sizes}")
    lines.append("=f32: share of tokens identical to the same plugin's f32-codec run at the same position. "
                 "zstd levels are lossless: same tokens, fewer bytes, more CPU. "
                 "+proj: cloud-side projection (r values per tap instead of H); its one-off upload of the weights: "
                 + ", ".join(sorted({f"{r['upload_bytes'] / 1e6:.2f} MB ({p['taps']} taps)" for p in result["plugins"]
                                     for r in p["rows"] if "upload_bytes" in r})) + ". "
                 "val loss: the plugin's gated validation loss at its tau (quick plugins: 8 val papers).")
    return "\n".join(lines)
