"""Generation step functions shared by the cloud gateway and the in-process reference.

Numerics contract (docs/DESIGN.md §2): "same tokens" means bit-identical tokens, so the
gateway and the reference must run the *same* computations: one prefill of
the prompt, then one-token KV-cache steps. (A one-token step and a full
forward over the same sequence differ by ~1e-4: never mix them.)

Sampling noise for position t comes from (seed, t) alone, never from a
stateful generator, so a position recomputed after a rollback samples the
same way.
"""

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Positions index the sequence: the prompt holds positions 0..P-1, and the
# state at position t decides token x_{t+1}. The first generated token comes
# from position P-1.


def prefill(backbone, prompt_ids: list[int]):
    """(KV cache, states [L + 1, H] of the last prompt position)."""
    cache = backbone.new_cache()
    states = backbone.forward(torch.tensor([prompt_ids]), cache, last_only=True)
    return cache, states[0, -1]


def decode_one_token(backbone, cache, token: int) -> torch.Tensor:
    """Feed one token at the next position; its states [L + 1, H]."""
    return backbone.forward(torch.tensor([[token]]), cache)[0, -1]


# The batched counterparts: one forward for several sessions. A batch of one
# runs exactly the solo function above (a lone session is bit-identical to
# the reference); more rows go through the same modules and weights, but a
# matrix product over B rows need not round like B products over one row, so
# batched tokens equal solo tokens wherever the choice has margin.


def prefill_batch(backbone, prompts: list[list[int]]) -> list[tuple[object, torch.Tensor]]:
    """`prefill` for several prompts: [(KV cache, states [L + 1, H] of its last position)] in prompt order."""
    if len(prompts) == 1:
        return [prefill(backbone, prompts[0])]
    return backbone.prefill_rows(prompts)


def decode_batch(backbone, caches: list, tokens: list[int]) -> torch.Tensor:
    """`decode_one_token` for several sessions (token b into caches[b], each at its own next
    position): states [B, L + 1, H]. Rows run one by one where the backbone cannot batch them."""
    if len(caches) == 1:
        return decode_one_token(backbone, caches[0], tokens[0])[None]
    if not backbone.supports_batching:
        return torch.stack([decode_one_token(backbone, c, t) for c, t in zip(caches, tokens)])
    return backbone.decode_rows(caches, tokens)


def generate(backbone, prompt_ids: list[int], choose: Callable[[int, torch.Tensor], list[int]], max_new_tokens: int,
             rows: int = 1, eos_ids=None) -> Iterator[tuple[int, list[int], list[int]]]:
    """The generation loop, written once (gpt-fast's shape): prefill the prompt, then one decode step
    per position, for `rows` continuations of the same prompt decoded as one batch.

    `choose(pos, states)` picks the token of each live row at position `pos` from its states
    (`states` [B, L + 1, H], one per live row; `f_t` is `states[:, -1]`) and returns B token ids.
    Yields `(pos, live, tokens)` after each choice: the indices of the rows still generating and the
    tokens just chosen for them. A row stops after an EOS token (`eos_ids`, by default the
    backbone's; `()` never stops early); every row stops after `max_new_tokens`. With one row this is exactly `prefill` then `decode_one_token` (the
    numerics contract's solo path); more rows are batched (equal where the choices have margin).
    A consumer that stops early just stops iterating."""
    eos = backbone.eos_token_ids if eos_ids is None else eos_ids
    cache, last = prefill(backbone, prompt_ids)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    states = last.unsqueeze(0).expand(rows, -1, -1)
    live, pos = list(range(rows)), len(prompt_ids) - 1
    for n in range(max_new_tokens):
        tokens = [int(t) for t in choose(pos, states)]
        yield pos, live, tokens
        keep = [i for i, token in enumerate(tokens) if token not in eos]
        if not keep or n + 1 == max_new_tokens:
            return
        if rows == 1:
            states = decode_one_token(backbone, cache, tokens[0])[None]
        else:
            if len(keep) < len(live):
                cache.batch_select_indices(torch.tensor(keep))
            states = backbone.forward(torch.tensor([[tokens[i]] for i in keep]), cache)[:, -1]
        live = [live[i] for i in keep]
        pos += 1


