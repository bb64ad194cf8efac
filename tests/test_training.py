"""`spa train` on the real backbone: it learns, the gate responds to lambda, runs are reproducible."""

import json

import torch

from spa.plugin import load_plugin
from training.train import Split, TrainSettings, choose_tau, train_plugin


def test_quick_training_beats_the_backbone_on_validation(quick_train_result):
    val = quick_train_result["metrics"]["val"]
    assert val["tokens"] > 100
    assert val["loss_side_always"] < val["loss_backbone"] - 0.05
    assert val["loss_gated"] < val["loss_backbone"] - 0.05  # the hard gate at the stored tau
    assert 0.0 < val["side_usage"] <= 1.0


def test_training_is_deterministic_under_a_seed(quick_train_result, quick_plugin_dir):
    # Two separate `spa train --quick --seed 0` runs (the two fixtures) write identical plugins.
    recorded = json.loads((quick_plugin_dir / "config.json").read_text())["content_hash"]
    assert quick_train_result["content_hash"] == recorded
    assert load_plugin(quick_plugin_dir).content_hash() == recorded


def test_raising_lambda_lowers_side_usage(backbone):
    usage = {}
    for skip_cost in (0.0, 0.5):
        settings = TrainSettings.quick("outcome")
        settings.skip_cost, settings.max_usage = skip_cost, 1.0  # no usage cap: lambda alone decides
        plugin, metrics = train_plugin(backbone, settings)
        usage[skip_cost] = metrics["val"]["side_usage"]
        assert plugin.config.training["settings"]["skip_cost"] == skip_cost
    assert usage[0.5] < usage[0.0], usage


def test_tau_minimizes_gated_loss_plus_cost():
    # Three tokens: the side helps the first a lot, the second a little, the third not at all.
    split = Split(base=torch.tensor([3.0, 2.0, 1.0]), side=torch.tensor([1.0, 1.9, 1.5]), p=torch.tensor([0.9, 0.6, 0.2]))
    # Free side: open where it helps (tokens 1 and 2), not where it hurts (token 3).
    tau = choose_tau(split, skip_cost=0.0)
    assert 0.2 < tau < 0.6
    # A cost above token 2's gain (0.1 nats) closes it; a cost above every gain closes all.
    assert 0.6 < choose_tau(split, skip_cost=0.2) < 0.9
    assert choose_tau(split, skip_cost=5.0) >= 0.9
    # A usage cap of one token in three keeps only the most useful token open.
    assert 0.6 < choose_tau(split, skip_cost=0.0, max_usage=0.34) < 0.9
