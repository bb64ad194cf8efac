"""The plugin model's semantics (docs/DESIGN.md §1) on the real backbone, and its files."""

import json

import pytest
import torch

from spa.model.backbone import BackboneIdentity
from spa.errors import PluginError
from spa.model.plugin import Plugin, PluginConfig, every_kth_layer, load_plugin, save_plugin
from tests.conftest import run_spa


@pytest.fixture(scope="module")
def states(backbone):
    """Real backbone states [T, L + 1, H] for a short prompt."""
    ids = torch.tensor([backbone.encode("The side network personalizes the summary of this paper.")])
    return backbone.forward(ids, backbone.new_cache())[0]


@pytest.fixture(scope="module")
def plugin(backbone):
    """A plugin with non-zero random weights (a fresh one outputs exactly 0)."""
    torch.manual_seed(0)
    config = PluginConfig(backbone=backbone.identity.to_dict(), taps=every_kth_layer(backbone.num_layers, 3),
                          rank=16, side_scale=20.0)
    plugin = Plugin(config)
    torch.nn.init.normal_(plugin.side.w_out.weight, std=0.5)
    return plugin.eval()


def test_taps_are_embedding_layers_and_f(backbone, states):
    out = backbone.model(torch.tensor([backbone.encode("The side network personalizes the summary of this paper.")]),
                         output_hidden_states=True)
    assert states.shape[1] == backbone.num_layers + 1
    assert torch.equal(states[:, 0], out.hidden_states[0][0])  # embedding output
    assert torch.equal(states[:, 7], out.hidden_states[7][0])  # layer 7's output
    # transformers' last hidden state has the final norm applied; f_t is its input
    assert torch.equal(backbone.norm(states[:, -1]), out.hidden_states[-1][0])
    assert torch.equal(backbone.logits(states[:, -1]), out.logits[0])


def test_sigma_zero_gives_the_backbones_logits_exactly(backbone, plugin, states):
    f, taps = states[:, -1], states[:, plugin.config.taps]
    sigma = torch.zeros(len(f))
    with torch.no_grad():
        combined = plugin.combined_state(f, taps, sigma)
    assert plugin.side(taps).abs().max() > 1.0  # the side output is far from zero...
    assert torch.equal(backbone.logits(combined), backbone.logits(f))  # ...and still contributes nothing


def test_replacement_plugins_use_the_side_state_alone_where_sigma_is_one(plugin, states):
    config = PluginConfig(**{**plugin.config.to_dict(), "combination": "replace"})
    replace = Plugin(config)
    replace.load_state_dict(plugin.state_dict())
    f, taps = states[:, -1], states[:, plugin.config.taps]
    sigma = (torch.arange(len(f)) % 2).float()
    with torch.no_grad():
        combined, s = replace.combined_state(f, taps, sigma), replace.side(taps)
    assert torch.equal(combined[1::2], s[1::2]) and torch.equal(combined[::2], f[::2])
    with pytest.raises(PluginError, match="combination"):
        PluginConfig(**{**plugin.config.to_dict(), "combination": "multiply"}).validate()


def test_plugins_saved_before_the_combination_field_keep_their_hash(plugin, tmp_path):
    save_plugin(plugin, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["combination"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_plugin(tmp_path).config.combination == "add"  # same hash, so it loads


def test_sigma_one_adds_the_side_output(backbone, plugin, states):
    f, taps = states[:, -1], states[:, plugin.config.taps]
    with torch.no_grad():
        s = plugin.side(taps)
        combined = plugin.combined_state(f, taps, torch.ones(len(f)))
    assert torch.equal(combined, f + s)
    added, replaced = backbone.logits(combined), backbone.logits(s)
    assert not torch.allclose(added, backbone.logits(f))
    assert not torch.allclose(added, replaced)


def test_gate_reads_normalized_f_and_is_not_saturated(plugin, states):
    p = plugin.gate(states[:, -1])[:, 0]
    assert ((p > 0.05) & (p < 0.95)).all(), p  # raw f (norm ~800) would saturate a fresh gate


def test_save_load_round_trips_bit_exactly(plugin, states, tmp_path, backbone):
    digest = save_plugin(plugin, tmp_path / "p")
    loaded = load_plugin(tmp_path / "p", backbone.identity)
    assert loaded.content_hash() == digest == plugin.content_hash()
    for (name, a), (_, b) in zip(plugin.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    taps = states[:, plugin.config.taps]
    assert torch.equal(plugin.side(taps), loaded.side(taps))
    assert loaded.config == plugin.config


def test_plugin_for_another_backbone_is_refused(plugin, tmp_path):
    save_plugin(plugin, tmp_path / "p")
    other = BackboneIdentity("SomeOtherLM", "0000000000000000", 30, 576, 49152)
    with pytest.raises(PluginError, match="trained for backbone 'SmolLM2-135M-Instruct'.*SomeOtherLM"):
        load_plugin(tmp_path / "p", other)


def _damage(directory, how):
    if how == "missing_config":
        (directory / "config.json").unlink()
    elif how == "bad_json":
        (directory / "config.json").write_text("{not json")
    elif how == "missing_weights":
        (directory / "plugin.safetensors").unlink()
    elif how == "truncated_weights":
        data = (directory / "plugin.safetensors").read_bytes()
        (directory / "plugin.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "tampered_weights":
        data = bytearray((directory / "plugin.safetensors").read_bytes())
        data[-3] ^= 0x55
        (directory / "plugin.safetensors").write_bytes(bytes(data))
    elif how == "bad_taps":
        config = json.loads((directory / "config.json").read_text())
        config["taps"] = [3, 1]
        (directory / "config.json").write_text(json.dumps(config))


DAMAGE = {
    "missing_config": "no config.json",
    "bad_json": "not valid JSON",
    "missing_weights": "no plugin.safetensors",
    "truncated_weights": "corrupt",
    "tampered_weights": "content hash .* differs",
    "bad_taps": "taps must start with 0",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_plugin_directories_get_clear_errors(plugin, tmp_path, how):
    save_plugin(plugin, tmp_path / "p")
    _damage(tmp_path / "p", how)
    with pytest.raises(PluginError, match=DAMAGE[how]):
        load_plugin(tmp_path / "p")


@pytest.mark.parametrize("how", ["not_a_dir", "tampered_weights"])
def test_export_of_a_bad_plugin_is_a_one_line_error(plugin, tmp_path, how):
    target = tmp_path / "p"
    if how == "not_a_dir":
        target = tmp_path / "does-not-exist"
    else:
        save_plugin(plugin, target)
        _damage(target, how)
    proc = run_spa("export", target, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spa export: error:"), proc.stderr


def test_shipped_config_validation_rejects_unknown_fields(plugin):
    data = plugin.config.to_dict() | {"surprise": 1}
    with pytest.raises(PluginError, match="unknown plugin config fields: surprise"):
        PluginConfig.from_dict(data)


def test_every_kth_layer_always_includes_f():
    assert every_kth_layer(30, 1) == list(range(31))
    assert every_kth_layer(30, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 30]
