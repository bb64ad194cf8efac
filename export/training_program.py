"""The plugin's training program: what a device runs to learn from its user (docs/DESIGN.md §1.7).

`spa export` writes, beside the inference `.pte` files:

    plugin-train.pte    the program (ExecuTorch, portable kernels, no weights inside)
    plugin-train.ptd    the plugin's weights, by name (ExecuTorch's external data file), and the
                        output head's norm constants
    plugin-train.json   the methods' batch sizes and where each weight lies in the .ptd

Its methods (ExecuTorch's training API wants the loss as the first output; gradients and
parameters follow it in a training method's outputs, `TrainingModule` slices them):

    side_loss(taps [B, T, H], f [B, H], targets [B], weights [B], head [V, H])
        -> loss, ce [B], token [B]          training: every side-network weight
    mix_loss(d [B, T, r], f, targets, weights, head)
        -> loss, ce [B], token [B]          training: the side network after its per-tap projections
                                            (the cloud-side projection: W_in and Down_l stay fixed)
    gate_loss(rows [G, gate_width], labels [G], weights [G])
        -> loss, p [G]                      training: the gate as a classifier
    head_loss(f [B, H], targets [B], head [V, H]) -> ce [B], token [B]     the backbone alone
    gate(row [1, gate_width]) -> p [1, 1], side(taps [1, T, H]) -> s [1, H],
    side_projected(d [1, T, r]) -> s [1, H]                               generation, as the plugin's .pte

`loss` is the full-vocabulary cross-entropy of `lm_head(norm(f + s))` averaged over the
rows whose weight is 1 (a batch is padded to B with weight-0 rows): exactly `spa train`'s
loss (training/train.py). The output head's matrix is an **input**, not a constant: the
device already holds it for settlement (spa/model/output_head.py, 113 MB for SmolLM2), so
the program stays small and the head is in memory once. Its norm weight (and Gemma's
softcap, a bias) are constants of the program.

Every weight is external (`external_constants`): the training methods' parameters and the
generation methods' constants are the same named entries of the `.ptd`, keyed by the
plugin's own state-dict names. So a device that writes a new `.ptd` with its learned
weights (plugin-train.json says where each lies) has a new plugin: the generation methods
read it on the next load. No torch, no exporter on the device.

Portable kernels only: XNNPACK made a training step 1.8x faster on this CPU but its
lowering of the backward graph took 3x longer to export, and the APK's runtime is checked
for the portable operators (android_demo/scripts/pte_runtime_check.py).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spa.model.output_head import OutputHead
from spa.model.plugin import Plugin, SideNetwork, load_plugin

TRAIN_PTE, TRAIN_PTD, TRAIN_JSON = "plugin-train.pte", "plugin-train.ptd", "plugin-train.json"
BATCH = 64  # rows of side_loss/mix_loss/head_loss: spa train's batch_tokens
GATE_BATCH = 512  # rows of gate_loss (a full-batch gate step is accumulated over chunks)
FORMAT = 1


class HeadProduct(torch.autograd.Function):
    """y @ W^T and its gradient g @ W, both reading W [V, H] as it lies in memory.

    Written the obvious way, one of the two products reads W transposed, and ExecuTorch's
    portable kernels materialise that transpose: a 113 MB copy per step that made a step
    of 64 tokens 2.4x slower on this CPU (1.28 s against 0.54 s). Same values as autograd's."""

    @staticmethod
    def forward(ctx, y, weight):
        ctx.save_for_backward(weight)
        return torch.mm(weight, y.t()).t()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None


class HeadLogits(nn.Module):
    """lm_head(norm(x)) with the head's matrix as an argument: the backbone's final norm (its
    weight a constant), the matrix product, and the family's monotone after-steps."""

    def __init__(self, head: OutputHead):
        super().__init__()
        self.register_buffer("norm_factor", torch.from_numpy(head.norm_factor.copy()))
        self.has_bias = head.bias is not None
        if self.has_bias:
            self.register_buffer("bias", torch.from_numpy(head.bias.copy()))
        self.eps, self.softcap, self.scale = float(head.eps), head.softcap, head.scale

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_factor  # as LlamaRMSNorm
        z = HeadProduct.apply(y, weight)
        if self.has_bias:
            z = z + self.bias
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.scale:
            z = z * self.scale
        return z


