"""The device learns from its user's examples: `spa train --examples`'s recipe on the training program.

The states come from the gateway (device_runtime/teach_client.py, teacher forcing), the
arithmetic runs in the ExecuTorch runtime (spa/model/train_program.py: forward, backward,
ExecuTorch's SGD applying AdamW's step). The recipe is training/examples.py's, step for
step, with the same settings (`example_settings`): 

* 20 examples or more: every fifth held out; the side network trains with sigma = 1
  (AdamW, lr 1e-3, batches of 64 tokens, at least 60 steps), keeping the epoch with the
  best held-out loss; the gate's labels come from `label_folds` helper side networks,
  each blind to a fold of the training examples; the gate learns them (300 full-batch
  AdamW steps); tau minimises held-out loss + lambda * usage with usage <= 35 %.
* fewer: cross-fitted folds (example i in fold i mod 5); helpers per fold give the gate's
  labels and the validation losses; the final side network trains on every example for
  the epoch count the folds preferred; tau on the out-of-fold tokens.

What differs from the workstation, and why: the states are the ones the gateway sends,
quantized by the session codec (the device trains on what it will see), and every side
network, helpers included, starts from the plugin being taught (its weights file), not
from a fresh random one. The result is a set of weights (by the plugin's state-dict
names), a tau and the metrics; spa/model/personal.py stores them.
"""

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spa.model.train_program import Trainee, load_module, padded, patched_weights
from training.examples import FOLD_BELOW, FOLDS, example_settings, fold_labels, held_out, side_epochs, validation_rule
from training.train import Split, TrainSettings, choose_tau, split_metrics


@dataclass
class DeviceTokens:
    """The states of every summary token of the examples, as received (decoded) from the gateway."""

    x: np.ndarray  # [N, T, H] taps, or [N, T, r] the cloud's projections d
    f: np.ndarray  # [N, H]
    targets: np.ndarray  # [N] int64
    doc_index: np.ndarray  # [N] which example
    margins: np.ndarray | None = None  # [N] the backbone's top-2 logit margins (a margin gate)

    def __len__(self) -> int:
        return len(self.targets)

    def where(self, keep: np.ndarray) -> "DeviceTokens":
        return DeviceTokens(self.x[keep], self.f[keep], self.targets[keep], self.doc_index[keep],
                            None if self.margins is None else self.margins[keep])

    @property
    def gate_rows(self) -> np.ndarray:
        """The gate's input rows: f, then the margin for a margin gate."""
        return self.f if self.margins is None else np.concatenate([self.f, self.margins[:, None]], axis=1)

    @classmethod
    def join(cls, parts: list["DeviceTokens"]) -> "DeviceTokens":
        margins = None if parts[0].margins is None else np.concatenate([p.margins for p in parts])
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.f for p in parts]),
                   np.concatenate([p.targets for p in parts]),
                   np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)]), margins)


@dataclass
class Program:
    """The files a device learns with: the training program, the weights to start from, its
    description, and the backbone's output head (an input of the loss)."""

    pte: Path
    ptd: bytes  # the weights file the plugin being taught has
    info: object  # spa.model.train_program.ProgramInfo
    head: torch.Tensor  # [V, H] float32
    projected: bool  # the states are the cloud's projections: train the side network after them
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spa-learn-")))

    def weights_file(self, weights: dict | None = None) -> Path:
        """A weights file holding the starting weights, with `weights` written over them."""
        data = self.ptd if not weights else patched_weights(self.ptd, self.info, weights)
        path = self.workdir / f"w{len(list(self.workdir.iterdir()))}.ptd"
        path.write_bytes(data)
        return path

    @property
    def side_method(self) -> str:
        return "mix_loss" if self.projected else "side_loss"


@dataclass
class Learned:
    weights: dict  # name -> float32 array: the side network's and the gate's learned weights
    tau: float
    metrics: dict
    record: dict  # what the plugin's config says about this learning (never the examples' text)


def learn(program: Program, tokens: DeviceTokens, s: TrainSettings | None = None, progress=None) -> Learned:
    """The recipe (module docstring) on the examples' states; `progress(done, total, what)` is told
    of every training batch."""
    s = s or example_settings()
    try:
        return _learn(program, tokens, s, progress)
    finally:
        shutil.rmtree(program.workdir, ignore_errors=True)  # the weights files of the helpers


