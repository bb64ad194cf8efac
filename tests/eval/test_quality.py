"""The evaluation's own code: Rouge-L, usage counting, and the batched generator's exactness."""

import pytest

from device_runtime.documents import device_prompt, load_document
from evaluation.batched import ALWAYS, NEVER, Row, generate_rows
from evaluation.rouge import mean_rouge_l, rouge_l, side_usage
from evaluation.tune import USAGE_CANDIDATES, best_usage, tune_usage, usage_taus
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from training.train import TrainSettings


def test_rouge_l_on_known_pairs():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert rouge_l("completely different words", "the cat sat on the mat") == 0.0
    # LCS "the cat on the mat": 5 of 6 tokens on each side -> F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6)
    # stemming: "proposes"/"proposed" match "propos"
    assert rouge_l("they proposed methods", "they proposes method") == pytest.approx(100.0)
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])


def test_side_usage_counts_tokens_not_summaries():
    assert side_usage([[1, 0, 1], [0]]) == 0.5  # 2 of 4 tokens, not the mean of 2/3 and 0
    assert side_usage([[0, 0], [0]]) == 0.0
    assert side_usage([]) == 0.0


def test_batched_rows_give_the_reference_tokens(backbone, pte_path):
    """Batched decoding differs from one-row decoding in the last bits, so first
    assert margin (numerics contract), then identical tokens, row by row."""
    pte = PtePlugin(pte_path)
    prompt = device_prompt(pte.config, load_document("aclsum:test:0", pte.config.max_doc_tokens))
    ids = backbone.encode(prompt)
    taus = [0.5, 0.3, 0.7, 0.1, 0.9]
    rows = [Row("backbone", None, NEVER), Row("always", pte, ALWAYS)] + [Row(f"tau {t}", pte, t) for t in taus]
    batched = generate_rows(backbone, ids, rows, max_new_tokens=24)
    checked_gates = 0
    for row, got in zip(rows, batched):
        if row.plugin is None:
            ref = reference_generate(backbone, pte, prompt, tau=NEVER, max_new_tokens=24)
        else:
            ref = reference_generate(backbone, pte, prompt, tau=row.tau, max_new_tokens=24)
        assert min(ref.logit_gap) > 1e-3, row.name  # margin on every token choice
        if row.plugin is not None and row.tau not in (ALWAYS, NEVER):
            if min(abs(p - row.tau) for p in ref.gate_p) <= 1e-3:
                continue  # no margin at this tau: this row proves nothing either way
            checked_gates += 1
        assert got.tokens == ref.tokens, row.name
        assert got.sigmas == ref.sigmas, row.name
    assert checked_gates >= 2
    assert len({len(g.tokens) for g in batched}) > 1  # rows finished at different steps and left the batch
    assert any(0 < sum(g.sigmas) < len(g.sigmas) for g in batched)  # a row where the gate really decided


def test_best_usage_prefers_rouge_among_eligible_then_less_side():
    generated = {0.2: 0.25, 0.3: 0.35, 0.45: 0.44, 0.5: 0.52}
    assert best_usage({0.2: 30.0, 0.3: 31.5, 0.45: 31.0, 0.5: 40.0}, generated) == 0.3  # 0.5 uses too much side
    assert best_usage({0.2: 31.5, 0.3: 31.5, 0.45: 31.5, 0.5: 31.5}, generated) == 0.2  # a tie costs no extra side
    assert best_usage({0.2: 1.0, 0.5: 2.0}, {0.2: 0.6, 0.5: 0.9}) == 0.2  # none eligible: the least side


def test_tune_usage_generates_validation_summaries_per_candidate(backbone, pte_path):
    pte = PtePlugin(pte_path)
    settings = TrainSettings.quick(pte.config.profile)
    taps = usage_taus(backbone, pte, settings, USAGE_CANDIDATES)
    assert list(taps) == list(USAGE_CANDIDATES)
    assert all(a >= b for a, b in zip(taps.values(), list(taps.values())[1:]))  # more usage, lower tau
    lines = []
    tuned = tune_usage(backbone, {pte.config.profile: (pte, settings)}, papers=1, max_new_tokens=4, log=lines.append)
    record = tuned[pte.config.profile]
    assert record["val_papers"] == 1 and record["max_new_tokens"] == 4
    rouge = {float(u): r for u, r in record["val_rouge_l"].items()}
    generated = {float(u): g for u, g in record["val_generation_usage"].items()}
    assert list(rouge) == list(generated) == list(USAGE_CANDIDATES)
    assert all(0 <= g <= 1 for g in generated.values()) and record["usage"] == best_usage(rouge, generated)
    assert len(lines) == 1 and lines[0].startswith(pte.config.profile)
