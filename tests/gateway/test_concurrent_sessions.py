"""Load: 64 concurrent device sessions against one gateway (SmolLM2, loopback).

Every session's tokens must equal a solo in-process reference run of the same
prompt. Concurrent sessions share batched forwards (cloud_gateway/engine.py),
whose rounding may differ from a solo forward, so — docs/DESIGN.md §2,
the numerics contract — the test first keeps only prompts whose every choice has margin
(no gate p within 1e-3 of tau, top-2 logit gap > 1e-3), then asserts exact
equality. It also proves the batching ran (batched rounds, largest batch),
and that memory is bounded while the sessions run and returned after.

Prompts and generations are short to keep the test within ~2 minutes on
2 cores; `spa bench load` measures throughput and latency.
"""

import asyncio
import os
import threading
import time

import pytest

from benchmarks.load import QUESTIONS, chat_prompt
from benchmarks.stats import rss
from cloud_gateway.process import ThreadedGateway
from device_runtime.client import run_session
from spa.protocol import messages as m
from spa.protocol.limits import Limits
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate

SESSIONS = 64
MAX_NEW = 6
PROMPTS = [chat_prompt(q) for q in QUESTIONS]


def _rss() -> int:
    return rss(os.getpid())


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


@pytest.fixture(scope="module")
def references(backbone, pte):
    """Solo reference runs of the prompts whose every token has margin."""
    refs = {}
    for prompt in PROMPTS:
        ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=MAX_NEW)
        if min(ref.logit_gap) > 1e-3 and min(abs(p - pte.tau) for p in ref.gate_p) > 1e-3:
            refs[prompt] = ref
        if len(refs) == SESSIONS // 2:
            break
    assert len(refs) == SESSIONS // 2, f"only {len(refs)} prompts with margin"
    return refs


def test_batched_decode_step_matches_the_solo_step(backbone):
    """The batched step computes what the solo step computes, row by row, up to
    the rounding of a B-row matrix product (different prompt lengths, so
    different positions and cache lengths per row)."""
    import copy

    import torch

    from cloud_gateway.engine import batching_supported, decode_batch
    from spa.model.generate import decode_one_token, prefill

    assert batching_supported(backbone)
    caches = [prefill(backbone, backbone.encode(p))[0] for p in PROMPTS[:4]]
    assert len({c.get_seq_length() for c in caches}) > 1
    tokens = [504, 260, 11505, 3832]
    solo = torch.stack([decode_one_token(backbone, copy.deepcopy(c), t) for c, t in zip(caches, tokens)])
    batch_caches = [copy.deepcopy(c) for c in caches]
    batched = decode_batch(backbone, batch_caches, tokens)
    assert batched.shape == solo.shape
    rel = ((batched - solo).abs().amax(dim=-1) / solo.abs().amax(dim=-1)).max().item()
    assert rel < 1e-5, rel
    # The caches grew by exactly one position each, with the same keys as the solo step's.
    for c, b in zip(caches, batch_caches):
        assert b.get_seq_length() == c.get_seq_length() + 1
    # And the next batched step continues from them like the solo path.
    again = decode_batch(backbone, batch_caches, tokens)
    assert torch.isfinite(again).all()


def test_64_concurrent_sessions_equal_their_solo_runs_with_batched_forwards(backbone, pte, references):
    assert any(0 < sum(r.sigmas) for r in references.values())  # the side network takes part
    limits = Limits(max_sessions=SESSIONS, resume_grace_s=5)
    with ThreadedGateway(backbone, limits, max_batch=SESSIONS) as gw:
        rss_idle = _rss()
        peak = {"rss": rss_idle, "kv": 0, "sessions": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], _rss())
                kv, n = gw.call(lambda: (gw.gateway.kv_bytes(), len(gw.gateway.sessions)))
                peak["kv"], peak["sessions"] = max(peak["kv"], kv), max(peak["sessions"], n)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        jobs = [(prompt, window) for prompt in references for window in (0, 4)]  # 64 sessions

        async def all_sessions():
            return await asyncio.gather(*[
                run_session(gw.url, pte, prompt, m.Options(window=window, max_new_tokens=MAX_NEW))
                for prompt, window in jobs])

        t0 = time.perf_counter()
        results = asyncio.run(all_sessions())
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        engine = gw.call(lambda: dict(gw.gateway.engine.stats))

        for (prompt, window), result in zip(jobs, results):
            ref = references[prompt]
            assert result.tokens == ref.tokens, (prompt, window)
            assert result.sigmas == ref.sigmas, (prompt, window)
        # The optimization ran: decode steps of concurrent sessions shared forwards.
        assert engine["batched_rounds"] > 0 and engine["max_batch"] >= 16, engine
        assert engine["decode_rows"] / engine["decode_rounds"] > 2, engine
        assert sum(r.stats["gateway"]["batched_steps"] for r in results) > SESSIONS, engine
        assert peak["sessions"] >= SESSIONS // 2, peak  # really concurrent
        # Memory: bounded while running (a short KV cache per session), returned after.
        per_session = max(peak["kv"] / max(peak["sessions"], 1), 1)
        assert peak["kv"] < SESSIONS * 8 << 20, peak  # < 8 MiB of KV cache and taps per session
        assert gw.wait_until(lambda g: not g.sessions and g.kv_bytes() == 0, timeout=30)
        rss_after = _rss()
        print(f"\n{SESSIONS} sessions in {seconds:.1f} s; engine {engine}; peak KV {peak['kv'] >> 20} MiB "
              f"({per_session / 1024:.0f} KiB/session); RSS idle {rss_idle >> 20} MiB, peak {peak['rss'] >> 20} MiB, "
              f"after {rss_after >> 20} MiB")
        assert peak["rss"] - rss_idle < 1536 << 20, (peak, rss_idle)
        assert rss_after - rss_idle < max(256 << 20, (peak["rss"] - rss_idle) // 2), (rss_after, rss_idle, peak)
