"""Train a reader's side plugin on cached backbone states (docs/DESIGN.md §1.4).

The recipe trains exactly what the runtime runs, the *hard* gate:

1. Side network with sigma = 1 on every summary token (LM loss), keeping the
   epoch with the best validation loss.
2. Gate as a classifier. The skip cost `lam` (lambda) is the price, in nats,
   of opening the gate for one token. A token is labelled "open" when the side
   lowers its loss by more than `lam`; the gate (M_c on rms(f_t)) learns those
   labels with a cross-entropy loss. The gains are cross-fitted: two helper
   side networks, each trained on half the papers, label the other half. A
   side's gains on its own training tokens are inflated by overfitting, and
   a gate taught on them opens too often (measured on validation, outcome
   profile, 50 % usage: loss 2.515 with in-sample labels, 2.500 cross-fitted).
   `gate_labels="flip"` labels instead the tokens where the side changes the
   greedy token (`label_folds` sets the cross-fitting folds; default 2).
   `gate_input=MARGIN_GATE` gives the gate the backbone's top-2 logit margin
   beside f_t (spa/model/plugin.py): the side can only change a token whose margin
   it overcomes, which a linear gate on f_t alone cannot see.
3. tau on the validation split: the threshold minimizing
   hard-gate loss + lam * side usage, among those keeping the side usage at
   most `max_usage` (default 0.5: the side network on at most half the tokens).

Why not the soft gate `p * s` with a cost `lam * mean(p)`: the optimizer
shrinks p and grows s, the cost vanishes and the hard gate then means nothing
(measured: 96-98 % usage or a dead gate). Raising `lam` here lowers usage.
"""

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spa.data.aclsum import check_profile
from spa.data.prompts import GENERIC_INSTRUCTION, chat_template
from spa.model.generate import logit_margins
from spa.model.plugin import PLAIN_GATE, Plugin, PluginConfig, combine, every_kth_layer, gate_row
from training.tapcache import TokenSet, split_token_set


@dataclass
class TrainSettings:
    profile: str
    seed: int = 0
    train_docs: int | None = None  # None: the whole train split (100 papers)
    val_docs: int | None = None  # None: the whole val split (50 papers)
    max_doc_tokens: int = 384
    rank: int = 32
    tap_every: int = 1  # 1: every layer, as the SPA reference code
    epochs: int = 5  # the side overfits after ~3 epochs; the best validation epoch is kept
    lr: float = 1e-3
    batch_tokens: int = 64
    skip_cost: float = 0.3  # lambda: nats a token's loss must drop for the gate to open
    max_usage: float = 0.5  # largest side usage tau may give on the validation split
    gate_steps: int = 300
    combination: str = "add"  # "replace": the paper's S2/S3 replacement plugins (evaluation rows)
    # Added later; recorded in a plugin's config only when set otherwise (LATER_SETTINGS), so the
    # default recipe's plugins keep their content hash.
    gate_labels: str = "gain"  # "gain": gain > lambda; "flip": the side changes the greedy token; "helpful": to the target
    label_folds: int = 2  # cross-fitting folds for the gate labels
    gate_input: str = PLAIN_GATE  # MARGIN_GATE: the gate also reads the backbone's top-2 logit margin

    def record(self) -> dict:
        """The settings as recorded in config.json: later fields only where they differ from their default."""
        return {k: v for k, v in asdict(self).items() if LATER_SETTINGS.get(k, object()) != v}

    @classmethod
    def quick(cls, profile: str, seed: int = 0) -> "TrainSettings":
        """About a minute on a 2-core CPU: for tests and the demo."""
        return cls(profile, seed, train_docs=16, val_docs=8, max_doc_tokens=128, epochs=4, lr=2e-3)


LATER_SETTINGS = {"gate_labels": "gain", "label_folds": 2, "gate_input": PLAIN_GATE}
GATE_LABELS = ("gain", "flip", "helpful")


