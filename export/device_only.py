"""The whole backbone as one ExecuTorch program: the *device-only* baseline.

Users could skip the split altogether and run a small model on the phone.
To measure that alternative honestly, the same SmolLM2 the gateway serves is
exported whole (embedding, every decoder layer, final norm, lm_head) and run
by the ExecuTorch runtime, XNNPACK-delegated, in fp32 or 8da4w (dynamic int8
activations, int4 weights in groups of 32, the usual on-device LLM recipe).

The one exception to "only spa/model/backbone.py touches the model, and only
through the model's own code": transformers' own static-cache export wrapper
does not lower under torch 2.13 (its cache update and mask construction do
not survive `torch.export` + XNNPACK partitioning with a dynamic sequence
length), so this module re-implements the Llama decoder layer with a static
KV cache held in mutable buffers. It reads its weights only through the
public `Backbone` accessors (`config`, `embedding`, `layers`, `norm`,
`lm_head`), and refuses any layer that is not the Llama layout (q/k/v/o
projections, gated MLP, two RMS norms, default rotary embedding): the
device-only baseline is measured on the default SmolLM2.

    forward(tokens: int64[1, T], input_pos: int64[T]) -> logits: float32[1, V]

T is dynamic (1..max_seq_len): one call prefills the prompt, then one call per
generated token. The logits are those of the last input position. Positions
past the current one are masked, so a new prompt simply overwrites the cache
from position 0.

`export_backbone` writes `backbone-<variant>.pte` plus `backbone-<variant>.json`
(size, export time, and token parity with the eager backbone on a fixed
prompt: greedy tokens must be identical wherever the eager top-2 logit gap has
margin).
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("fp32", "8da4w")
DEFAULT_MAX_SEQ_LEN = 768
PARITY_DOCUMENT = ("The quick brown fox jumps over the lazy dog. This sentence contains every letter of the "
                   "English alphabet, which is why typists and type designers have used it for a century.")
PARITY_INSTRUCTION = "Explain in one sentence why this sentence is famous."
MODULE_VERSION = 3  # bump when StaticKVDecoder changes: cached exports of older versions are redone


class _Layer(nn.Module):
    def __init__(self, layer, cfg, max_seq_len: int):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_copy_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.gate, self.up, self.down = (_copy_linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.register_buffer("norm1", layer.input_layernorm.weight.detach().to(torch.float32).cpu().clone())
        self.register_buffer("norm2", layer.post_attention_layernorm.weight.detach().to(torch.float32).cpu().clone())
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        shape = (1, self.kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, input_pos, mask):
        b, t, _ = x.shape
        h = _rms_norm(x, self.norm1, self.eps)
        rep = self.heads // self.kv_heads
        # Queries grouped by KV head: [b, kv_heads, rep, t, head_dim] (head g * rep + r, as transformers' repeat_kv).
        q = self.q(h).view(b, t, self.kv_heads, rep, self.head_dim).permute(0, 2, 3, 1, 4)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, cos[:, :, None], sin[:, :, None]), _rope(k, cos, sin)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        # Grouped-query attention without copying the caches for each query head:
        # the rep query heads of a KV head are stacked along the sequence axis.
        qg = torch.cat([q[:, :, r] for r in range(rep)], dim=2)  # [b, kv_heads, rep * t, head_dim], rows (r, t)
        scores = torch.matmul(qg, self.k_cache.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)  # [b, kv_heads, rep * t, head_dim]
        out = torch.stack([out[:, :, r * t:(r + 1) * t] for r in range(rep)], dim=2)  # [b, kv_heads, rep, t, hd]
        x = x + self.o(out.permute(0, 3, 1, 2, 4).reshape(b, t, self.heads * self.head_dim))
        h = _rms_norm(x, self.norm2, self.eps)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class StaticKVDecoder(nn.Module):
    """A Llama-layout causal LM with a static KV cache; see the module docstring.

    `backbone`: a `spa.model.backbone.Backbone`, or a Hugging Face causal LM (its
    `spa.model.backbone.decoder_parts`: the same public accessors)."""

    def __init__(self, backbone, max_seq_len: int = DEFAULT_MAX_SEQ_LEN):
        super().__init__()
        from spa.model.backbone import Backbone, decoder_parts

        if not isinstance(backbone, Backbone):
            backbone = decoder_parts(backbone)
        _check_llama_layout(backbone)
        cfg = backbone.config
        self.max_seq_len = max_seq_len
        weight = backbone.embedding.weight.detach().to(torch.float32).cpu().clone()
        self.embed = nn.Embedding.from_pretrained(weight, freeze=True)
        self.layers = nn.ModuleList(_Layer(layer, cfg, max_seq_len) for layer in backbone.layers)
        self.register_buffer("norm", backbone.norm.weight.detach().to(torch.float32).cpu().clone())
        self.eps = cfg.rms_norm_eps
        self.lm_head = _copy_linear(backbone.lm_head)  # a copy: quantizing it must not touch the embedding
        head_dim = self.layers[0].head_dim
        theta = _rope_theta(cfg)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_seq_len).float()[:, None] * inv_freq[None, :]  # as transformers' rotary embedding
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.cos[input_pos][None, None], self.sin[input_pos][None, None]
        mask = self.positions[None, :] > input_pos[:, None]  # [T, max]: True = masked (a future position)
        rep = self.layers[0].heads // self.layers[0].kv_heads
        mask = mask.repeat(rep, 1)[None, None]  # rows ordered as the grouped queries: [1, 1, rep * T, max]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.lm_head(_rms_norm(x[:, -1, :], self.norm, self.eps))


def _copy_linear(m: nn.Linear) -> nn.Linear:
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)  # float32 on the CPU, as exported
    out.weight.data.copy_(m.weight.detach())
    if m.bias is not None:
        out.bias.data.copy_(m.bias.detach())
    return out


def _check_llama_layout(backbone) -> None:
    """The static-cache decoder below is the Llama layer; anything else gets a one-line error."""
    from spa.errors import BackboneError

    cfg = backbone.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    names = {name for name, _ in backbone.layers[0].named_modules()}
    extra = {"self_attn.q_norm", "pre_feedforward_layernorm"} & names  # Qwen3 / Gemma norms the copy lacks
    if (any(n not in names for n in needed) or extra or rope != "default"
            or getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "sliding_window", None)):
        raise BackboneError(f"the device-only backbone export supports the Llama layout only "
                            f"(SmolLM2); {type(backbone.model).__name__} differs")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def lower_backbone(backbone, variant: str = "fp32", max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> bytes:
    """The `.pte` bytes of the whole backbone (forward(tokens, input_pos) -> last logits)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    module = StaticKVDecoder(backbone, max_seq_len).eval().requires_grad_(False)
    if variant == "8da4w":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    # Mutated buffers get no initial content in ExecuTorch unless asked: start the caches at zero,
    # so a position not written yet never holds NaN garbage (0 * NaN would leak through softmax).
    config = ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])])
    return edge.to_executorch(config).buffer


