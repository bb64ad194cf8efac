"""`spa bench settle`: how many side tokens the device settles, and the bytes each way, per plugin.

    spa bench settle --plugins runs/full/*-pte/plugin-fp32.pte --docs 10 --max-new-tokens 64

For each plugin and ACLSum test paper, one session with both protocol machines in this process
(spa/protocol/loopback.py: the real backbone, the real `.pte`, the device's copy of the output
head), greedy, W = 8, 4 in flight, pushed taps and the cloud-side projection, once settling and
once with verdicts only. It reports the share of side tokens settled on the device (the proof
held), the bytes of side output that went up for settled tokens (none: a settled position sends
no `side`), the bytes per token both ways against the verdict-only run, and whether both runs
committed the in-process reference's tokens. No network and no timing: what it counts does not
depend on the link or the machine's load.
"""

import random
from pathlib import Path


def session(backbone, pte, head, prompt: str, pieces, max_new: int, settle: bool) -> dict:
    from device_runtime.client import upload_gate, upload_projection
    from spa.model.backbone_lines import BackboneLines
    from spa.model.cloud_gate import gate_probability
    from spa.model.spa_rule import gate_input
    from spa.protocol import messages as m
    from spa.protocol.device import DeviceProtocol
    from spa.protocol.frames import FrameCodec
    from spa.protocol.gateway import GatewayProtocol
    from spa.protocol.loopback import DeviceHost, GatewayHost, Loopback

    opts = m.Options(window=8, max_new_tokens=max_new, settle=settle, gate_margin=pte.config.gate_margin)
    hello = m.Hello("", m.Plugin(backbone.identity.fingerprint, tuple(pte.config.taps), pte.content_hash), prompt,
                    opts, projection=upload_projection(pte), gate=upload_gate(pte, pte.tau))
    proto = GatewayProtocol(backbone.wire_info, backbone.eos_token_ids, settle=True, pieces=pieces,
                            predict_gate=gate_probability)
    model = BackboneLines(backbone, prompt, pieces, pte.config.taps, projection=pte.projection_weights())

    def head_of(pos, f, s):
        token = head.certify(f, s).token
        return token, pieces[token] if token is not None else b""

    device = DeviceHost(DeviceProtocol(hello, 4),
                        lambda pos, f, margin: pte.gate(gate_input(pte, f, margin)) > pte.tau,
                        lambda pos, taps, projected: (pte.side_projected if projected else pte.side)(taps)[None],
                        head_of)
    pair = Loopback(GatewayHost(proto, model), device, frames=FrameCodec())
    pair.run(random.Random(0))  # any interleaving commits the same tokens; sizes are per message
    after = [(way, d, size) for way, d, size in pair.sent if d["type"] not in ("hello", "ready")]
    dp = device.proto
    return {"tokens": [c.token for c in dp.committed], "side_tokens": sum(bool(c.sigma) for c in dp.committed),
            "settled": dp.end.stats["settled"], "heads": dp.end.stats["heads"],
            "bytes_down": sum(size for way, _, size in after if way == "down"),
            "bytes_up": sum(size for way, _, size in after if way == "up"),
            "side_bytes_up": sum(size for way, d, size in after if way == "up" and d["type"] == "side")}


def run_settle_share(plugins: list[str], docs: int, max_new_tokens: int, log=print) -> dict:
    from device_runtime.documents import device_prompt, load_document
    from spa.model.backbone import load_backbone
    from spa.model.output_head import export_head, find_head
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate
    from spa.model.token_bytes import token_pieces

    backbone = load_backbone()
    export_head(backbone)
    head = find_head(backbone.identity.fingerprint)
    pieces = token_pieces(backbone.tokenizer)
    out = {"docs": docs, "max_new_tokens": max_new_tokens, "plugins": []}
    for path in plugins:
        pte = PtePlugin(path)
        rows = []
        for i in range(docs):
            prompt = device_prompt(pte.config, load_document(f"aclsum:test:{i}", pte.config.max_doc_tokens))
            ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=max_new_tokens,
                                     projection=pte.projection_weights())
            settled = session(backbone, pte, head, prompt, pieces, max_new_tokens, settle=True)
            verdicts = session(backbone, pte, head, prompt, pieces, max_new_tokens, settle=False)
            rows.append({"doc": i, "lossless": settled["tokens"] == ref.tokens == verdicts["tokens"],
                         "settle": settled, "verdicts": verdicts})
            log(f"{Path(path).parent.name} doc {i}: {settled['settled']}/{settled['side_tokens']} side tokens settled, "
                f"lossless {rows[-1]['lossless']}")
        side = sum(r["settle"]["side_tokens"] for r in rows)
        tokens = sum(len(r["settle"]["tokens"]) for r in rows)
        entry = {"plugin": str(path), "profile": getattr(pte.config, "profile", None), "side_tokens": side,
                 "tokens": tokens,
                 "settled": sum(r["settle"]["settled"] for r in rows),
                 "settled_share": sum(r["settle"]["settled"] for r in rows) / side if side else None,
                 "lossless": all(r["lossless"] for r in rows)}
        for kind in ("settle", "verdicts"):
            entry[f"{kind}_bytes_down_per_token"] = sum(r[kind]["bytes_down"] for r in rows) / tokens
            entry[f"{kind}_bytes_up_per_token"] = sum(r[kind]["bytes_up"] for r in rows) / tokens
        entry["side_bytes_up_when_settling"] = sum(r["settle"]["side_bytes_up"] for r in rows)
        out["plugins"].append(entry)
    return out


def format_settle_share(result: dict) -> str:
    lines = [f"spa bench settle: {result['docs']} ACLSum test papers x {result['max_new_tokens']} new tokens per "
             f"plugin, W 8, 4 in flight, pushed taps, cloud-side projection (in process: counts, not timings)",
             f"{'plugin':28} {'side':>5} {'settled':>8} {'share':>6} {'side B up':>9} "
             f"{'down/up B per token, settling':>30} {'verdicts only':>16} {'lossless':>8}"]
    for e in result["plugins"]:
        share = "-" if e["settled_share"] is None else f"{e['settled_share']:.1%}"
        lines.append(f"{Path(e['plugin']).parent.name:28} {e['side_tokens']:>5} {e['settled']:>8} {share:>6} "
                     f"{e['side_bytes_up_when_settling']:>9} "
                     f"{e['settle_bytes_down_per_token']:>18.0f} / {e['settle_bytes_up_per_token']:<9.0f} "
                     f"{e['verdicts_bytes_down_per_token']:>7.0f} / {e['verdicts_bytes_up_per_token']:<6.0f} "
                     f"{'yes' if e['lossless'] else 'NO':>8}")
    lines.append("side B up: bytes of side output that left the device while settling (only where a proof did "
                 "not hold); settled tokens send their token id alone.")
    return "\n".join(lines)