def _learn(program: Program, tokens: DeviceTokens, s: TrainSettings, progress) -> Learned:
    count = int(tokens.doc_index.max()) + 1
    clock = Progress(progress, _planned_batches(program, tokens, count, s))
    t0 = time.perf_counter()
    # The plugin being taught never saw these examples: all of them are held out from it.
    held = tokens if count < FOLD_BELOW else tokens.where(held_out(torch.from_numpy(tokens.doc_index)).numpy())
    before = float(effects_with(program, {}, held)[0].mean())
    if count < FOLD_BELOW:
        weights, tau, metrics = _cross_fitted(program, tokens, s, clock)
    else:
        weights, tau, metrics = _held_out(program, tokens, s, clock)
    metrics["val"]["loss_side_before"] = before  # the taught plugin's, side on, on the same tokens
    record = {"examples": count, "tokens": len(tokens), "validation": validation_rule(count),
              "seconds": round(time.perf_counter() - t0, 1), "training_batches": clock.done,
              "optimizer": "AdamW through ExecuTorch SGD",
              "side": program.side_method, "settings": s.record()}
    return Learned(weights, tau, metrics, record)


class Progress:
    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, max(1, total), 0

    def tick(self, what: str) -> None:
        self.done += 1
        if self.report is not None:
            self.report(min(self.done, self.total), self.total, what)


