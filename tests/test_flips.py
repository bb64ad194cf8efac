"""The flip analysis of issue 16 (evaluation/flips.py): known input, then a real quick plugin."""

import pytest
import torch

from evaluation.flips import analyse, flip_kinds, gated_view, markdown
from spa.children import python_command, run


def test_flip_kinds_partition_the_flips_and_a_gate_counts_what_it_opens_on():
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    base = torch.tensor([1, 9, 3, 8, 5, 7])  # right on tokens 0, 2, 4
    side = torch.tensor([1, 2, 0, 7, 5, 6])  # right on 0, 1, 4, 5
    kinds = flip_kinds(base, side, targets)
    assert kinds["flip"].tolist() == [False, True, True, True, False, True]
    assert kinds["helpful"].tolist() == [False, True, False, False, False, True]
    assert kinds["harmful"].tolist() == [False, False, True, False, False, False]
    assert kinds["neutral"].tolist() == [False, False, False, True, False, False]
    open_ = torch.tensor([False, True, False, True, False, False])  # one helpful flip, the neutral one
    view = gated_view(kinds, base == targets, side == targets, open_)
    assert view["usage"] == pytest.approx(2 / 6)
    assert view["top1"] == pytest.approx(4 / 6)  # the backbone's 3, plus the helpful flip it opened on
    assert view["caught"] == {"flip": 0.5, "helpful": 0.5, "harmful": 0.0, "neutral": 1.0}
    assert gated_view(kinds, base == targets, side == targets, torch.ones(6, dtype=torch.bool))["top1"] == \
        pytest.approx(4 / 6)  # open everywhere: always on


def test_analysis_of_a_real_plugin_is_consistent(backbone, quick_plugin_dir):
    from spa.plugin import load_plugin
    from training.tapcache import split_token_set

    plugin = load_plugin(quick_plugin_dir).eval()
    c = plugin.config
    val = split_token_set(backbone, "val", 8, c.profile, c.prompt_template, c.instruction, c.max_doc_tokens)
    report = analyse(backbone, plugin, val)
    rates = report["rates"]
    assert rates["flip"] > 0  # a trained side changes some greedy tokens
    assert rates["flip"] == pytest.approx(rates["helpful"] + rates["harmful"] + rates["neutral"])
    assert report["top1_always"] == pytest.approx(report["top1_backbone"] + rates["helpful"] - rates["harmful"])
    assert report["top1_oracle"] == pytest.approx(report["top1_backbone"] + rates["helpful"])
    for u in ("0.25", "0.35"):
        assert report["at"][u]["usage"] == pytest.approx(float(u), abs=2 / len(val))
    row = {"backbone": "b", "profile": c.profile, "gate": "default (gain labels)", **report}
    assert markdown([row]).count("\n") == 2


def test_flips_command_names_a_directory_that_is_not_a_plugin(tmp_path):
    proc = run(python_command("evaluation.flips", "--plugins", str(tmp_path)), timeout=300)
    assert proc.returncode == 2 and "is not a trained plugin directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tables_print_a_dash_where_there_is_no_flip_of_a_kind():
    from evaluation.flips import probe_markdown

    view = {"usage": 0.25, "top1": 0.5, "caught": {"flip": 0.5, "helpful": None, "harmful": 0.25, "neutral": None}}
    report = {"backbone": "b", "profile": "outcome", "gate": "flip labels", "rates": {k: 0.1 for k in view["caught"]},
              "top1_backbone": 0.4, "top1_always": 0.5, "top1_oracle": 0.6, "at": {"tau": view, "0.25": view},
              "probe": {"helpful labels, f + margin, linear": {"0.25": view}}}
    assert "| 25, 50, - / 25 / - |" in markdown([report])
    assert "| 50.0 (- / 25) |" in probe_markdown([report])
