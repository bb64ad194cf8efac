"""Train a plugin from a person's own (document, summary) examples (`spa train --examples`; docs/DESIGN.md §1.6).

The recipe is training/train.py's (side network with sigma = 1, the gate as a
classifier of cross-fitted labels, tau on validation); what differs is where the
validation tokens come from, since a person has no validation split:

* fewer than `FOLD_BELOW` examples: **cross-fitted folds**, so that no example is
  wasted. Example i is in fold i mod `FOLDS` (5 examples: leave one out). One
  helper side network per fold trains on the other folds, keeping its best epoch
  on its own fold; its effects on its fold's tokens (loss gain, greedy token) are
  the gate's labels there, exactly as training/train.py's `cross_fitted` measures
  them. The final side network trains on every example for the number of epochs
  whose validation loss, summed over the folds, was lowest. tau is chosen on the
  out-of-fold tokens: each fold's gate probabilities come from a gate trained on
  the other folds' labels, and its losses from its helper; the final gate then
  learns every label.
* otherwise: every `VAL_EVERY`-th example (20 %) is **held out** as the validation
  split and the recipe runs as it does on ACLSum.

A person's examples are few, so the side network gets at least `MIN_SIDE_STEPS`
optimizer steps (more epochs, at most `MAX_EPOCHS`; the validation picks the
epoch) unless `--epochs` says otherwise, and tau keeps the side usage on the
validation tokens at most `MAX_USAGE`. The config records the number of
examples and the SHA-256 of their file, never their text.
"""

import dataclasses
import math
import sys

import torch
import torch.nn.functional as F

from spa.data.examples import EXAMPLES_INSTRUCTION, ExampleSet
from spa.data.prompts import chat_template, format_prompt
from spa.model.plugin import Plugin
from training.tapcache import TokenSet, pairs_token_set
from training.train import (Split, TrainSettings, choose_tau, gate_rows, helpful_flips, new_config, per_token,
                            plugin_logits, split_metrics, train_gate, train_on_tokens, train_side)

FOLD_BELOW = 20  # fewer examples than this: cross-fitted folds instead of a held-out share
FOLDS = 5
VAL_EVERY = 5  # otherwise examples 5, 10, 15, ... (every fifth: 20 %) are the validation split
MIN_SIDE_STEPS = 60  # measured on 8 examples: the folds' validation loss was lowest after 4-20 steps
MAX_EPOCHS = 15
MAX_USAGE = 0.35  # side usage tau may give on the validation tokens: room under 40 % for the shift to generation


def example_settings(seed: int = 0, quick: bool = False) -> TrainSettings:
    """The recipe's settings for examples: 384-token documents (128 with `quick`), epochs chosen by
    `side_epochs` (None here), tau at most `MAX_USAGE` side usage."""
    return TrainSettings(None, seed, max_doc_tokens=128 if quick else 384, epochs=None, max_usage=MAX_USAGE)


def example_prompts(examples: ExampleSet, template: str, instruction: str = EXAMPLES_INSTRUCTION) -> list[str]:
    return [format_prompt(template, e.document, instruction) for e in examples.examples]


def example_tokens(backbone, examples: ExampleSet, template: str) -> TokenSet:
    """Backbone states at every summary token of the examples (computed once, cached by content)."""
    return pairs_token_set(backbone, example_prompts(examples, template), [e.summary for e in examples.examples],
                           label="examples")


def validation_rule(count: int) -> str:
    return (f"{min(FOLDS, count)} cross-fitted folds (example i in fold i mod {min(FOLDS, count)})"
            if count < FOLD_BELOW else f"every {VAL_EVERY}th example held out ({count // VAL_EVERY} of {count})")


def held_out(doc_index: torch.Tensor) -> torch.Tensor:
    """Per token: whether its example is in the held-out validation share (the larger sets)."""
    return doc_index % VAL_EVERY == VAL_EVERY - 1


def side_epochs(tokens: int, batch_tokens: int) -> int:
    """Epochs giving the side network at least MIN_SIDE_STEPS optimizer steps, within [5, MAX_EPOCHS]."""
    steps_per_epoch = max(1, math.ceil(tokens / batch_tokens))
    return min(MAX_EPOCHS, max(5, math.ceil(MIN_SIDE_STEPS / steps_per_epoch)))


