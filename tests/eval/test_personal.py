"""`spa eval --examples`: few-shot prompts, LoRA on the backbone, the report against SPA, and the curve's people."""

import json

import pytest
import torch

import evaluation.lora as lora
import evaluation.personal as personal
from evaluation.baselines import STYLE_LEAD, few_shot_prompt, greedy
from evaluation.people import first_quote, person_pairs, quote_pairs
from evaluation.personal import BACKBONE, LORA, SPA, evaluate_person, goal_verdict, markdown, shot_row
from spa.data.examples import EXAMPLES_INSTRUCTION, read_examples
from spa.data.prompts import chat_template
from tests.model.test_examples import GARDEN, write_jsonl
from training.examples import example_prompts


@pytest.fixture(scope="module")
def garden(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    train = read_examples(write_jsonl(root / "train.jsonl", GARDEN[:5]), 64)
    tests = read_examples(write_jsonl(root / "test.jsonl", GARDEN[5:]), 64, minimum=1)
    return root, train, tests


def test_few_shot_puts_the_examples_first_and_falls_back_to_summaries(backbone, garden):
    _, train, tests = garden
    doc = tests.examples[0].document
    text, kind = few_shot_prompt(backbone.tokenizer, train.examples[:3], doc, EXAMPLES_INSTRUCTION, 4096)
    assert kind == "documents"
    positions = [text.index(e.document) for e in train.examples[:3]] + [text.index(doc)]
    assert positions == sorted(positions)  # the examples in order, the new document last
    assert all(e.summary in text for e in train.examples[:3])
    short, kind = few_shot_prompt(backbone.tokenizer, train.examples[:3], doc, EXAMPLES_INSTRUCTION, 120)
    assert kind == "summaries only" and STYLE_LEAD in short
    assert not any(e.document in short for e in train.examples[:3]) and short.index(doc) > short.index(STYLE_LEAD)
    assert all(e.summary in short for e in train.examples[:3])


def test_lora_adapts_a_copy_and_leaves_the_backbone_alone(backbone, garden, monkeypatch):
    _, train, _ = garden
    monkeypatch.setattr(lora, "EPOCHS", 1)
    prompts = example_prompts(train, chat_template(backbone.tokenizer))
    ids = backbone.encode(prompts[0])
    before = greedy(backbone, ids, 8)
    probe = torch.tensor([ids])
    logits_before = backbone.model(input_ids=probe).logits
    adapted, record = lora.lora_backbone(backbone, prompts, [e.summary for e in train.examples])
    assert torch.equal(backbone.model(input_ids=probe).logits, logits_before)  # merged into a copy only
    assert greedy(backbone, ids, 8) == before
    assert not torch.equal(adapted.model(input_ids=probe).logits, logits_before)
    assert record["trainable_parameters"] == 460_800 and "5 cross-fitted folds" in record["validation"]
    assert adapted.identity.fingerprint != backbone.identity.fingerprint


def test_person_report_compares_every_row_with_spa(backbone, garden, monkeypatch):
    root, train, tests = garden
    # The LoRA row's wiring, without training one again (the test above trains a real adapter).
    record = {"rank": lora.RANK, "targets": list(lora.TARGETS), "trainable_parameters": 1, "validation": "stub"}
    monkeypatch.setattr(personal, "lora_backbone", lambda bb, prompts, summaries, seed: (bb, record))
    result = evaluate_person(backbone, train, tests, root / "work", max_new_tokens=4, export=False, log=lambda m: None)
    rows = result["rows"]
    assert list(rows) == [BACKBONE, shot_row(1), shot_row(3), LORA, "side always on", SPA]
    assert set(result["vs_spa"]) == set(rows) - {SPA}
    for name, row in rows.items():
        assert len(row["per_doc"]) == len(tests) and 0 <= row["rouge_l"] <= 100
        assert result["vs_spa"].get(name, {"papers": len(tests)})["papers"] == len(tests)
    # What each approach sends: the few-shot prompts carry the examples on every request.
    assert rows[BACKBONE]["prompt_tokens"] == rows[SPA]["prompt_tokens"] == rows[LORA]["prompt_tokens"]
    assert rows[shot_row(3)]["prompt_tokens"] > rows[shot_row(1)]["prompt_tokens"] > rows[SPA]["prompt_tokens"]
    assert rows[SPA]["side_usage"] <= rows["side always on"]["side_usage"] == 1.0
    assert result["examples"]["count"] == 5 and result["tests"]["count"] == 2
    verdict = goal_verdict(result)
    assert set(verdict["met"]) == {"usage", "lora", "three_shot"} and isinstance(verdict["all"], bool)
    text = markdown(result, "spa eval --examples train.jsonl --test test.jsonl")
    assert "| LoRA on the backbone |" in text and "spa eval --examples train.jsonl" in text
    assert rows[LORA]["per_doc"] == rows[BACKBONE]["per_doc"]  # the stub adapter is the backbone itself
    assert not any(e.summary in json.dumps(result["examples"]) for e in train.examples)


def test_the_quotes_reader_wants_the_first_quoted_sentence():
    article = ('Storms hit the coast. "We lost the roof," a resident said. Crews worked all night. '
               '"It will take weeks," the mayor said.')
    assert first_quote(article) == '"We lost the roof," a resident said.'
    assert first_quote("No one was quoted. Nothing was said.") is None
    pairs = quote_pairs()
    assert len(pairs) == 140 and all(p["summary"] in p["document"][:768] for p in pairs)
    train, test = person_pairs("quotes")
    assert len(train) == 97 and len(test) == 39 and len({p["document"] for p in train}) == 97  # 3 repeats dropped
    assert not {p["document"] for p in train} & {p["document"] for p in test}
    papers, test_papers = person_pairs("outcome")
    assert len(papers) == 100 and len(test_papers) == 100


def test_eval_examples_refuses_what_cannot_be_split(tmp_path, capsys):
    from cli.main import main

    data = write_jsonl(tmp_path / "five.jsonl", GARDEN[:5])
    assert main(["eval", "--examples", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "5 examples leave 4 to train on after holding out 1" in err and err.count("\n") == 1
    assert main(["eval", "--test", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "--test needs --examples" in capsys.readouterr().err
    assert main(["eval", "--examples", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "out").exists()
