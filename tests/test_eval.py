"""The evaluation's own code: Rouge-L, usage counting, and the batched generator's exactness."""

import pytest

from device_runtime.documents import device_prompt, load_document
from evaluation.batched import ALWAYS, NEVER, Row, generate_rows
from evaluation.rouge import mean_rouge_l, rouge_l, side_usage
from spa.pte import PtePlugin
from spa.reference import reference_generate


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
