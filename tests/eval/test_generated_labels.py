"""Gate labels from generated prefixes (evaluation/generated_labels.py): a real quick plugin, known input, the CLI."""

from types import SimpleNamespace

import pytest
import torch

from evaluation.generated_labels import always_on_states, flips_of, markdown, refit_gate
from spa.system.children import python_command, run


def test_always_on_states_follow_the_sides_own_greedy_text(backbone, quick_plugin_dir):
    from spa.data.aclsum import load_split
    from spa.model.plugin import load_plugin
    from training.train import greedy_tokens

    plugin = load_plugin(quick_plugin_dir).eval()
    tokens = always_on_states(backbone, plugin, load_split("val", 2), max_new_tokens=12)
    assert tokens.doc_index.unique().tolist() == [0, 1]
    for doc in (0, 1):
        mine = tokens.targets[tokens.doc_index == doc]
        assert 1 <= len(mine) <= 12
        assert len(mine) == 12 or int(mine[-1]) in backbone.eos_token_ids
    # each position's token is the side's greedy token at that state: the text side always on writes
    base, side = greedy_tokens(backbone, plugin, tokens)
    assert torch.equal(side, tokens.targets)
    assert torch.equal(flips_of(backbone, plugin, tokens), base != tokens.targets)


def test_refit_gate_learns_the_labels_on_a_copy(backbone, quick_plugin_dir):
    from spa.model.plugin import load_plugin

    plugin = load_plugin(quick_plugin_dir).eval()
    before = {k: v.clone() for k, v in plugin.gate.state_dict().items()}
    torch.manual_seed(1)
    rows = torch.randn(400, plugin.config.gate_width)
    labels = rows[:, 0] > 0  # separable along one direction of f
    fitted = refit_gate(plugin, rows, labels, steps=200)
    with torch.no_grad():
        p = fitted.gate(rows)[:, 0]
    assert ((p > 0.5) == labels).float().mean() > 0.9
    assert all(torch.equal(v, plugin.gate.state_dict()[k]) for k, v in before.items())  # the plugin is untouched
    side, fitted_side = plugin.side.state_dict(), fitted.side.state_dict()
    assert fitted.side is not plugin.side and all(torch.equal(side[k], fitted_side[k]) for k in side)  # same side


def test_markdown_reports_the_chosen_usage_against_always_on():
    at = {"0.2": {"rouge_l": 20.5, "generation_usage": 0.21, "flip_recall": 0.5},
          "0.4": {"rouge_l": 19.0, "generation_usage": 0.41, "flip_recall": 0.7}}
    report = {"backbone": "b", "profile": "outcome", "always_on_rouge_l": 20.0, "seconds": 600,
              "gates": {"generated": {"chosen_usage": 0.2, "at": at}}}
    table = markdown([report], "python -m evaluation.generated_labels --plugins p")
    assert "| b | outcome (20.00) | generated | 20%: +0.50 (21%) | 20%: +0.50 (21%), 50%; 40%: -1.00 (41%), 70% |" \
        in table
    assert table.startswith("Made by `python -m evaluation.generated_labels --plugins p` (10 min")


def test_command_refuses_what_it_cannot_use(tmp_path):
    proc = run(python_command("evaluation.generated_labels", "--plugins", str(tmp_path)), timeout=300)
    assert proc.returncode == 2 and "is not a trained plugin directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(python_command("evaluation.generated_labels", "--plugins", str(tmp_path), "--papers", "0"), timeout=300)
    assert proc.returncode == 2 and "--papers must be at least 1" in proc.stderr


def test_a_plugin_for_another_backbone_is_refused(quick_plugin_dir, monkeypatch):
    import spa.model.backbone
    from evaluation.analysis_files import NotAPlugin, plugins_and_backbone

    class OtherBackboneStandIn:  # only its identity is read; loading a second real backbone would take a minute
        identity = SimpleNamespace(name="other-model", fingerprint="0" * 16)

    monkeypatch.setattr(spa.model.backbone, "load_backbone", lambda name: OtherBackboneStandIn())
    with pytest.raises(NotAPlugin, match=r"trained for backbone .*pass its backbone with --backbone"):
        plugins_and_backbone([quick_plugin_dir], "other-model")