@dataclass
class Split:
    """Per-token losses of one split: the inputs of the gate and the report."""

    base: torch.Tensor  # [N] CE of the backbone alone
    side: torch.Tensor  # [N] CE with sigma = 1
    p: torch.Tensor  # [N] gate probability

    def gated_loss(self, tau: float) -> tuple[float, float]:
        """(hard-gate loss, side usage) at threshold tau."""
        open_ = self.p > tau
        return torch.where(open_, self.side, self.base).mean().item(), open_.float().mean().item()


def token_losses(backbone, plugin: Plugin, data: TokenSet, sigma: float, batch: int = 512) -> torch.Tensor:
    """Per-token CE of lm_head(norm(f + s)) (sigma = 1; s alone for a replacement
    plugin) or of the backbone alone (sigma = 0), no gradient."""
    def losses(states, targets):
        return (F.cross_entropy(plugin_logits(backbone, plugin, states, sigma), targets, reduction="none"),)
    return per_token(data, batch, losses)[0]


def token_effects(backbone, plugin: Plugin, data: TokenSet, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, what the side does (sigma = 1 against 0): (loss gain, whether the greedy token changes)."""
    def effects(states, targets):
        base, side = plugin_logits(backbone, plugin, states, 0.0), plugin_logits(backbone, plugin, states, 1.0)
        gain = F.cross_entropy(base, targets, reduction="none") - F.cross_entropy(side, targets, reduction="none")
        return gain, base.argmax(-1) != side.argmax(-1)
    return per_token(data, batch, effects)


def greedy_tokens(backbone, plugin: Plugin, data: TokenSet, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the greedy (argmax) token of the backbone alone and with the side on: (base, side)."""
    def greedy(states, _targets):
        return (plugin_logits(backbone, plugin, states, 0.0).argmax(-1),
                plugin_logits(backbone, plugin, states, 1.0).argmax(-1))
    return per_token(data, batch, greedy)


def per_token(data: TokenSet, batch: int, measure) -> tuple[torch.Tensor, ...]:
    """measure(states, targets) -> per-token tensors, run batch by batch without gradient and joined."""
    with torch.no_grad():
        parts = [measure(data.states[i:i + batch], data.targets[i:i + batch]) for i in range(0, len(data), batch)]
    return tuple(torch.cat(column) for column in zip(*parts))


def plugin_logits(backbone, plugin: Plugin, states: torch.Tensor, sigma: float) -> torch.Tensor:
    """The logits for states [N, L + 1, H] with the side off (sigma 0) or on (sigma 1) on every row."""
    f = states[:, -1]
    state = combine(f, plugin.side(states[:, plugin.config.taps]), plugin.config.combination) if sigma else f
    return backbone.train_logits(state)


def train_side(backbone, plugin: Plugin, train: TokenSet, val: TokenSet | None, s: TrainSettings, gen,
               label: str = "side network") -> list[dict]:
    """AdamW on the LM loss with sigma = 1, `s.epochs` epochs (a progress bar), keeping the epoch with
    the best validation loss; `val=None` (no tokens held out: the epoch count was chosen elsewhere)
    keeps the last."""
    opt = torch.optim.AdamW(plugin.side.parameters(), lr=s.lr, weight_decay=0.01)
    taps = plugin.config.taps
    history, best, best_state = [], float("inf"), None
    bar = tqdm(range(1, s.epochs + 1), desc=f"  {label}: epochs", unit="epoch", file=sys.stderr, leave=False)
    for epoch in bar:
        total = 0.0
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), s.batch_tokens):
            idx = order[i:i + s.batch_tokens]
            states = train.states[idx]
            state = combine(states[:, -1], plugin.side(states[:, taps]), plugin.config.combination)
            loss = F.cross_entropy(backbone.train_logits(state), train.targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        record = {"epoch": epoch, "train_loss": total / len(train)}
        if val is not None:
            record["val_loss"] = token_losses(backbone, plugin, val, sigma=1.0).mean().item()
            bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
            if record["val_loss"] < best:
                best, best_state = record["val_loss"], {k: v.clone() for k, v in plugin.side.state_dict().items()}
        history.append(record)
    bar.close()
    summary = ", ".join(f"{k} {v:.3f}" for k, v in history[-1].items() if k != "epoch")
    print(f"  {label}: {s.epochs} epochs ({summary} at the last)"
          + (f"; kept epoch {min(history, key=lambda r: r['val_loss'])['epoch']} (val loss {best:.3f})"
             if val is not None else ""), file=sys.stderr, flush=True)
    if best_state is not None:
        plugin.side.load_state_dict(best_state)
    return history


def backbone_margins(backbone, f: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """[N] the backbone's top-1 minus top-2 logit for each final state f [N, H]: what the gateway
    sends with each step for a margin gate (spa.model.generate.logit_margin, row by row)."""
    with torch.no_grad():
        out = [logit_margins(backbone.logits(f[i:i + batch])) for i in range(0, len(f), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def gate_rows(backbone, config: PluginConfig, f: torch.Tensor) -> torch.Tensor:
    """The gate's input rows for final states f [N, H]: f, or [f, margin] for a margin gate."""
    return gate_row(f, backbone_margins(backbone, f) if config.gate_margin else None)


def train_gate(plugin: Plugin, rows: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """Fit M_c to the labels on the gate's input rows (`gate_rows`; full batch: a few thousand tokens)."""
    opt = torch.optim.AdamW(plugin.gate.parameters(), lr=1e-2, weight_decay=0.01)
    x = plugin.gate.features(rows)
    for _ in range(steps):
        loss = F.cross_entropy(plugin.gate.classifier(x), labels.long())
        opt.zero_grad()
        loss.backward()
        opt.step()


def choose_tau(val: Split, skip_cost: float, max_usage: float = 1.0) -> float:
    """The threshold minimizing validation hard-gate loss + skip_cost * usage, with usage <= max_usage."""
    candidates = torch.cat([torch.tensor([0.0, 1.0]), val.p.unique()])
    # Put tau between neighbouring probabilities, never on one, so that no
    # validation token sits exactly at the threshold.
    candidates = candidates.sort().values
    mids = ((candidates[1:] + candidates[:-1]) / 2).tolist() + [0.0, 1.0]
    scored = [(loss + skip_cost * usage, tau) for tau in mids for loss, usage in [val.gated_loss(tau)]
              if usage <= max_usage]
    return min(scored)[1]


def train_plugin(backbone, s: TrainSettings) -> tuple[Plugin, dict]:
    """A reader profile's plugin, trained on ACLSum's train split and validated on its val split."""
    check_profile(s.profile)
    template = chat_template(backbone.tokenizer)
    train, val = (split_token_set(backbone, name, limit, s.profile, template, GENERIC_INSTRUCTION, s.max_doc_tokens)
                  for name, limit in (("train", s.train_docs), ("val", s.val_docs)))
    print(f"train: {train.documents} papers, {len(train)} summary tokens; "
          f"val: {val.documents} papers, {len(val)} summary tokens", file=sys.stderr, flush=True)
    return train_on_tokens(backbone, s, train, val, new_config(backbone, s, train, template, GENERIC_INSTRUCTION))


def new_config(backbone, s: TrainSettings, train: TokenSet, template: str, instruction: str) -> PluginConfig:
    """The config of a fresh plugin for these settings, prompt and training tokens (tau set later)."""
    return PluginConfig(
        backbone=backbone.identity.to_dict(),
        taps=every_kth_layer(backbone.num_layers, s.tap_every),
        rank=s.rank,
        side_scale=rms_of(train.states[:, -1]),
        profile=s.profile,
        prompt_template=template,
        instruction=instruction,
        max_doc_tokens=s.max_doc_tokens,
        combination=s.combination,
        gate_input=s.gate_input,
    )


def train_on_tokens(backbone, s: TrainSettings, train: TokenSet, val: TokenSet,
                    config: PluginConfig) -> tuple[Plugin, dict]:
    """The recipe on given train and validation tokens: side, cross-fitted gate labels, gate, tau."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    plugin = Plugin(config)
    history = train_side(backbone, plugin, train, val, s, gen)

    splits = {}
    for name, tokens in (("train", train), ("val", val)):
        base, side = token_losses(backbone, plugin, tokens, 0.0), token_losses(backbone, plugin, tokens, 1.0)
        splits[name] = Split(base, side, torch.zeros_like(base))
    labels = gate_labels(backbone, config, train, val, s)
    rows = {name: gate_rows(backbone, config, tokens.states[:, -1]) for name, tokens in (("train", train), ("val", val))}
    train_gate(plugin, rows["train"], labels, s.gate_steps)
    with torch.no_grad():
        for name in ("train", "val"):
            splits[name].p = plugin.gate(rows[name])[:, 0]
    config.tau = choose_tau(splits["val"], s.skip_cost, s.max_usage)
    metrics = split_metrics(splits, config.tau)
    metrics["gate_positive_labels"] = labels.float().mean().item()
    config.training = {"settings": s.record(), "side_history": history, "metrics": metrics}
    return plugin.eval(), metrics


def split_metrics(splits: dict, tau: float) -> dict:
    """Per split: the backbone's, side-always-on and gated losses, side usage at tau, token count."""
    metrics = {}
    for name, split in splits.items():
        gated, usage = split.gated_loss(tau)
        metrics[name] = {"loss_backbone": split.base.mean().item(), "loss_side_always": split.side.mean().item(),
                         "loss_gated": gated, "side_usage": usage, "tokens": len(split.base)}
    return metrics


def gate_labels(backbone, config: PluginConfig, train: TokenSet, val: TokenSet, s: TrainSettings) -> torch.Tensor:
    """Per train token, the gate's target, from cross-fitted side networks (see cross_fitted):
    "gain": the side lowers the token's loss by more than lambda;
    "flip": the side changes the greedy token (argmax of the logits). In greedy decoding the side
    output never enters the backbone's layers, so sigma_t matters exactly where it flips the token:
    a gate that opens on every flip writes what "side always on" writes;
    "helpful": the side changes the greedy token to the target (results/quality/flips: only a third
    of the flips are, and a gate opening on all of them cannot beat always on)."""
    if s.gate_labels not in GATE_LABELS:
        raise ValueError(f"gate_labels must be one of {GATE_LABELS}, not {s.gate_labels!r}")
    if s.gate_labels == "helpful":
        base, side = cross_fitted(backbone, config, train, val, s, measure=greedy_tokens)
        return helpful_flips(base, side, train.targets)
    gains, flips = cross_fitted(backbone, config, train, val, s)
    return gains > s.skip_cost if s.gate_labels == "gain" else flips


def helpful_flips(base: torch.Tensor, side: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per token: the side's greedy token is the target and the backbone's is not."""
    return (side != base) & (side == targets)


def cross_fitted(backbone, config: PluginConfig, train: TokenSet, val: TokenSet,
                 s: TrainSettings, measure=None) -> tuple[torch.Tensor, ...]:
    """Per train token, measured by a side network that never saw its paper (`label_folds` helpers,
    each trained on the other folds' papers). `measure(backbone, helper, tokens)` returns per-token
    tensors; default `token_effects`: (loss gain, whether the greedy token changes)."""
    measure = measure or token_effects
    out, folds = None, s.label_folds
    for fold in range(folds):
        fit = (train.doc_index % folds) != fold
        helper = Plugin(config)
        train_side(backbone, helper, train.where(fit), val, s, torch.Generator().manual_seed(s.seed + 1 + fold),
                   label=f"gate labels, side network without fold {fold + 1}/{folds}")
        measured = measure(backbone, helper.eval(), train.where(~fit))
        if out is None:
            out = tuple(torch.zeros(len(train), dtype=m.dtype) for m in measured)
        for whole, m in zip(out, measured):
            whole[~fit] = m
    return out


def rms_of(f: torch.Tensor) -> float:
    """Median RMS of the final states: the side output's fixed scale."""
    return f.pow(2).mean(-1).sqrt().median().item()
