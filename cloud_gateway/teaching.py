"""The gateway's half of on-device learning: a teaching connection (docs/PROTOCOL.md §6, "Teaching").

A device that learns from its user's examples asks, for each example, for the backbone's
states at the positions that predict the example's summary tokens: one forward over the
prompt and the summary (teacher forcing), exactly the forward `spa train` caches
(training/tapcache.py). The connection's first message is a `teach` instead of a `hello`;
each `teach` is answered by `states` messages of consecutive rows; `bye` (or a close frame)
ends it.

The same rules as generation: the auth token and the plugin's backbone are checked per
`teach` (`unauthorized`, `backbone_mismatch`), a teaching connection counts as a session
toward `max_sessions` (`busy`), the prompt is bounded by `max_prompt_tokens` and the
summary by `max_teach_tokens` (`limit`), frames by `max_frame_bytes`, and silence by
`idle_timeout_s`. The forwards run on the engine's one compute thread, between generation
rounds; `teach`es of several connections waiting together run as one batched forward.
The cloud-side projection works as in a session (by hash, `upload_needed`, in memory only).

What the gateway learns: the example's prompt and summary (as it sees every prompt) and
that this plugin is being taught; never the plugin's weights or gradients.
"""

import asyncio
import hmac
import logging
import weakref

import numpy as np
import torch

from spa.model.generate import logit_margins
from spa.model.plugin import rms
from spa.protocol import codec
from spa.protocol import messages as m
from spa.protocol.errors import NORMAL_CLOSE, ProtocolError
from spa.protocol.gateway.handshake import check_identity, check_prompt, floats

log = logging.getLogger("spa.gateway")

MAX_BATCH_TOKENS = 4096  # tokens of one batched teaching forward (its states are held for all of them)
_active: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # gateway -> open teaching connections
_batchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # gateway -> its Batcher


def teaching_connections(gateway) -> int:
    """Teaching connections open on this gateway: they count toward max_sessions as sessions do."""
    return _active.get(gateway, 0)


async def serve_teaching(gateway, connection, first: dict) -> None:
    """Serve a teaching connection whose first map is `first` (a teach); ProtocolError for the caller
    to send (cloud_gateway/server.py)."""
    if connection.frames.first_form == "none":
        connection.frames.answer_in("none")  # a device without zstd reads our answers
    if len(gateway.sessions) + _active.get(gateway, 0) >= gateway.limits.max_sessions:
        raise ProtocolError("busy", f"the gateway serves {gateway.limits.max_sessions} sessions already; retry later")
    _active[gateway] = _active.get(gateway, 0) + 1
    batcher = _batchers.get(gateway) or _batchers.setdefault(gateway, Batcher(gateway.engine))
    try:
        msg = first
        while True:
            parsed = m.parse(msg, "gateway")
            if isinstance(parsed, m.Bye):
                await connection.close(NORMAL_CLOSE)
                return
            if not isinstance(parsed, m.Teach):
                raise ProtocolError("out_of_order", f"a teaching connection carries teach and bye, not {parsed.TYPE}")
            for states in await answer(gateway, batcher, parsed):
                await connection.send(states.to_dict())
            msg = await connection.recv(gateway.limits.idle_timeout_s)
    finally:
        _active[gateway] -= 1


async def answer(gateway, batcher: "Batcher", teach: m.Teach) -> list[m.States]:
    """The states messages answering one teach (checks first, as for a hello)."""
    engine, limits = gateway.engine, gateway.limits
    check_identity(teach, engine.identity, gateway.auth_token)
    projection = None if teach.projection is None else teach_projection(
        teach.projection, len(teach.plugin.taps), engine.identity.hidden_size, gateway.projections)
    if len(teach.prompt) > limits.max_prompt_tokens * engine.max_token_chars:
        raise ProtocolError("limit", f"prompt of {len(teach.prompt)} characters is over {limits.max_prompt_tokens} tokens")
    if len(teach.summary) > limits.max_teach_tokens * engine.max_token_chars:
        raise ProtocolError("limit", f"summary of {len(teach.summary)} characters is over {limits.max_teach_tokens} "
                                     f"tokens")
    prompt, summary = await engine.run(encode, engine.backbone, teach.prompt, teach.summary, engine.eos_ids)
    check_prompt(len(prompt), limits)
    if len(summary) > limits.max_teach_tokens:
        raise ProtocolError("limit", f"summary has {len(summary)} tokens with the end of sequence; "
                                     f"max_teach_tokens is {limits.max_teach_tokens}")
    f, taps, margins = await batcher.states(prompt, summary, list(teach.plugin.taps), teach.margin)
    if projection is not None:
        taps = project_rows(taps, *projection)
    return states_messages(teach, len(prompt), summary, f, taps, margins, limits.max_frame_bytes)


def encode(backbone, prompt: str, summary: str, eos_ids) -> tuple[list[int], list[int]]:
    """(prompt ids, summary ids + EOS): as training/tapcache.py tokenizes an example."""
    return backbone.encode(prompt), backbone.encode(summary) + [min(eos_ids)]


