"""The gateway's compute engine: the backbone, one compute thread, and batching.

Every torch call of every session runs on one compute thread: torch already
spreads one forward over the cores, and one thread keeps sessions from
fighting over them. Sessions do not call the backbone directly; they ask the
engine for

* a **prefill**: the prompt's KV cache and the states of its last position;
* a **draft**: feed one token to the session's KV cache (a one-token decode
  step) and choose the backbone's next token from the new `f_t`;
* a **head**: the token of `lm_head(norm(f + s))` (a verdict) or of
  `lm_head(norm(f))` (the first draft, right after the prefill).

Each choice comes back as a `Choice`: the token, and the top-1 minus top-2
logit margin of the logits it was chosen from (a draft's: the backbone's own,
which a margin gate on the device reads).

* a **job**: any other work on a session's caches (cut a line back, fork a
  line, a teaching forward), run at the end of the next round: after every
  draft already asked for, so a line is never cut or copied under a decode
  step that was asked for before (a settled token that changed its draft
  cuts the line while the next draft may still wait for its round).

A draft or a head may also ask for the `alternatives` runners-up of its
choice (branch drafting: the gateway drafts their continuations on forked
KV caches, as further rows of the same batched forward).

Requests that arrive while the thread is busy wait, and the next round runs
all of them together: the prefills of all waiting sessions as batched
forwards (`spa.model.generate.prefill_batch`), the decode steps of all waiting
sessions as one batched forward (`spa.model.generate.decode_batch`), and every row
that needs logits as one `lm_head` call. So throughput grows with the number
of sessions instead of each session paying a full pass over the weights per
token, and sessions that start together wait for one prefill, not for each
other's. The batched forwards run through the model's own layers
(spa/model/backbone.py), for every decoder family the backbone supports.

Numerics: a round with one row runs exactly the solo functions of
`spa.model.generate` (the ones `spa/model/reference.py` uses), so a session that runs alone
is bit-identical to the reference. Batched rows go through the same modules
and weights, but a matrix product over B rows need not round like B products
over one row: batched tokens equal solo tokens wherever the choice has margin
(tests/gateway/test_concurrent_sessions.py and tests/model/test_backbones.py check that, docs/DESIGN.md's
numerics contract).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from spa.model.generate import choose, decode_batch, decode_one_token, prefill, prefill_batch
from spa.model.token_bytes import token_pieces


@dataclass
class _Prefill:
    ids: list[int]
    result: object = None  # (cache, states [L + 1, H] of the last prompt position)


@dataclass
class _Draft:
    cache: object
    feed: int
    temperature: float
    seed: int
    pos: int  # the position being decided (the new state's position)
    alternatives: int = 0  # runners-up of the choice to return as well
    result: object = None  # (states [L + 1, H], Choice, batch size)


@dataclass
class _Head:
    x: torch.Tensor  # [H]: f or f + s
    temperature: float
    seed: int
    pos: int
    alternatives: int = 0
    result: object = None  # Choice


@dataclass
class _Job:
    fn: object
    args: tuple
    result: object = None
    error: BaseException | None = None  # raised in the session that asked, not in the round's others


def batching_supported(backbone) -> bool:
    """Whether the backbone runs several sessions' rows in one forward (any decoder family with
    sdpa or eager attention); where not, rows run one by one."""
    return bool(getattr(backbone, "supports_batching", False))


# `decode_batch(backbone, caches, tokens)` (spa.model.generate) is re-exported here: the batched decode step.
__all__ = ["Engine", "batching_supported", "decode_batch", "kv_bytes"]

# Prompts prefilled in one forward: at most this many tokens, padding included (bounds the
# activation memory of a round; prompts are grouped by length so padding stays small).
MAX_PREFILL_TOKENS = 16384


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
        self.identity = backbone.wire_info
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
            (other, _), _ = prefill_batch(backbone, [backbone.encode("and its batched step"), [1, 2]])
            decode_batch(backbone, [cache, other], [1, 2])
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-compute")
        self._prefills: list[tuple[_Prefill, asyncio.Future]] = []
        self._drafts: list[tuple[_Draft, asyncio.Future]] = []
        self._heads: list[tuple[_Head, asyncio.Future]] = []
        self._jobs: list[tuple[_Job, asyncio.Future]] = []
        self._running = False
        # Counters (read by tests and `spa bench load`): forward rounds, rows,
        # rounds with more than one row, largest batch; the same for prefills.
        self.stats = {"decode_rounds": 0, "decode_rows": 0, "batched_rounds": 0, "max_batch": 0,
                      "head_rounds": 0, "head_rows": 0,
                      "prefill_forwards": 0, "prefill_rows": 0, "max_prefill_batch": 0}

    async def run(self, fn, *args):
        """fn(*args) on the compute thread, at the end of the next round: after every draft and
        head asked for before it (a truncate or fork of a line waits for the drafts on that line)."""
        return await self._submit(self._jobs, _Job(fn, args))

    async def prefill(self, ids: list[int]):
        """The prompt's (KV cache, states [L + 1, H] of its last position), as `spa.model.generate.prefill`;
        prompts of sessions waiting together are prefilled in batched forwards."""
        return await self._submit(self._prefills, _Prefill(list(ids)))

    async def draft(self, cache, feed: int, temperature: float, seed: int, pos: int, alternatives: int = 0):
        """Feed `feed` to `cache`; (states [L + 1, H] of the new position, the `Choice` of its draft
        token with `alternatives` runners-up, batch size). Drafts asked for in the same event
        loop iteration (a session's main line and its branch lines) run in the same forward."""
        return await self._submit(self._drafts, _Draft(cache, int(feed), temperature, seed, pos, alternatives))

    async def head(self, x: torch.Tensor, temperature: float, seed: int, pos: int, alternatives: int = 0):
        """The `Choice` at `pos` from lm_head(norm(x)), with `alternatives` runners-up; x is f or f + s."""
        return await self._submit(self._heads, _Head(x, temperature, seed, pos, alternatives))

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
        prefills, self._prefills = self._prefills[: self.max_batch], self._prefills[self.max_batch :]
        drafts, self._drafts = self._drafts[: self.max_batch], self._drafts[self.max_batch :]
        heads, self._heads = self._heads[: self.max_batch], self._heads[self.max_batch :]
        # Jobs wait while drafts asked before them wait for a later round (over max_batch).
        jobs, self._jobs = (self._jobs, []) if not self._drafts and not self._heads else ([], self._jobs)
        if not prefills and not drafts and not heads and not jobs:
            self._running = False
            return
        job = self._thread.submit(self._round, [p for p, _ in prefills], [d for d, _ in drafts],
                                  [h for h, _ in heads], [j for j, _ in jobs])

        def done(j):
            try:
                loop.call_soon_threadsafe(self._finish_round, loop, j, prefills + drafts + heads + jobs)
            except RuntimeError:  # the event loop is closed: nobody waits for these
                pass

        job.add_done_callback(done)

    def _finish_round(self, loop, job, items) -> None:
        exc = RuntimeError("the engine was closed") if job.cancelled() else job.exception()
        for item, fut in items:
            if fut.done():  # the session went away meanwhile
                continue
            if exc is not None:
                fut.set_exception(exc)
            elif getattr(item, "error", None) is not None:
                fut.set_exception(item.error)
            else:
                fut.set_result(item.result)
        # Sessions woken by these results submit their next requests in this
        # loop iteration; start the next round after them.
        loop.call_soon(self._start_round, loop)

    def _prefill_groups(self, prefills: list[_Prefill]) -> list[list[_Prefill]]:
        """Prompts sorted by length, cut into forwards of at most MAX_PREFILL_TOKENS padded tokens."""
        if not self.batching:
            return [[p] for p in prefills]
        groups: list[list[_Prefill]] = []
        for p in sorted(prefills, key=lambda p: len(p.ids)):
            group = groups[-1] if groups else None
            # Sorted ascending, so this prompt is the group's longest: the padded size is (n + 1) * len.
            if group is None or (len(group) + 1) * len(p.ids) > MAX_PREFILL_TOKENS:
                groups.append([p])
            else:
                group.append(p)
        return groups

    def _round(self, prefills: list[_Prefill], drafts: list[_Draft], heads: list[_Head], jobs: list[_Job]) -> None:
        """On the compute thread: batched prefills, one batched decode step, one lm_head over every
        row, then the jobs in the order they were asked for."""
        self._forwards(prefills, drafts, heads)
        for j in jobs:
            try:
                j.result = j.fn(*j.args)
            except Exception as e:  # noqa: BLE001 — the asking session gets it
                j.error = e

    def _forwards(self, prefills: list[_Prefill], drafts: list[_Draft], heads: list[_Head]) -> None:
        bb = self.backbone
        with torch.inference_mode():
            for group in self._prefill_groups(prefills):
                for p, result in zip(group, prefill_batch(bb, [p.ids for p in group])):  # one prompt: solo prefill
                    p.result = result
                self.stats["prefill_forwards"] += 1
                self.stats["prefill_rows"] += len(group)
                self.stats["max_prefill_batch"] = max(self.stats["max_prefill_batch"], len(group))
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
            if not rows:
                return
            if len(rows) == 1:
                logits = [bb.logits(rows[0])]  # exactly the solo path (spa/model/reference.py)
            else:
                logits = bb.logits(torch.stack(rows))
            for d, lg in zip(drafts, logits[: len(drafts)]):
                d.result = (d.result, choose(lg, d.temperature, d.seed, d.pos, d.alternatives), len(drafts))
            for h, lg in zip(heads, logits[len(drafts) :]):
                h.result = choose(lg, h.temperature, h.seed, h.pos, h.alternatives)
            if heads:
                self.stats["head_rounds"] += 1
                self.stats["head_rows"] += len(heads)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