def _planned_batches(program: Program, tokens: DeviceTokens, count: int, s: TrainSettings) -> int:
    """How many side-network training batches the recipe runs (for the progress bar)."""
    def batches(n: int, epochs: int) -> int:
        return epochs * -(-n // s.batch_tokens)

    docs = tokens.doc_index
    if count < FOLD_BELOW:
        folds = min(FOLDS, count)
        epochs = s.epochs or side_epochs(len(tokens) * (folds - 1) // folds, s.batch_tokens)
        helpers = sum(batches(int((docs % folds != k).sum()), epochs) for k in range(folds))
        return helpers + batches(len(tokens), epochs)  # the final one runs the folds' best count: at most this
    train = docs[~held_out(torch.from_numpy(docs)).numpy()]
    epochs = s.epochs or side_epochs(len(train), s.batch_tokens)
    helpers = sum(batches(int((train % s.label_folds != k).sum()), epochs) for k in range(s.label_folds))
    return batches(len(train), epochs) + helpers


# --- the side network ---------------------------------------------------------------------------


def side_batches(tokens: DeviceTokens, batch: int, order: np.ndarray, size: int):
    """(inputs of side_loss/mix_loss, real rows) for each batch of `size` tokens in `order`."""
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        yield side_inputs(tokens, idx, batch), len(idx)


def side_inputs(tokens: DeviceTokens, idx: np.ndarray, batch: int) -> tuple:
    n = len(idx)
    return (torch.from_numpy(padded(tokens.x[idx].astype(np.float32), batch)),
            torch.from_numpy(padded(tokens.f[idx].astype(np.float32), batch)),
            torch.from_numpy(padded(tokens.targets[idx].astype(np.int64), batch)),
            torch.from_numpy(padded(np.ones(n, np.float32), batch)))


def side_effects(trainee: Trainee, program: Program, tokens: DeviceTokens) -> tuple[np.ndarray, np.ndarray]:
    """Per token, with the side on (sigma = 1) and the trainee's current weights: (CE, greedy token)."""
    ce, tok = [], []
    b = program.info.batch
    for inputs, n in side_batches(tokens, b, np.arange(len(tokens)), b):
        out = trainee.run(inputs + (program.head,))
        ce.append(out[1].numpy()[:n])
        tok.append(out[2].numpy()[:n])
    return np.concatenate(ce) if ce else np.zeros(0, np.float32), np.concatenate(tok) if tok else np.zeros(0, np.int64)


def base_effects(program: Program, tokens: DeviceTokens) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the backbone alone (sigma = 0): (CE, greedy token), by the program's head_loss."""
    module = load_module(program.pte, program.weights_file()).model
    ce, tok = [], []
    b = program.info.batch
    for (x, f, targets, _), n in side_batches(tokens, b, np.arange(len(tokens)), b):
        out = module.run_method("head_loss", (f, targets, program.head))
        ce.append(out[0].numpy()[:n])
        tok.append(out[1].numpy()[:n])
    return np.concatenate(ce), np.concatenate(tok)


def train_side(program: Program, train: DeviceTokens, val: DeviceTokens | None, s: TrainSettings, seed: int,
               clock: Progress, label: str) -> tuple[dict, list[dict]]:
    """(the kept weights, per-epoch history): AdamW with sigma = 1 for `s.epochs` epochs from the
    starting weights, keeping the epoch with the best `val` loss (the last without `val`)."""
    trainee = Trainee(program.pte, program.weights_file(), program.side_method, s.lr)
    gen = torch.Generator().manual_seed(seed)
    history, best, kept = [], float("inf"), None
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(len(train), generator=gen).numpy()
        total = 0.0
        for inputs, n in side_batches(train, program.info.batch, order, s.batch_tokens):
            loss = trainee.run(inputs + (program.head,))[0]
            trainee.step()
            total += float(loss) * n
            clock.tick(label)
        record = {"epoch": epoch, "train_loss": total / len(train)}
        if val is not None:
            record["val_loss"] = float(side_effects(trainee, program, val)[0].mean())
            if record["val_loss"] < best:
                best, kept = record["val_loss"], trainee.weights()
        history.append(record)
    return (kept if kept is not None else trainee.weights()), history


def effects_with(program: Program, weights: dict, tokens: DeviceTokens) -> tuple[np.ndarray, np.ndarray]:
    """(CE, greedy token) per token with the side on and these side weights."""
    trainee = Trainee(program.pte, program.weights_file(weights), program.side_method, 0.0)
    return side_effects(trainee, program, tokens)


# --- the gate -----------------------------------------------------------------------------------


def gate_inputs(rows: np.ndarray, labels: np.ndarray, size: int):
    """Chunks of the full batch: (inputs of gate_loss, real rows)."""
    for i in range(0, max(len(rows), 1), size):
        r, lab = rows[i:i + size], labels[i:i + size]
        yield (torch.from_numpy(padded(r.astype(np.float32), size)),
               torch.from_numpy(padded(lab.astype(np.int64), size)),
               torch.from_numpy(padded(np.ones(len(r), np.float32), size))), len(r)


def train_gate(program: Program, rows: np.ndarray, labels: np.ndarray, steps: int, weights: dict | None = None) \
        -> tuple[dict, Trainee]:
    """M_c fitted to the labels: `steps` full-batch AdamW steps (lr 1e-2, as spa train), the batch's
    gradient accumulated over the program's chunks, each weighted by its share of the rows."""
    trainee = Trainee(program.pte, program.weights_file(weights), "gate_loss", 1e-2)
    for _ in range(steps):
        total = None
        for inputs, n in gate_inputs(rows, labels, program.info.gate_batch):
            trainee.run(inputs)
            share = np.float32(n / len(rows))
            grads = {k: g * share for k, g in trainee.gradients().items()}
            total = grads if total is None else {k: total[k] + grads[k] for k in grads}
        trainee.step(total)
    return trainee.weights(), trainee


def gate_probabilities(trainee: Trainee, program: Program, rows: np.ndarray) -> np.ndarray:
    """p_t of the trainee's gate on each row."""
    out = []
    for inputs, n in gate_inputs(rows, np.zeros(len(rows), np.int64), program.info.gate_batch):
        out.append(trainee.run(inputs)[1].numpy()[:n])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --- the two validation rules ---------------------------------------------------------------------


def _held_out(program: Program, tokens: DeviceTokens, s: TrainSettings, clock: Progress):
    """20 examples or more: training/train.py's train_on_tokens on the device."""
    val_mask = held_out(torch.from_numpy(tokens.doc_index)).numpy()
    train, val = tokens.where(~val_mask), tokens.where(val_mask)
    s = dataclasses.replace(s, epochs=s.epochs or side_epochs(len(train), s.batch_tokens))
    side, history = train_side(program, train, val, s, s.seed, clock, "side network")
    # gate labels: helpers blind to one fold of the training examples each (training/train.py cross_fitted)
    base = {name: base_effects(program, part) for name, part in (("train", train), ("val", val))}
    effects = [np.zeros(len(train), np.float32), np.zeros(len(train), np.int64)]
    for fold in range(s.label_folds):
        fit = (train.doc_index % s.label_folds) != fold
        helper, _ = train_side(program, train.where(fit), val, s, s.seed + 1 + fold, clock,
                               f"gate labels, side network without fold {fold + 1}/{s.label_folds}")
        ce, tok = effects_with(program, helper, train.where(~fit))
        effects[0][~fit], effects[1][~fit] = ce, tok
    labels = _labels(s, base["train"], effects, train.targets)
    gate, trainee = train_gate(program, train.gate_rows, labels, s.gate_steps)
    splits = {}
    for name, part in (("train", train), ("val", val)):
        side_ce, _ = effects_with(program, side, part)
        splits[name] = Split(torch.from_numpy(base[name][0]), torch.from_numpy(side_ce),
                             torch.from_numpy(gate_probabilities(trainee, program, part.gate_rows)))
    tau = choose_tau(splits["val"], s.skip_cost, s.max_usage)
    metrics = split_metrics(splits, tau) | {"gate_positive_labels": float(labels.mean()), "side_history": history}
    return side | gate, tau, metrics


def _cross_fitted(program: Program, tokens: DeviceTokens, s: TrainSettings, clock: Progress):
    """Fewer than 20 examples: training/examples.py's train_cross_fitted on the device."""
    folds = min(FOLDS, int(tokens.doc_index.max()) + 1)
    fold = tokens.doc_index % folds
    s = dataclasses.replace(s, epochs=s.epochs or side_epochs(len(tokens) * (folds - 1) // folds, s.batch_tokens))
    side_ce, side_tok = np.zeros(len(tokens), np.float32), np.zeros(len(tokens), np.int64)
    histories = []
    for k in range(folds):
        mine = fold == k
        helper, history = train_side(program, tokens.where(~mine), tokens.where(mine), s, s.seed + 1 + k, clock,
                                     f"side network without fold {k + 1}/{folds}")
        histories.append(history)
        side_ce[mine], side_tok[mine] = effects_with(program, helper, tokens.where(mine))
    weights = [int((fold == k).sum()) for k in range(folds)]
    per_epoch = [sum(w * h[e]["val_loss"] for w, h in zip(weights, histories)) / sum(weights)
                 for e in range(s.epochs)]
    best_epochs = int(np.argmin(per_epoch)) + 1
    side, history = train_side(program, tokens, None, dataclasses.replace(s, epochs=best_epochs), s.seed, clock,
                               "side network on every example")
    base = base_effects(program, tokens)
    labels = _labels(s, base, [side_ce, side_tok], tokens.targets)
    rows = tokens.gate_rows
    p_out = np.zeros(len(tokens), np.float32)
    for k in range(folds):
        mine = fold == k
        _, helper = train_gate(program, rows[~mine], labels[~mine], s.gate_steps)
        p_out[mine] = gate_probabilities(helper, program, rows[mine])
    validation = Split(torch.from_numpy(base[0]), torch.from_numpy(side_ce), torch.from_numpy(p_out))
    tau = choose_tau(validation, s.skip_cost, s.max_usage)
    gate, trainee = train_gate(program, rows, labels, s.gate_steps)
    final_ce, _ = effects_with(program, side, tokens)
    in_sample = Split(torch.from_numpy(base[0]), torch.from_numpy(final_ce),
                      torch.from_numpy(gate_probabilities(trainee, program, rows)))
    metrics = split_metrics({"train": in_sample, "val": validation}, tau)
    metrics |= {"gate_positive_labels": float(labels.mean()), "side_history": history,
                "fold_val_loss_by_epoch": per_epoch, "epochs_chosen": best_epochs}
    return side | gate, tau, metrics


def _labels(s: TrainSettings, base: tuple, side: list, targets: np.ndarray) -> np.ndarray:
    """The gate's labels from measured effects (training/examples.py fold_labels), as 0/1 int64."""
    t = torch.from_numpy
    labels = fold_labels(s, t(base[0]), t(np.asarray(side[0])), t(base[1]), t(np.asarray(side[1])), t(targets))
    return labels.numpy().astype(np.int64)