class PteBackbone:
    """The exported backbone run by the ExecuTorch runtime: prefill, then one token per call."""

    def __init__(self, path: str | Path):
        from spa.model.pte_plugin import executorch_runtime
        from spa.system.quiet import quiet_native_stderr

        self.path = Path(path)
        runtime = executorch_runtime()
        with quiet_native_stderr():
            self._program = runtime.load_program(self.path)
            self._method = self._program.load_method("forward")

    def logits(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [V] after feeding `tokens` at positions start, start + 1, ..."""
        ids = torch.tensor([tokens], dtype=torch.long)
        pos = torch.arange(start, start + len(tokens), dtype=torch.long)
        return self._method.execute([ids, pos])[0][0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids=(), on_token=None) -> list[int]:
        """Greedy tokens; `on_token(token)` is called as each is chosen."""
        out = []
        logits = self.logits(prompt_ids, 0)
        pos = len(prompt_ids)
        while True:
            token = int(torch.argmax(logits))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos_ids or len(out) >= max_new_tokens:
                return out
            logits = self.logits([token], pos)
            pos += 1


def eager_greedy(backbone, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of the eager backbone (the gateway's step functions) and each choice's top-2 gap."""
    from spa.model.generate import generate

    gaps = []

    def choose(pos, states):
        logits = backbone.logits(states[0, -1])
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        return [int(torch.argmax(logits))]

    # No EOS stop: the exported program is compared token for token over the whole length.
    tokens = [t for _, _, chosen in generate(backbone, prompt_ids, choose, max_new_tokens, eos_ids=()) for t in chosen]
    return tokens, gaps


def parity_prompt(backbone) -> str:
    from spa.data.prompts import chat_template, format_prompt

    return format_prompt(chat_template(backbone.tokenizer), PARITY_DOCUMENT, PARITY_INSTRUCTION)


def token_parity(backbone, pte: PteBackbone, prompt: str | None = None, max_new_tokens: int = 16,
                 margin: float = 1e-2) -> dict:
    """Compare greedy tokens with the eager backbone, up to the first choice without margin.

    Eager and XNNPACK differ by float reassociation, so only choices whose eager
    top-2 logit gap exceeds `margin` are held to equality (docs/DESIGN.md §2).
    """
    ids = backbone.encode(prompt if prompt is not None else parity_prompt(backbone))
    ref, gaps = eager_greedy(backbone, ids, max_new_tokens)
    got = pte.generate(ids, max_new_tokens)
    checked = next((i for i, g in enumerate(gaps) if g <= margin), len(gaps))
    first_divergence = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    return {"prompt_tokens": len(ids), "eager": ref, "pte": got, "min_gap": min(gaps), "checked": checked,
            "margin": margin, "identical": ref == got, "first_divergence": first_divergence,
            "ok": ref[:checked] == got[:checked] and checked > 0}


def export_backbone(backbone, out_dir: str | Path, variant: str = "fp32", max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                    progress=print) -> dict:
    """Write `backbone-<variant>.pte` and its report `backbone-<variant>.json`; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"backbone-{variant}.pte"
    t0 = time.time()
    progress(f"exporting the whole backbone ({backbone.identity.name}, {variant}) to ExecuTorch (XNNPACK)...")
    data = lower_backbone(backbone, variant, max_seq_len)
    tmp = path.with_suffix(".pte.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    report = {"file": path.name, "variant": variant, "module_version": MODULE_VERSION, "bytes": len(data), "max_seq_len": max_seq_len,
              "backbone": backbone.identity.to_dict(), "export_seconds": round(time.time() - t0, 1)}
    report["parity"] = parity = token_parity(backbone, PteBackbone(path))
    if variant != "fp32":
        # Quantized weights are other numerics: tokens may legitimately differ. Report where
        # they first do; the check is that the program runs and starts on the same tokens.
        parity["exact_required"] = False
        parity["ok"] = parity["first_divergence"] > 0
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def exported_backbone(backbone, out_dir: str | Path, variant: str = "fp32", progress=print) -> tuple[Path, dict]:
    """(path, report) of an export for this backbone in out_dir, exporting it if missing or stale."""
    path = Path(out_dir) / f"backbone-{variant}.pte"
    report_file = path.with_suffix(".json")
    if path.exists() and report_file.exists():
        report = json.loads(report_file.read_text())
        if (report.get("backbone", {}).get("fingerprint") == backbone.identity.fingerprint
                and report.get("module_version") == MODULE_VERSION):
            return path, report
    return path, export_backbone(backbone, out_dir, variant, progress=progress)


def main(argv=None) -> int:
    """`python -m export.device_only --out DIR [--variant fp32|8da4w]`: export the default backbone whole."""
    import argparse

    from spa.model.backbone import load_backbone
    from spa.system.quiet import quiet_libraries

    ap = argparse.ArgumentParser(description="export the whole backbone to ExecuTorch (device-only baseline)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variant", default="fp32", choices=VARIANTS)
    ap.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    ap.add_argument("--backbone", help="Hugging Face causal-LM directory (default: the packaged SmolLM2)")
    args = ap.parse_args(argv)
    quiet_libraries()
    report = export_backbone(load_backbone(args.backbone), args.out, args.variant, args.max_seq_len)
    print(json.dumps(report, indent=2))
    return 0 if report["parity"]["ok"] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
