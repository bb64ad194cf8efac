"""The flip analysis of issue 16 (evaluation/flips.py): known input, then a real quick plugin."""

import pytest
import torch

from evaluation.flips import analyse, flip_kinds, gated_view, markdown
from spa.system.children import python_command, run


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
    from spa.model.plugin import load_plugin
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
    # The probes' inputs: the side's effect on the logits, and the flips at document positions.
    from evaluation.flips import EFFECTS, document_flips, side_effects
    from spa.data.aclsum import load_split, paper_prompt
    from training.train import greedy_tokens

    base, side, *effects = side_effects(backbone, plugin, val)
    assert len(effects) == len(EFFECTS)
    assert all(torch.equal(a, b) for a, b in zip((base, side), greedy_tokens(backbone, plugin, val)))
    lead = effects[EFFECTS.index("side token's lead over the backbone's")]
    assert (lead >= 0).all() and ((lead > 0) == (base != side)).all()
    papers = load_split("train", 2)
    feats, flips = document_flips(backbone, plugin, papers)
    positions = sum(len(backbone.encode(paper_prompt(p, c.prompt_template, c.instruction, c.max_doc_tokens)))
                    for p in papers)
    assert len(flips) == len(feats["draft"]) == len(feats["f"]) == positions and flips.any()


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
    assert "| 50.0 (50 / - / 25) |" in probe_markdown([report])


def test_a_draft_token_bias_learns_what_the_gate_inputs_cannot_say():
    """Labels that depend only on the draft token: the probe with a bias per token finds them,
    the one without cannot (its inputs are noise); tokens it never saw get no bias."""
    from evaluation.flips import fit_probe

    gen = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(600, 4, generator=gen), torch.randint(0, 6, (600,), generator=gen)
    labels = tokens == 3
    with_bias = fit_probe(x, labels, 0, tokens=tokens)(x, tokens)
    without = fit_probe(x, labels, 0)(x)
    assert with_bias[labels].min() > 0.9 and with_bias[~labels].max() < 0.1
    assert (without[labels].mean() - without[~labels].mean()).abs() < 0.2
    unseen = fit_probe(x, labels, 0, tokens=tokens)(x[:2], torch.tensor([50, 3]))
    assert 0.1 < unseen[0] < 0.9 and unseen[1] > 0.9


def test_the_second_gate_turns_down_the_flips_its_inputs_mark_as_harmful():
    """Known input: the first effect column is 1 on helpful flips and 0 on harmful ones, so turning
    down 10-30 % of the flips drops harmful ones first and raises top-1 above always on's."""
    from evaluation.flips import EFFECTS, second_gate

    def effects(n, seed):
        gen = torch.Generator().manual_seed(seed)
        targets = torch.randint(0, 50, (n,), generator=gen)
        kind = torch.randint(0, 4, (n,), generator=gen)  # 0 no flip, 1 helpful, 2 harmful, 3 neutral
        other = (targets + 1) % 50
        base = torch.where(kind == 1, other, targets)
        side = torch.where(kind == 2, other, torch.where(kind == 3, (targets + 2) % 50, targets))
        base = torch.where(kind == 3, other, base)
        cols = [(kind == 1).float() + 0.01 * torch.randn(n, generator=gen) for _ in EFFECTS]
        return (base, side, *cols), targets

    (train, train_targets), (val, val_targets) = effects(800, 0), effects(800, 1)
    out = second_gate(train, val, train_targets, val_targets)
    for share, d in out["drops"].items():
        assert d["harmful_dropped"] > 0 and d["helpful_dropped"] == 0, share
        assert d["top1"] > out["top1_always"], share
