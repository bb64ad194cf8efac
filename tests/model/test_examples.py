"""`spa train --examples`: a person's own (document, summary) pairs.

Bad files get one line naming the file, the line or row and what is wrong, and
no plugin directory is written; a tiny file in a domain far from ACLSum trains,
exports to `.pte` and summarizes through the real gateway, and the plugin's
config and program carry no example text.
"""

import hashlib
import json

import pytest

from cli.main import main
from device_runtime.documents import device_prompt, load_document
from spa.data.examples import EXAMPLES_INSTRUCTION, read_examples
from spa.errors import DataError
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import GATEWAY_TOKEN, run_spa
from training.examples import FOLD_BELOW, VAL_EVERY, held_out, side_epochs, validation_rule

# A gardener who wants the one task to do, in the imperative: nothing like ACLSum.
GARDEN = [
    ("Tomato leaves are curling and yellow at the bottom of the plant. The soil has stayed wet for a week "
     "because the pot has no drainage hole.", "Drill a drainage hole and water less."),
    ("Aphids cover the new shoots of the roses. Ladybirds were seen in the garden last spring but none this year.",
     "Spray the roses with soapy water."),
    ("The lawn has bare patches under the oak tree where the shade is deep all day.",
     "Sow shade-tolerant grass under the oak."),
    ("Strawberries rot on the ground before they ripen; slugs eat the rest at night.",
     "Lift the strawberries on straw."),
    ("The apple tree gave many small fruits this year and a branch broke under their weight in August.",
     "Thin the apples in June."),
    ("Basil seedlings grow tall and thin on the windowsill and fall over when watered.",
     "Give the basil more light."),
    ("Frost is forecast for Thursday night and the dahlias are still in flower in the border.",
     "Cover the dahlias before Thursday."),
]
MAX_NEW = 12


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"document": d, "summary": s}) + "\n" for d, s in pairs))
    return path