def train_from_examples(backbone, examples: ExampleSet, s: TrainSettings,
                        tokens: TokenSet | None = None) -> tuple[Plugin, dict]:
    """A plugin trained on the examples (`tokens`: their `example_tokens`, when already computed)."""
    template = chat_template(backbone.tokenizer)
    tokens = tokens if tokens is not None else example_tokens(backbone, examples, template)
    count = len(examples)
    print(f"examples: {count} pairs, {len(tokens)} summary tokens; validation: {validation_rule(count)}",
          file=sys.stderr, flush=True)
    config = new_config(backbone, s, tokens, template, EXAMPLES_INSTRUCTION)
    if count < FOLD_BELOW:
        plugin, metrics = train_cross_fitted(backbone, s, tokens, config)
    else:
        val = held_out(tokens.doc_index)
        train = tokens.where(~val)
        s = dataclasses.replace(s, epochs=s.epochs or side_epochs(len(train), s.batch_tokens))
        plugin, metrics = train_on_tokens(backbone, s, train, tokens.where(val), config)
    plugin.config.training["examples"] = examples.record() | {"validation": validation_rule(count)}
    return plugin, metrics


def side_effects(backbone, plugin: Plugin, data: TokenSet) -> tuple[torch.Tensor, ...]:
    """Per token, the side's effect: (backbone loss, side-on loss, backbone greedy token, side-on greedy token)."""
    def measure(states, targets):
        base, side = plugin_logits(backbone, plugin, states, 0.0), plugin_logits(backbone, plugin, states, 1.0)
        return (F.cross_entropy(base, targets, reduction="none"), F.cross_entropy(side, targets, reduction="none"),
                base.argmax(-1), side.argmax(-1))
    return per_token(data, 512, measure)


def fold_labels(s: TrainSettings, base_loss, side_loss, base_token, side_token, targets) -> torch.Tensor:
    """The gate's labels from measured effects, as training/train.py's `gate_labels` defines them."""
    if s.gate_labels == "gain":
        return base_loss - side_loss > s.skip_cost
    if s.gate_labels == "flip":
        return base_token != side_token
    return helpful_flips(base_token, side_token, targets)


def train_cross_fitted(backbone, s: TrainSettings, tokens: TokenSet, config) -> tuple[Plugin, dict]:
    """The recipe with every example in training and in validation, by folds (module docstring)."""
    torch.manual_seed(s.seed)
    folds = min(FOLDS, tokens.documents)
    fold = tokens.doc_index % folds
    s = dataclasses.replace(s, epochs=s.epochs or side_epochs(len(tokens) * (folds - 1) // folds, s.batch_tokens))
    effects = [torch.zeros(len(tokens)), torch.zeros(len(tokens)),
               torch.zeros(len(tokens), dtype=torch.long), torch.zeros(len(tokens), dtype=torch.long)]
    fold_histories = []
    for k in range(folds):
        mine = fold == k
        helper = Plugin(config)
        fold_histories.append(train_side(backbone, helper, tokens.where(~mine), tokens.where(mine), s,
                                         torch.Generator().manual_seed(s.seed + 1 + k),
                                         label=f"side network without fold {k + 1}/{folds}"))
        for whole, part in zip(effects, side_effects(backbone, helper.eval(), tokens.where(mine))):
            whole[mine] = part
    base_loss, side_loss, base_token, side_token = effects

    # The final side network: every example, for the epoch count the folds' validation preferred.
    weights = [int((fold == k).sum()) for k in range(folds)]
    per_epoch = [sum(w * h[e]["val_loss"] for w, h in zip(weights, fold_histories)) / sum(weights)
                 for e in range(s.epochs)]
    best_epochs = min(range(s.epochs), key=per_epoch.__getitem__) + 1
    plugin = Plugin(config)
    history = train_side(backbone, plugin, tokens, None, dataclasses.replace(s, epochs=best_epochs),
                         torch.Generator().manual_seed(s.seed), label="side network on every example")

    labels = fold_labels(s, base_loss, side_loss, base_token, side_token, tokens.targets)
    rows = gate_rows(backbone, config, tokens.states[:, -1])
    p_out_of_fold = torch.zeros(len(tokens))
    for k in range(folds):
        mine = fold == k
        helper = Plugin(config)
        train_gate(helper, rows[~mine], labels[~mine], s.gate_steps)
        with torch.no_grad():
            p_out_of_fold[mine] = helper.gate(rows[mine])[:, 0]
    validation = Split(base_loss, side_loss, p_out_of_fold)
    config.tau = choose_tau(validation, s.skip_cost, s.max_usage)

    train_gate(plugin, rows, labels, s.gate_steps)
    final_base, final_side, _, _ = side_effects(backbone, plugin.eval(), tokens)
    with torch.no_grad():
        in_sample = Split(final_base, final_side, plugin.gate(rows)[:, 0])
    metrics = split_metrics({"train": in_sample, "val": validation}, config.tau)
    metrics["gate_positive_labels"] = labels.float().mean().item()
    config.training = {"settings": s.record(), "side_history": history, "metrics": metrics,
                       "fold_val_loss_by_epoch": per_epoch, "epochs_chosen": best_epochs}
    return plugin.eval(), metrics
