"""LoRA on the backbone from a person's examples: the fine-tuning a person could ask of the cloud instead of SPA.

PEFT LoRA (rank `RANK`, alpha `ALPHA`, on the attention's query and value
projections of every layer) learns the same targets as the side network (each
example's prompt with the generic instruction, then its summary and EOS; loss
on the summary tokens only), and is validated by the same rule as `spa train
--examples` (training/examples.py): under `FOLD_BELOW` examples, cross-fitted
folds choose the number of epochs and the final adapter trains on every
example; otherwise every fifth example is held out and the best epoch is kept.
The adapter is then merged into a copy of the backbone, which generates like
the backbone (evaluation/baselines.py `greedy`). Served that way the cloud holds
the person's model: no privacy, and one model per person.
"""

import copy
import sys

import torch
from tqdm import tqdm

from spa.model.backbone import Backbone, BackboneIdentity
from training.examples import FOLD_BELOW, FOLDS, held_out

RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")
LR = 1e-3
EPOCHS = 4  # at most; the validation picks how many


def sequences(backbone, prompts: list[str], summaries: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids [1, T], labels [1, T]) per example: labels are -100 on the prompt, the summary + EOS after it."""
    eos = min(backbone.eos_token_ids)
    out = []
    for prompt, summary in zip(prompts, summaries):
        p, s = backbone.encode(prompt), backbone.encode(summary) + [eos]
        out.append((torch.tensor([p + s]), torch.tensor([[-100] * len(p) + s])))
    return out


def fit(backbone, train: list, val: list, epochs: int, seed: int, label: str):
    """A fresh adapter on a copy of the backbone's model, trained on `train` one example per step (AdamW);
    with `val`, the epoch with the lowest validation loss is kept. Returns (PEFT model, validation
    loss per epoch)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(backbone.model),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state = [], float("inf"), None
    for _ in tqdm(range(epochs), desc=f"  LoRA {label}: epochs", unit="epoch", file=sys.stderr, leave=False):
        model.train()
        for i in torch.randperm(len(train), generator=gen).tolist():
            ids, labels = train[i]
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val:
            history.append(validation_loss(model, val))
            if history[-1] < best:
                best, best_state = history[-1], {n: p.detach().clone() for n, p in trainable.items()}
    if best_state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
    return model, history


def validation_loss(model, val: list) -> float:
    """Mean cross-entropy over every summary token of `val` (token-weighted, as the side network's)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in val:
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def lora_backbone(backbone, prompts: list[str], summaries: list[str], seed: int = 0) -> tuple[Backbone, dict]:
    """(a Backbone with the person's merged adapter, what was trained and how it was validated)."""
    data = sequences(backbone, prompts, summaries)
    count = len(data)
    if count < FOLD_BELOW:
        folds = min(FOLDS, count)
        per_epoch = [0.0] * EPOCHS
        for k in range(folds):
            train = [d for i, d in enumerate(data) if i % folds != k]
            val = [d for i, d in enumerate(data) if i % folds == k]
            weight = sum(int((labels[:, 1:] != -100).sum()) for _, labels in val)
            _, history = fit(backbone, train, val, EPOCHS, seed + 1 + k, f"without fold {k + 1}/{folds}")
            per_epoch = [a + weight * h for a, h in zip(per_epoch, history)]
        epochs = min(range(EPOCHS), key=per_epoch.__getitem__) + 1
        model, _ = fit(backbone, data, [], epochs, seed, "on every example")
        validation = f"{folds} cross-fitted folds chose {epochs} of {EPOCHS} epochs"
    else:
        val_mask = held_out(torch.arange(count))
        train = [d for d, v in zip(data, val_mask) if not v]
        val = [d for d, v in zip(data, val_mask) if v]
        model, history = fit(backbone, train, val, EPOCHS, seed, "held-out validation")
        epochs = min(range(EPOCHS), key=history.__getitem__) + 1
        validation = f"every fifth example held out; kept epoch {epochs} of {EPOCHS}"
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    merged = model.merge_and_unload().eval()
    ident = backbone.identity
    identity = BackboneIdentity(f"{ident.name}+LoRA", f"{ident.fingerprint}+lora", ident.num_layers,
                                ident.hidden_size, ident.vocab_size)
    record = {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS), "lr": LR, "max_epochs": EPOCHS,
              "epochs": epochs, "validation": validation,
              "trainable_parameters": trainable}
    return Backbone(merged, backbone.tokenizer, identity), record