def fail(tmp_path, capsys, name: str, content, expected: str):
    """`spa train --examples` on a file with `content`: exit 2, one line containing `expected`, no plugin dir."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "plugin"
    assert main(["train", "--examples", str(path), "--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spa train: error: "), err
    assert str(path) in err and expected in err, err
    assert not out.exists()
    return err


def jsonl(pairs) -> str:
    return "".join(json.dumps({"document": d, "summary": s}) + "\n" for d, s in pairs)


def test_bad_json_lines_name_the_line_and_write_nothing(tmp_path, capsys):
    good = jsonl(GARDEN)
    fail(tmp_path, capsys, "latin1.jsonl", good.encode() + "{\"document\": \"caf\xe9\"}\n".encode("latin-1"),
         f"line {len(GARDEN) + 1} is not UTF-8")
    fail(tmp_path, capsys, "broken.jsonl", good.replace("\n", "\n{not json\n", 1), "line 2 is not JSON")
    fail(tmp_path, capsys, "list.jsonl", good + '["a", "b"]\n', f"line {len(GARDEN) + 1} is a JSON list")
    fail(tmp_path, capsys, "missing.jsonl", good + '{"document": "Weeds everywhere."}\n',
         f'line {len(GARDEN) + 1} has no "summary" field')
    fail(tmp_path, capsys, "empty.jsonl", '{"document": "  ", "summary": "Rake."}\n' + good,
         'line 1: "document" is empty')
    fail(tmp_path, capsys, "number.jsonl", '{"document": "Moss.", "summary": 3}\n' + good,
         'line 1: "summary" must be text')
    fail(tmp_path, capsys, "duplicate.jsonl", good + "\n" + jsonl(GARDEN[1:2]),
         f"line {len(GARDEN) + 2} repeats the pair at line 2")
    fail(tmp_path, capsys, "few.jsonl", jsonl(GARDEN[:4]), "4 examples; at least 5")
    fail(tmp_path, capsys, "blank.jsonl", "\n\n", "0 examples; at least 5")


def test_bad_tables_name_the_row_and_write_nothing(tmp_path, capsys):
    rows = "".join(f'"{d}","{s}"\n' for d, s in GARDEN)
    fail(tmp_path, capsys, "nosummary.csv", "document,note\n" + rows, "has no 'summary' column")
    fail(tmp_path, capsys, "emptycell.csv", "document,summary\n" + rows + '"Moles in the lawn.",\n',
         f'row {len(GARDEN) + 1} (line {len(GARDEN) + 2}): "summary" is empty')
    fail(tmp_path, capsys, "short.tsv", "document\tsummary\nThe hedge is too tall.\n" + "".join(
        f"{d}\t{s}\n" for d, s in GARDEN), 'row 1 (line 2) has no "summary" field')


def test_missing_file_and_options_for_papers_only(tmp_path, capsys):
    assert main(["train", "--examples", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "ok.jsonl", GARDEN)
    assert main(["train", "--examples", str(path), "--train-docs", "4", "--out", str(tmp_path / "p")]) == 2
    assert "--train-docs" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_tables_and_json_lines_read_the_same_pairs(tmp_path):
    csv_text = "Summary,Document,extra\n" + "".join(f'"{s}","{d}",x\n' for d, s in GARDEN)
    tsv_text = "document\tsummary\n" + "".join(f"{d}\t{s}\n" for d, s in GARDEN)
    (tmp_path / "a.csv").write_text(csv_text)
    (tmp_path / "a.tsv").write_text(tsv_text)
    write_jsonl(tmp_path / "a.jsonl", GARDEN)
    (tmp_path / "a.txt").write_text(tsv_text)  # any other suffix: sniffed
    sets = [read_examples(tmp_path / f"a.{ext}", 384) for ext in ("csv", "tsv", "jsonl", "txt")]
    pairs = [[(e.document, e.summary) for e in s.examples] for s in sets]
    assert pairs[0] == pairs[1] == pairs[2] == pairs[3] == [(d, s) for d, s in GARDEN]
    assert sets[0].sha256 == hashlib.sha256(csv_text.encode()).hexdigest()


def test_long_documents_are_cut_like_spa_summarize_and_said_so(tmp_path):
    long = " ".join(["The compost heap smells of ammonia."] * 40)
    path = write_jsonl(tmp_path / "long.jsonl", GARDEN + [(long, "Add brown leaves to the compost.")])
    examples = read_examples(path, 48)  # every garden document fits in 48 tokens (192 characters)
    cut = examples.examples[-1]
    assert cut.document == load_document_text(long, 48) and len(cut.document) <= 4 * 48 < len(long)
    assert examples.record()["documents_cut"] == 1
    note = examples.note()
    assert note.startswith(f"{path}: 1 of {len(GARDEN) + 1} documents cut to the 48-token budget") and "line 8" in note
    assert read_examples(path, 4096).note() is None


def load_document_text(text: str, budget: int) -> str:
    from spa.data.prompts import plain_document

    return plain_document(text, budget)


def test_validation_rule_uses_every_example_when_few():
    assert "cross-fitted folds" in validation_rule(FOLD_BELOW - 1)
    assert "held out (4 of 20)" in validation_rule(20)
    import torch

    mask = held_out(torch.arange(100))
    assert int(mask.sum()) == 100 // VAL_EVERY and bool(mask[VAL_EVERY - 1]) and not bool(mask[0])
    assert side_epochs(120, 64) == 15 and side_epochs(100_000, 64) == 5  # few tokens: more epochs, capped


def test_read_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="at least 5"):
        read_examples(write_jsonl(tmp_path / "x.jsonl", GARDEN[:2]), 384)


@pytest.fixture(scope="module")
def garden_plugin(tmp_path_factory):
    """`spa train --examples` on the gardener's 7 pairs (quick settings), then `spa export` (fp32)."""
    root = tmp_path_factory.mktemp("garden")
    data = write_jsonl(root / "garden.jsonl", GARDEN)
    train = json.loads(run_spa("train", "--examples", data, "--out", root / "plugin", "--quick", "--epochs", "4",
                               "--json").stdout)
    manifest = json.loads(run_spa("export", root / "plugin", "--out", root / "pte", "--variants", "fp32",
                                  "--no-training", "--json").stdout)
    return data, train, root / "plugin", root / "pte" / manifest["variants"]["fp32"]["file"], manifest


def test_examples_plugin_records_count_and_hash_never_text(garden_plugin):
    data, train, plugin_dir, pte_path, manifest = garden_plugin
    config_text = (plugin_dir / "config.json").read_text()
    config = json.loads(config_text)
    record = config["training"]["examples"]
    assert record["count"] == len(GARDEN) and record["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert "cross-fitted folds" in record["validation"] and train["examples"] == record
    assert config["instruction"] == EXAMPLES_INSTRUCTION and config["profile"] is None
    assert 0 < config["tau"] < 1 and train["metrics"]["val"]["tokens"] == train["metrics"]["train"]["tokens"]
    program = pte_path.read_bytes()
    for document, summary in GARDEN:
        for text in (document, summary, document.split(".")[0]):
            assert text not in config_text and text.encode() not in program
    assert manifest["variants"]["fp32"]["parity"]["ok"]


def test_examples_plugin_summarizes_through_the_split(garden_plugin, gateway, backbone, tmp_path):
    _, _, _, pte_path, _ = garden_plugin
    doc = tmp_path / "note.txt"
    doc.write_text("Slugs ate every lettuce seedling in the raised bed during the wet week.")
    pte = PtePlugin(pte_path)
    prompt = device_prompt(pte.config, load_document(str(doc), pte.config.max_doc_tokens))
    ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=MAX_NEW)
    proc = run_spa("summarize", doc, "--plugin", pte_path, "--gateway", gateway.url, "--token", GATEWAY_TOKEN,
                   "--max-new-tokens", str(MAX_NEW), "--json")
    result = json.loads(proc.stdout)
    assert result["tokens"] == ref.tokens and result["sigmas"] == ref.sigmas
    assert result["tokens"] and result["document"] == "whole"