def teach_projection(proj: m.Projection, n_taps: int, hidden: int, projections) -> tuple[np.ndarray, np.ndarray]:
    """The projection weights a teach names (by hash, from the gateway's cache) or carries (checked and kept
    there), as hello.projection is read (spa/protocol/gateway/handshake.py)."""
    shape = (n_taps, proj.rank)
    if proj.weight is None:
        held = projections.get(proj.hash)
        if held is None:
            raise ProtocolError("upload_needed", "teach.projection.hash: this gateway does not hold these weights; "
                                                 "send teach.projection.weight and .bias")
        if held[0].shape != (*shape, hidden):
            raise ProtocolError("bad_field", "teach.projection.hash: the weights it names are for another rank or taps")
        return held
    if proj.hash is not None and not hmac.compare_digest(proj.hash, m.Projection.hash_of(proj.weight, proj.bias)):
        raise ProtocolError("bad_field", "teach.projection.hash: not the hash of the weights sent")
    weights = (floats(proj.weight, "<f2", (*shape, hidden), "teach.projection.weight"),
               floats(proj.bias, "<f4", shape, "teach.projection.bias"))
    projections.put(proj.digest, weights)
    return weights


def project_rows(taps: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """d = rms(T) W^T + b for every row's taps [n, T, H] -> [n, T, r] (spa/model/projection.py's project, batched)."""
    x = rms(torch.from_numpy(np.ascontiguousarray(taps, np.float32)))
    out = torch.einsum("nth,trh->ntr", x, torch.from_numpy(weight)) + torch.from_numpy(bias)
    return out.numpy()


def states_messages(teach: m.Teach, prompt_tokens: int, summary: list[int], f: np.ndarray, taps: np.ndarray,
                    margins: np.ndarray | None, max_frame_bytes: int) -> list[m.States]:
    """The answer in messages of at most about half a frame each."""
    n, n_taps, cols = taps.shape
    per_value = {"f32": 4.0, "int8": 1.0, "int4": 0.5}[teach.codec]
    per_row = (n_taps * cols + f.shape[1]) * per_value + (n_taps + 1) * (4 + 6 * teach.outliers) + 8
    rows = max(1, int(max_frame_bytes // 2 // per_row))
    out = []
    for first in range(0, n, rows):
        part = slice(first, first + rows)
        k = len(range(n)[part])
        out.append(m.States(
            first, n, prompt_tokens, np.asarray(summary[part], "<u4").tobytes(),
            codec.encode(f[part], teach.codec, teach.outliers),
            codec.encode(taps[part].reshape(k * n_taps, cols), teach.codec, teach.outliers),
            None if margins is None else np.asarray(margins[part], "<f4").tobytes()))
    return out


class Batcher:
    """Teaching forwards of connections waiting together, run as one job on the compute thread."""

    def __init__(self, engine):
        self.engine = engine
        self.waiting: list[tuple[list[int], int, list[int], bool, asyncio.Future]] = []

    async def states(self, prompt: list[int], summary: list[int], taps: list[int], margin: bool):
        """(f [n, H], taps [n, T, H], margins [n] or None) at the n summary-predicting positions."""
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((prompt + summary, len(prompt), taps, margin, fut))
        if len(self.waiting) == 1:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._run()))
        return await fut

    async def _run(self) -> None:
        batch, self.waiting = self._take(self.waiting)
        if self.waiting:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._run()))
        try:
            results = await self.engine.run(forward, self.engine.backbone, [(ids, p, t, mg) for ids, p, t, mg, _ in batch])
        except Exception as exc:  # noqa: BLE001 (the waiting connections get it)
            for *_, fut in batch:
                fut.done() or fut.set_exception(exc)
            return
        for (*_, fut), result in zip(batch, results):
            fut.done() or fut.set_result(result)

    @staticmethod
    def _take(waiting: list):
        """The first requests up to MAX_BATCH_TOKENS padded tokens (at least one), and the rest."""
        batch, width = [], 0
        for i, item in enumerate(waiting):
            width = max(width, len(item[0]))
            if batch and width * (len(batch) + 1) > MAX_BATCH_TOKENS:
                return batch, waiting[i:]
            batch.append(item)
        return batch, []


def forward(backbone, requests: list) -> list[tuple]:
    """On the compute thread: the states of each (ids, prompt length, taps, margin) request. One request
    is the solo forward `spa train` caches; several are one right-padded forward (a real position never
    attends to the pads after it; equal to the solo states where the rounding of a batch allows)."""
    with torch.inference_mode():
        if len(requests) == 1:
            all_states = [backbone.forward(torch.tensor([requests[0][0]]), backbone.new_cache())[0]]
        else:
            width = max(len(ids) for ids, *_ in requests)
            ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, *_ in requests])
            mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in requests])
            all_states = backbone.forward(ids, backbone.new_cache(), attention_mask=mask)
        out = []
        for (ids, p, taps, margin), states in zip(requests, all_states):
            rows = states[p - 1:len(ids) - 1]  # position P - 1 + i predicts summary token i
            f = rows[:, -1]
            margins = logit_margins(backbone.logits(f)).numpy().astype(np.float32) if margin else None
            out.append((f.numpy().copy(), rows[:, taps].numpy().copy(), margins))
        return out
