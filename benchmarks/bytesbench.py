"""`spa bench bytes`: the ways to fewer bytes per token, each beside its effect on the tokens.

One in-process loop per configuration, with the gateway's step functions and
the device's `.pte` (as `spa.model.reference`), building the very protocol messages
the split would send for each position and packing them with the wire's
`FrameCodec` (msgpack + zstd at the given level):

    down: step (f_t, draft) every token; taps + verdict for sigma = 1 tokens
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
* the cloud-side projection (`spa summarize --cloud-projection`): the gateway
  applies the side network's per-tap projections and sends r values per tap
  instead of H; rows "int8+proj" and "int4+proj", with the one-off upload of
  the weights (hello) beside them.

Agreement = share of generated positions whose token equals the f32 run's
token at the same position (per plugin).
"""

import time
from pathlib import Path

import torch

from spa.protocol import codec
from spa.model.generate import choose_token, generate, logit_margin
from spa.protocol import messages as m
from spa.protocol.frames import FrameCodec
from spa.model.spa_rule import split_state

# (codec, outlier channels, cloud-side projection); the first is the reference.
WAYS = (("f32", 0, False), ("int8", 8, False), ("int4", 8, False), ("int8", 0, False), ("int4", 0, False),
        ("int8", 8, True), ("int4", 8, True))


def trajectory(backbone, pte, prompt: str, *, tau: float, max_new_tokens: int, scheme: str, outliers: int,
               pieces, projection: tuple | None = None) -> dict:
    """Tokens and the protocol messages (as dicts) of one lock-step generation;
    `projection`: (weight, bias) for the cloud-side projection, or None."""
    tokens, sigmas, down, up = [], [], [], []
    run_open = False

    def choose(pos, states):
        nonlocal run_open
        states = states[0]
        base = backbone.logits(states[-1])
        draft = int(torch.argmax(base))
        margin = logit_margin(base) if pte.config.gate_margin else None
        sent = {}  # what crossed the wire at this position, encoded: "f", "taps", "s"

        def wire(x, what):
            sent[what] = codec.encode(x, scheme, outliers)
            return codec.decode(sent[what])

        decision, x = split_state(pte, states, tau, wire, projection, margin)
        down.append(m.Step(epoch=0, pos=pos, f=sent["f"], draft=draft, piece=pieces[draft], margin=margin).to_dict())
        if not decision.sigma:
            run_open = True
            sigmas.append(0)
            return [draft]
        if run_open:
            up.append(m.Accept(epoch=0, upto=pos - 1).to_dict())
            run_open = False
        up.append(m.NeedTaps(epoch=0, pos=pos).to_dict())
        down.append(m.Taps(epoch=0, pos=pos, taps=sent["taps"]).to_dict())
        up.append(m.Side(epoch=0, pos=pos, s=sent["s"]).to_dict())
        token = choose_token(backbone.logits(x), 0.0, 0, pos)
        down.append(m.Verdict(epoch=0, pos=pos, token=token, piece=pieces[token], changed=token != draft).to_dict())
        sigmas.append(1)
        return [token]

    for pos, _, chosen in generate(backbone, backbone.encode(prompt), choose, max_new_tokens):
        tokens += chosen
    if run_open:
        up.append(m.Accept(epoch=0, upto=pos).to_dict())
    return {"tokens": tokens, "sigmas": sigmas, "down": down, "up": up}


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
