"""The gateway's compute engine: the backbone, one compute thread, and batching.

Every torch call of every session runs on one compute thread: torch already
spreads one forward over the cores, and one thread keeps sessions from
fighting over them. Sessions do not call the backbone directly; they ask the
engine for

* a **draft**: feed one token to the session's KV cache (a one-token decode
  step) and choose the backbone's next token from the new `f_t`;
* a **head**: the token of `lm_head(norm(f + s))` (a verdict) or of
  `lm_head(norm(f))` (the first draft, right after the prefill).

Requests that arrive while the thread is busy wait, and the next round runs
all of them together: the decode steps of all waiting sessions as one batched
forward (`decode_batch`), and every row that needs logits as one `lm_head`
call. So throughput grows with the number of sessions instead of each session
paying a full pass over the weights per token.

Numerics: a round with one row runs exactly the solo functions of
`spa.generate` (the ones `spa/reference.py` uses), so a session that runs alone
is bit-identical to the reference. Batched rows go through the same modules
and weights, but a matrix product over B rows need not round like B products
over one row: batched tokens equal solo tokens wherever the choice has margin
(tests/test_load.py checks that: docs/DESIGN.md §2, the numerics contract).

Each session keeps its own transformers `DynamicCache` (different lengths,
truncated on rollback). The batched step runs the projections, rotary
embedding, MLP and norms over all rows at once and the attention row by row
against each session's cache, with the same attention function the solo path
uses (sdpa over one query).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from spa.generate import choose_token, decode_one_token, prefill
from spa.protocol import messages as m
from spa.tokens import token_pieces


@dataclass
class _Draft:
    cache: object
    feed: int
    temperature: float
    seed: int
    pos: int  # the position being decided (the new state's position)
    result: object = None  # (states [L + 1, H], token, batch size)


@dataclass
class _Head:
    x: torch.Tensor  # [H]: f or f + s
    temperature: float
    seed: int
    pos: int
    result: object = None  # token


def batching_supported(backbone) -> bool:
    """The batched step reimplements the Llama decoder layer; anything else runs solo."""
    layers = backbone._layers
    return (
        all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)
        and all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in layers)
        and backbone.model.config._attn_implementation in ("sdpa", "eager")
    )


@torch.inference_mode()
def decode_batch(backbone, caches: list, tokens: list[int]) -> torch.Tensor:
    """One decode step for B sessions: token b is fed to caches[b] at that cache's
    next position. Returns the states [B, L + 1, H] (as `decode_one_token`, per row)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    config = backbone.model.config
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    batch = len(caches)
    positions = torch.tensor([[c.get_seq_length()] for c in caches])
    hidden = backbone._embed(torch.tensor(tokens).view(batch, 1))  # [B, 1, H]
    cos, sin = backbone._rotary(hidden, position_ids=positions)  # per-row positions
    states = [hidden]
    for layer in backbone._layers:
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        shape = (batch, 1, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rows = []
        for b, cache in enumerate(caches):  # each session attends to its own cache
            keys, values = cache.update(k[b : b + 1], v[b : b + 1], attn.layer_idx)
            out, _ = attention(attn, q[b : b + 1], keys, values, None, dropout=0.0, scaling=attn.scaling)
            rows.append(out)
        hidden = hidden + attn.o_proj(torch.cat(rows).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        states.append(hidden)
    return torch.stack(states, dim=2)[:, -1]


def kv_bytes(cache) -> int:
    """Bytes held by one session's KV cache."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Engine:
    """The backbone plus the one thread that runs it, batching concurrent sessions."""

    def __init__(self, backbone, max_batch: int = 64, batching: bool = True):
        self.backbone = backbone
        ident = backbone.identity
        self.identity = m.Backbone(ident.name, ident.fingerprint, ident.num_layers, ident.hidden_size)
        self.eos_ids = backbone.eos_token_ids
        self.pieces = token_pieces(backbone.tokenizer)
        # No token stands for more characters than this: a prompt longer than
        # max_prompt_tokens * max_token_chars is refused without tokenizing it.
        tokens = backbone.tokenizer.convert_ids_to_tokens(list(range(len(backbone.tokenizer))))
        self.max_token_chars = 1 + max(max(len(t or "") for t in tokens), max(map(len, self.pieces)))
        self.max_batch = max(1, int(max_batch))
        self.batching = batching and self.max_batch > 1 and batching_supported(backbone)
        # torch initializes lazily on the first forward (~seconds): pay it before
        # the first device does, so time to first token measures the session.
        cache, _ = prefill(backbone, backbone.encode("warm up the backbone"))
        decode_one_token(backbone, cache, 0)
        if self.batching:
            other, _ = prefill(backbone, backbone.encode("and its batched step"))
            decode_batch(backbone, [cache, other], [1, 2])
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-compute")
        self._drafts: list[tuple[_Draft, asyncio.Future]] = []
        self._heads: list[tuple[_Head, asyncio.Future]] = []
        self._running = False
        # Counters (read by tests and `spa bench load`): forward rounds, rows,
        # rounds with more than one row, largest batch.
        self.stats = {"decode_rounds": 0, "decode_rows": 0, "batched_rounds": 0, "max_batch": 0,
                      "head_rounds": 0, "head_rows": 0}

    async def run(self, fn, *args):
        """Any other backbone work (prefill, truncate), on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def draft(self, cache, feed: int, temperature: float, seed: int, pos: int):
        """Feed `feed` to `cache`; (states [L + 1, H] of the new position, its draft token, batch size)."""
        return await self._submit(self._drafts, _Draft(cache, int(feed), temperature, seed, pos))

    async def head(self, x: torch.Tensor, temperature: float, seed: int, pos: int) -> int:
        """The token chosen at `pos` from lm_head(norm(x)); x is f or f + s."""
        return await self._submit(self._heads, _Head(x, temperature, seed, pos))

    def _submit(self, queue: list, item) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        queue.append((item, fut))
        if not self._running:
            # Let every session woken in this loop iteration add its request first.
            self._running = True
            loop.call_soon(self._start_round, loop)
        return fut

    def _start_round(self, loop) -> None:
        drafts, self._drafts = self._drafts[: self.max_batch], self._drafts[self.max_batch :]
        heads, self._heads = self._heads[: self.max_batch], self._heads[self.max_batch :]
        if not drafts and not heads:
            self._running = False
            return
        job = self._thread.submit(self._round, [d for d, _ in drafts], [h for h, _ in heads])

        def done(j):
            try:
                loop.call_soon_threadsafe(self._finish_round, loop, j, drafts, heads)
            except RuntimeError:  # the event loop is closed: nobody waits for these
                pass

        job.add_done_callback(done)

    def _finish_round(self, loop, job, drafts, heads) -> None:
        exc = RuntimeError("the engine was closed") if job.cancelled() else job.exception()
        for item, fut in drafts + heads:
            if fut.done():  # the session went away meanwhile
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(item.result)
        # Sessions woken by these results submit their next requests in this
        # loop iteration; start the next round after them.
        loop.call_soon(self._start_round, loop)

    def _round(self, drafts: list[_Draft], heads: list[_Head]) -> None:
        """On the compute thread: one batched decode step, then one lm_head over every row."""
        bb = self.backbone
        with torch.inference_mode():
            if len(drafts) == 1:
                d = drafts[0]
                d.result = decode_one_token(bb, d.cache, d.feed)
            elif drafts:
                if self.batching:
                    states = decode_batch(bb, [d.cache for d in drafts], [d.feed for d in drafts])
                else:
                    states = torch.stack([decode_one_token(bb, d.cache, d.feed) for d in drafts])
                for d, st in zip(drafts, states):
                    d.result = st
            if drafts:
                self.stats["decode_rounds"] += 1
                self.stats["decode_rows"] += len(drafts)
                self.stats["batched_rounds"] += len(drafts) > 1
                self.stats["max_batch"] = max(self.stats["max_batch"], len(drafts))
            rows = [d.result[-1] for d in drafts] + [h.x for h in heads]
            if len(rows) == 1:
                logits = [bb.logits(rows[0])]  # exactly the solo path (spa/reference.py)
            else:
                logits = bb.logits(torch.stack(rows))
            for d, lg in zip(drafts, logits[: len(drafts)]):
                d.result = (d.result, choose_token(lg, d.temperature, d.seed, d.pos), len(drafts))
            for h, lg in zip(heads, logits[len(drafts) :]):
                h.result = choose_token(lg, h.temperature, h.seed, h.pos)
            if heads:
                self.stats["head_rounds"] += 1
                self.stats["head_rows"] += len(heads)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