def masked_mean(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ce over the rows with weight 1 (the batch's real rows)."""
    return (ce * weights).sum() / weights.sum()


class _Mix(nn.Module):
    """The side network after its per-tap projections (SideNetwork.mix), holding only the weights
    mix reads, under the same names: a training method's parameters are exactly what it trains."""

    def __init__(self, side: SideNetwork):
        super().__init__()
        self.adapter, self.w_out, self.act = side.adapter, side.w_out, side.act
        self.register_buffer("scale", side.scale)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return SideNetwork.mix(self, d)


class SideLoss(nn.Module):
    def __init__(self, plugin: Plugin, head: OutputHead, projected: bool):
        super().__init__()
        self.side = _Mix(plugin.side) if projected else plugin.side
        self.head = HeadLogits(head)

    def forward(self, x, f, targets, weights, head_weight):
        logits = self.head(f + self.side(x), head_weight)
        ce = F.cross_entropy(logits, targets, reduction="none")
        return masked_mean(ce, weights), ce.detach(), logits.detach().argmax(-1)


class GateLoss(nn.Module):
    def __init__(self, plugin: Plugin):
        super().__init__()
        self.gate = plugin.gate

    def forward(self, rows, labels, weights):
        logits = self.gate.logits(rows)
        ce = F.cross_entropy(logits, labels, reduction="none")
        return masked_mean(ce, weights), torch.softmax(logits.detach(), dim=-1)[:, 1]


class HeadLoss(nn.Module):
    def __init__(self, head: OutputHead):
        super().__init__()
        self.head = HeadLogits(head)

    def forward(self, f, targets, head_weight):
        logits = self.head(f, head_weight)
        return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)


class Generate(nn.Module):
    """One of the plugin's generation methods, with the plugin's own attribute names."""

    def __init__(self, plugin: Plugin, method: str):
        super().__init__()
        self.side, self.gate, self.method = plugin.side, plugin.gate, method

    def forward(self, x):
        if self.method == "gate":
            return self.gate(x)
        return self.side(x) if self.method == "side" else self.side.mix(x)


TRAINING_METHODS = ("side_loss", "mix_loss", "gate_loss")


def example_inputs(plugin: Plugin, vocab: int) -> dict:
    c = plugin.config
    hidden, taps, rank = c.hidden_size, len(c.taps), c.rank
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(vocab, hidden, generator=gen) * 0.05
    f = torch.randn(BATCH, hidden, generator=gen) * 15
    targets, weights = torch.randint(0, vocab, (BATCH,), generator=gen), torch.ones(BATCH)
    gate_rows = torch.randn(GATE_BATCH, c.gate_width, generator=gen) * 15
    if c.gate_margin:
        gate_rows[:, -1] = 2.0
    return {
        "side_loss": (torch.randn(BATCH, taps, hidden, generator=gen) * 15, f, targets, weights, head),
        "mix_loss": (torch.randn(BATCH, taps, rank, generator=gen), f, targets, weights, head),
        "gate_loss": (gate_rows, torch.randint(0, 2, (GATE_BATCH,), generator=gen), torch.ones(GATE_BATCH)),
        "head_loss": (f, targets, head),
        "gate": (gate_rows[:1],),
        "side": (torch.randn(1, taps, hidden, generator=gen) * 15,),
        "side_projected": (torch.randn(1, taps, rank, generator=gen),),
    }


def lower_training(plugin: Plugin, head: OutputHead, content_hash: str) -> tuple[bytes, bytes]:
    """(the program's bytes, its weights file's bytes)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    plugin = plugin.train().requires_grad_(True)
    plugin.side.scale.requires_grad_(False)
    inputs = example_inputs(plugin, head.vocab_size)
    modules = {"side_loss": SideLoss(plugin, head, projected=False), "mix_loss": SideLoss(plugin, head, projected=True),
               "gate_loss": GateLoss(plugin), "head_loss": HeadLoss(head)}
    modules |= {name: Generate(plugin, name) for name in ("gate", "side", "side_projected")}
    programs = {}
    for name, module in modules.items():
        program = torch.export.export(module, inputs[name], strict=False)
        programs[name] = _export_forward_backward(program) if name in TRAINING_METHODS else program
    config = json.dumps(plugin.config.to_dict() | {"content_hash": content_hash}, sort_keys=True)
    constants = {"plugin_hash": torch.tensor([ord(c) for c in content_hash], dtype=torch.int64),
                 "plugin_config": torch.tensor(list(config.encode()), dtype=torch.uint8)}
    edge = to_edge(programs, constant_methods=constants)
    # The inputs are copied into each method's planned memory (the head too: 113 MB per loaded loss
    # method, ~30 ms a call). Reading them in place (MemoryPlanningPass(alloc_graph_input=False)) gave
    # wrong gate losses and crashed side_loss in the 1.5.1 runtime together with external weights.
    program = edge.to_executorch(ExecutorchBackendConfig(external_constants=True))
    data = program._tensor_data  # {file name: its bytes}; one file: every constant of every method
    if len(data) != 1:
        raise AssertionError(f"expected one weights file, got {sorted(data)}")
    return program.buffer, bytes(next(iter(data.values())))


def ptd_layout(ptd: bytes) -> dict:
    """{name: {"offset", "bytes", "dtype", "shape"}}: where each named tensor's data lies in a .ptd."""
    from executorch.extension.flat_tensor.serialize.serialize import (_deserialize_to_flat_tensor,
                                                                      _get_extended_header)

    header = _get_extended_header(ptd)
    flat = _deserialize_to_flat_tensor(ptd)
    layout = {}
    for entry in flat.named_data:
        segment = flat.segments[entry.segment_index]
        t = entry.tensor_layout
        layout[entry.key] = {"offset": header.segment_base_offset + segment.offset, "bytes": segment.size,
                             "dtype": t.scalar_type.name.lower(), "shape": list(t.sizes)}
    return layout


def export_training_program(plugin_dir: str | Path, out_dir: str | Path, head: OutputHead) -> dict:
    """Write plugin-train.{pte,ptd,json} into out_dir; returns what the manifest records."""
    import hashlib
    import time

    t0 = time.time()
    plugin = load_plugin(plugin_dir)
    digest = plugin.content_hash()
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in plugin.state_dict().items()}
    pte, ptd = lower_training(plugin, head, digest)
    layout = ptd_layout(ptd)
    for name, tensor in state.items():  # the layout is right: each entry holds the plugin's own bytes
        at = layout.get(name)
        if at is None or ptd[at["offset"]:at["offset"] + at["bytes"]] != tensor.numpy().tobytes():
            raise AssertionError(f"{TRAIN_PTD}: {name} is not where its layout says")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRAIN_PTE).write_bytes(pte)
    (out_dir / TRAIN_PTD).write_bytes(ptd)
    info = {"format": FORMAT, "content_hash": digest, "batch": BATCH, "gate_batch": GATE_BATCH,
            "vocab_size": head.vocab_size, "head_fingerprint": head.fingerprint,
            "program_sha256": hashlib.sha256(pte).hexdigest(), "weights": sorted(state), "layout": layout}
    (out_dir / TRAIN_JSON).write_text(json.dumps(info, indent=1) + "\n")
    return {"file": TRAIN_PTE, "bytes": len(pte), "weights_file": TRAIN_PTD, "weights_bytes": len(ptd),
            "export_seconds": round(time.time() - t0, 1)}


def export_training(plugin_dir: str | Path, out_dir: str | Path, head_path: Path | None, progress=print) -> dict | None:
    """`spa export`'s step: the training program beside the inference programs, or None (with a line
    saying why) where a device could not learn with it."""
    if head_path is None:
        progress("no training program: it needs the backbone's output head (see above)")
        return None
    plugin = load_plugin(plugin_dir)
    if plugin.config.combination != "add":
        progress("no training program: a replacement plugin (evaluation rows) does not run in the split")
        return None
    progress("lowering the training program to ExecuTorch (forward and backward; ~1 min)...")
    return export_training_program(plugin_dir, out_dir, OutputHead.load(Path(head_path)))
