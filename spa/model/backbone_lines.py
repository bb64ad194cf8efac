"""A real backbone as the model of the in-process gateway host (spa/protocol/loopback.py).

Each line of the session (the main line, branch lines) is a KV cache and the
states of its positions; drafts, taps and heads are computed with the same step
functions and the same choice as the gateway's engine (`spa.model.generate`),
one row at a time, so a session driven through it commits the reference's tokens
(the numerics contract's solo path). The bytes benchmark and tests use it; the
real gateway (cloud_gateway/session.py) does the same asynchronously, batched
across sessions.
"""

import numpy as np

from spa.model.generate import choose, decode_one_token, fork_cache, prefill, truncate
from spa.model.projection import project
from spa.model.spa_rule import cloud_state
from spa.protocol.gateway import MAIN_LINE
from spa.protocol.loopback import Drafted


class BackboneLines:
    def __init__(self, backbone, prompt: str, pieces: list[bytes], taps, *, temperature: float = 0.0, seed: int = 0,
                 projection: tuple | None = None, alternatives: int = 0):
        """`taps`: the plugin's tapped layers; `projection`: (weight, bias) as uploaded for the cloud-side
        projection, or None; `alternatives`: runners-up per draft (branch drafting)."""
        self.backbone, self.prompt, self.pieces = backbone, prompt, pieces
        self.tap_layers = list(taps)
        self.temperature, self.seed = temperature, seed
        self.projection, self.alternatives = projection, alternatives
        self.lines: dict[int, tuple[object, dict]] = {}  # line -> (KV cache, states [L + 1, H] by position)

    def prefill(self) -> int:
        ids = self.backbone.encode(self.prompt)
        cache, states = prefill(self.backbone, ids)
        self.lines[MAIN_LINE] = (cache, {len(ids) - 1: states})
        return len(ids)

    def draft(self, line: int, pos: int, feed) -> Drafted:
        if line not in self.lines:  # dropped while this draft was in progress: stale, any answer will do
            return Drafted(np.zeros((1, self.backbone.hidden_size), np.float32), 0, b"", (), 0.0, 1)
        cache, states = self.lines[line]
        if feed is None:
            st, batch = states[pos], None
        else:
            st, batch = decode_one_token(self.backbone, cache, feed), 1
            states[pos] = st
        choice = choose(self.backbone.logits(st[-1]), self.temperature, self.seed, pos, self.alternatives)
        return Drafted(st[-1].numpy()[None], choice.token, self.pieces[choice.token], choice.alternatives,
                       choice.margin, batch)

    def taps(self, line: int, pos: int) -> np.ndarray:
        taps = self.lines[line][1][pos][self.tap_layers].numpy()
        return taps if self.projection is None else project(taps, *self.projection)

    def head(self, line: int, pos: int, s: np.ndarray) -> tuple[int, bytes]:
        x = cloud_state(self.lines[line][1][pos][-1], s)
        token = choose(self.backbone.logits(x), self.temperature, self.seed, pos).token
        return token, self.pieces[token]

    def fork(self, line: int, parent: int, keep: int) -> None:
        self.lines[line] = (fork_cache(self.lines[parent][0], keep), {})

    def cut(self, line: int, keep: int) -> None:
        cache, states = self.lines[line]
        truncate(cache, keep)
        self.lines[line] = (cache, {p: st for p, st in states.items() if p < keep})

    def drop(self, line: int) -> None:
        del self.lines[line]

    def forget(self, line: int, upto: int) -> None:
        states = self.lines[line][1]
        for p in [p for p in states if p <= upto]:
            del states[p]
