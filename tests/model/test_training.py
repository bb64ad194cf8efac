"""`spa train` on the real backbone: it learns, the gate responds to lambda, runs are reproducible."""

import json

import pytest
import torch

from spa.model.plugin import load_plugin
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


def test_token_effects_and_recorded_settings():
    from types import SimpleNamespace

    from training.tapcache import TokenSet
    from training.train import LATER_SETTINGS, greedy_tokens, helpful_flips, token_effects

    class Backbone:  # logits = the state itself
        train_logits = staticmethod(lambda x: x)

    # Three tokens over a 3-word vocabulary; the side adds [0, 2, 0] to every state.
    f = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 5.0]])
    states = torch.stack([torch.zeros_like(f), f], dim=1)  # [N, taps + f, V]: tap 0 unused
    plugin = SimpleNamespace(config=SimpleNamespace(taps=[0], combination="add"),
                             side=lambda taps: torch.tensor([0.0, 2.0, 0.0]).expand(len(taps), 3))
    data = TokenSet(states, torch.tensor([1, 0, 2]), torch.zeros(3, dtype=torch.long))
    gains, flips = token_effects(Backbone(), plugin, data)
    assert flips.tolist() == [True, False, False]  # only the first token's argmax moves (0 -> 1)
    base, with_side = greedy_tokens(Backbone(), plugin, data)
    assert base.tolist() == [0, 0, 2] and with_side.tolist() == [1, 0, 2]
    assert helpful_flips(base, with_side, data.targets).tolist() == [True, False, False]  # 0 -> 1, the target
    assert not helpful_flips(base, with_side, torch.tensor([0, 0, 2])).any()  # a flip away from the target
    ce = lambda x, t: -torch.log_softmax(x, -1)[t]  # noqa: E731
    side = f + torch.tensor([0.0, 2.0, 0.0])
    expected = [(ce(f[i], t) - ce(side[i], t)).item() for i, t in enumerate([1, 0, 2])]
    assert gains.tolist() == pytest.approx(expected) and expected[0] > 0 > expected[1]
    # Later settings are recorded only off their defaults: the default recipe's config (and hash) is unchanged.
    assert set(LATER_SETTINGS).isdisjoint(TrainSettings("outcome").record())
    assert TrainSettings("outcome", gate_labels="flip").record()["gate_labels"] == "flip"