def finish_reason(tokens: list[int], eos_ids) -> str:
    """Why a generation that produced `tokens` stopped: "eos" or "max_tokens"."""
    return "eos" if tokens and tokens[-1] in eos_ids else "max_tokens"


def truncate(cache, positions: int) -> None:
    """Keep the KV cache of positions 0..positions-1 (a rollback)."""
    extra = cache.get_seq_length() - positions
    if extra < 0:
        raise ValueError(f"cannot truncate a cache of {cache.get_seq_length()} positions to {positions}")
    cache.crop(-extra)  # transformers 5: crop(-n) removes the last n positions


def fork_cache(cache, positions: int):
    """A copy of the KV cache of positions 0..positions-1 that grows independently: a branch line
    (the gateway drafts the continuation of an alternative token on it, docs/PROTOCOL.md §6).
    The copy holds the same values as `cache` after `truncate(cache, positions)`."""
    fork = copy.deepcopy(cache)
    truncate(fork, positions)
    return fork


def _noise_seed(seed: int, pos: int) -> int:
    return (seed * 1_000_003 + pos * 7_919 + 1) % (1 << 62)


def _scores(logits: torch.Tensor, temperature: float, seed: int, pos: int) -> torch.Tensor:
    """What the token choice maximizes: the logits (greedy), or logits / T plus Gumbel noise from (seed, pos)."""
    if temperature == 0:
        return logits
    gen = torch.Generator().manual_seed(_noise_seed(seed, pos))
    uniform = torch.rand(logits.shape[-1], generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    return logits.to(torch.float64) / temperature + gumbel


def choose_token(logits: torch.Tensor, temperature: float, seed: int, pos: int) -> int:
    """Greedy for temperature 0; otherwise Gumbel-max sampling with noise from (seed, pos)."""
    return int(torch.argmax(_scores(logits, temperature, seed, pos)))


def logit_margin(logits: torch.Tensor) -> float:
    """The backbone's top-1 minus top-2 logit, in float32 (>= 0): the margin gate's second input
    (spa/model/plugin.py, MARGIN_GATE). Computed from the logits of f_t alone, whatever the temperature;
    the gateway sends exactly this value with the step, so the device's gate reads what the
    reference's does."""
    return float(logit_margins(logits.reshape(1, -1))[0])


def logit_margins(logits: torch.Tensor) -> torch.Tensor:
    """`logit_margin` of each row of logits [N, V], as float32 [N]."""
    top = torch.topk(logits.to(torch.float32), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def choose_token_and_alternatives(logits: torch.Tensor, temperature: float, seed: int, pos: int,
                                  k: int) -> tuple[int, tuple[int, ...]]:
    """`choose_token`, and the k runners-up of the same choice, best first (the next-best logits,
    or under sampling the next-best noised scores: the same noise decides a verdict at pos, so
    these are the tokens a side output most likely turns the choice to)."""
    scores = _scores(logits, temperature, seed, pos)
    token = int(torch.argmax(scores))
    if k <= 0:
        return token, ()
    top = torch.topk(scores, min(k + 1, scores.shape[-1])).indices.tolist()
    return token, tuple(t for t in top if t != token)[:k]


@dataclass(frozen=True)
class Choice:
    """A token chosen from one row's logits, as the gateway sends it."""

    token: int
    alternatives: tuple[int, ...]  # the runners-up asked for, best first (branch drafting)
    margin: float  # top-1 minus top-2 logit of those logits (`logit_margin`)


def choose(logits: torch.Tensor, temperature: float, seed: int, pos: int, alternatives: int = 0) -> Choice:
    token, runners_up = choose_token_and_alternatives(logits, temperature, seed, pos, alternatives)
    return Choice(token, runners_up, logit_margin(logits))
