"""On-device learning without a phone: the training program in the ExecuTorch runtime against eager
PyTorch, the device's recipe, and the atomic store of the learned plugin (a tiny synthetic plugin and
output head: seconds, no backbone). The whole path through a real gateway is tests/device/test_teach.py."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_runtime.learning import DeviceTokens, Program, learn
from export.training_program import SideLoss, export_training_program
from spa.errors import PluginError
from spa.model.output_head import OutputHead
from spa.model.personal import PersonalPlugin, PersonalStore
from spa.model.plugin import MARGIN_GATE, PLAIN_GATE, Plugin, PluginConfig, load_plugin, save_plugin
from spa.model.train_program import ProgramInfo, Trainee, padded
from training.examples import example_settings

H, LAYERS, V, TAPS = 64, 4, 300, [0, 2, 4]


def tiny_export(root, gate_input=PLAIN_GATE):
    """(export dir, plugin dir, head): a plugin with a trained-looking side network, exported with its program."""
    torch.manual_seed(0)
    config = PluginConfig(backbone={"name": "tiny", "fingerprint": "tiny0", "hidden_size": H, "num_layers": LAYERS},
                          taps=TAPS, rank=8, side_scale=3.0, instruction="Summarize this text.", gate_input=gate_input)
    plugin = Plugin(config)
    with torch.no_grad():  # W_out starts at zero; a taught plugin has learned something already
        plugin.side.w_out.weight.normal_(0, 0.05)
    save_plugin(plugin, root / "plugin")
    gen = np.random.default_rng(0)
    head = OutputHead(gen.normal(0, 0.3, (V, H)).astype(np.float32), (1 + gen.normal(0, 0.1, H)).astype(np.float32),
                      1e-5, 0.0, fingerprint="tiny0")
    export_training_program(root / "plugin", root / "export", head)
    for name in ("config.json", "plugin.safetensors"):
        (root / "export" / name).write_bytes((root / "plugin" / name).read_bytes())
    return root / "export", root / "plugin", head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("tiny"))


def batch(n, seed=1, taps=len(TAPS)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, taps, H, generator=g) * 3
    return x, x[:, -1].clone(), torch.randint(0, V, (n,), generator=g)


def test_one_training_step_on_the_device_equals_eager_pytorch(tiny):
    """side_loss's forward and backward in ExecuTorch, then one step, against eager torch on the same
    plugin, data and head: the loss, the gradients, and the weights after an SGD step and an AdamW step."""
    export, plugin_dir, head = tiny
    info = ProgramInfo.read(export / "plugin-train.json")
    x, f, targets = batch(37)  # fewer rows than the program's batch: the rest is weight-0 padding
    inputs = tuple(torch.from_numpy(padded(a.numpy(), info.batch)) for a in (x, f, targets)) + (
        torch.from_numpy(padded(np.ones(37, np.float32), info.batch)), torch.from_numpy(head.weight))
    for optimizer in ("sgd", "adamw"):
        device = Trainee(export / "plugin-train.pte", export / "plugin-train.ptd", "side_loss", 1e-2)
        loss = device.run(inputs)[0].item()
        grads = device.gradients()
        if optimizer == "sgd":  # ExecuTorch's SGD on its own: w - lr * g
            from executorch.extension.training import get_sgd_optimizer

            get_sgd_optimizer(device.params(), 0.5, 0, 0, 0, False).step(device.module.named_gradients())
        else:  # AdamW's step computed on the device, applied by ExecuTorch's SGD
            device.step()
        after = device.weights()

        plugin = load_plugin(plugin_dir)
        eager = SideLoss(plugin, head, projected=False)
        opt = (torch.optim.SGD(plugin.side.parameters(), lr=0.5) if optimizer == "sgd"
               else torch.optim.AdamW(plugin.side.parameters(), lr=1e-2, weight_decay=0.01))
        ref = F.cross_entropy(eager.head(f + plugin.side(x), torch.from_numpy(head.weight)), targets)
        opt.zero_grad()
        ref.backward()
        assert loss == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
        for name, p in plugin.side.named_parameters():
            g = grads[f"side.{name}"]
            assert np.abs(g - p.grad.numpy()).max() <= 1e-5 * max(1.0, np.abs(p.grad.numpy()).max()), name
        opt.step()
        moved = 0.0
        for name, p in plugin.side.named_parameters():
            w, want = after[f"side.{name}"], p.detach().numpy()
            if optimizer == "adamw":  # Adam divides by |g|: compare where the gradient is not at the rounding level
                keep = np.abs(p.grad.numpy()) > 1e-4 * np.abs(p.grad.numpy()).max()
                w, want = w[keep], want[keep]
            assert np.abs(w - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), (optimizer, name)
            moved = max(moved, float(np.abs(w - load_plugin(plugin_dir).state_dict()[f"side.{name}"].numpy()
                                            [keep if optimizer == "adamw" else ...]).max()))
        assert moved > 1e-3  # the step did move the weights


@pytest.mark.parametrize("gate_input", [PLAIN_GATE, MARGIN_GATE])
def test_a_gate_step_on_the_device_equals_eager_pytorch(tiny, tmp_path, gate_input):
    export, plugin_dir, _ = tiny if gate_input == PLAIN_GATE else tiny_export(tmp_path, MARGIN_GATE)
    info = ProgramInfo.read(export / "plugin-train.json")
    g = torch.Generator().manual_seed(5)
    rows, labels = torch.randn(300, H, generator=g) * 3, torch.randint(0, 2, (300,), generator=g)
    if gate_input == MARGIN_GATE:  # [f, m]: the backbone's top-2 logit margin, >= 0
        rows = torch.cat([rows, torch.rand(300, 1, generator=g) * 5], dim=1)
    device = Trainee(export / "plugin-train.pte", export / "plugin-train.ptd", "gate_loss", 1e-2)
    out = device.run((torch.from_numpy(padded(rows.numpy(), info.gate_batch)),
                      torch.from_numpy(padded(labels.numpy(), info.gate_batch)),
                      torch.from_numpy(padded(np.ones(300, np.float32), info.gate_batch))))
    plugin = load_plugin(plugin_dir)
    loss = F.cross_entropy(plugin.gate.logits(rows), labels)
    loss.backward()
    assert out[0].item() == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(out[1].numpy()[:300], plugin.gate(rows)[:, 0].detach().numpy(), atol=1e-6)
    for name, p in plugin.gate.named_parameters():
        np.testing.assert_allclose(device.gradients()[f"gate.{name}"], p.grad.numpy(), atol=1e-6)


def synthetic_examples(n_examples=20, seed=3, taps=len(TAPS)):
    """Examples whose targets a side network can learn: the head's argmax of f + a fixed direction of the taps."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(H, generator=g)
    parts = []
    for i in range(n_examples):
        n = 6 + i % 5
        x = torch.randn(n, taps, H, generator=g) * 3
        parts.append((x, x[:, -1].clone(), direction))
    return parts


def device_tokens(head, parts):
    out = []
    for i, (x, f, d) in enumerate(parts):
        logits = (f + 4 * d) @ torch.from_numpy(head.weight).t()
        out.append(DeviceTokens(x.numpy(), f.numpy(), logits.argmax(-1).numpy(), np.zeros(len(f), np.int64)))
    return DeviceTokens.join(out)


def test_the_devices_recipe_lowers_the_held_out_loss_and_writes_a_plugin_atomically(tiny, tmp_path):
    export, _, head = tiny
    store = PersonalStore.create(export, tmp_path / "store")
    tokens = device_tokens(head, synthetic_examples())
    program = Program(store.pte, store.weights_bytes(), store.info, torch.from_numpy(head.weight), projected=False)
    seen = []
    learned = learn(program, tokens, example_settings(), progress=lambda done, total, what: seen.append(done))
    val = learned.metrics["val"]
    assert val["loss_side_always"] < val["loss_side_before"] - 0.1  # it learned on the held-out examples
    assert val["loss_side_always"] < val["loss_backbone"]
    assert seen and seen == sorted(seen)
    assert set(learned.weights) == {k for k in store.weights() if k != "side.scale"}

    before = store.config()["content_hash"]
    version = store.write(learned.weights, learned.tau, learned.record)
    config = store.config()
    assert config["tau"] == learned.tau and config["content_hash"] != before
    assert config["training"]["personalized"][-1]["examples"] == 20
    # the version is a plugin directory the workstation loads (content hash checked)
    loaded = load_plugin(version)
    np.testing.assert_array_equal(loaded.state_dict()["side.w_out.weight"].numpy(), learned.weights["side.w_out.weight"])
    # and generation runs it through the training program's methods, as eager does
    plugin = PersonalPlugin(store.root)
    x, f, _ = batch(3, seed=9)
    with torch.no_grad():
        for i in range(3):
            assert plugin.gate(f[i].numpy()) == pytest.approx(loaded.gate(f[i])[0].item(), abs=1e-5)
            np.testing.assert_allclose(plugin.side(x[i].numpy()), loaded.side(x[i]).numpy(), atol=1e-4)
            d = loaded.side.project(x[i]).numpy()
            np.testing.assert_allclose(plugin.side_projected(d), loaded.side(x[i]).numpy(), atol=1e-4)
    digest = hashlib.sha256((version / "plugin-train.ptd").read_bytes()).hexdigest()
    assert (version / "plugin-train.ptd.sha256").read_text().strip() == digest


@pytest.mark.parametrize("crash_at", ["files", "rename", "pointer"])
def test_a_crash_mid_write_leaves_the_previous_plugin(tiny, tmp_path, monkeypatch, crash_at):
    export, _, _ = tiny
    store = PersonalStore.create(export, tmp_path / "store")
    old_hash, old = store.config()["content_hash"], store.weights()
    new = {k: v + 1 for k, v in old.items() if k != "side.scale"}
    import spa.model.personal as personal

    real_write = personal.write_file

    def boom(*args):
        raise OSError(f"power lost ({crash_at})")

    if crash_at == "files":  # the weights are half written
        monkeypatch.setattr(personal, "write_file", lambda path, data: (real_write(path, data[:len(data) // 2]), boom()))
    elif crash_at == "rename":
        monkeypatch.setattr(personal.os, "rename", boom)
    else:
        monkeypatch.setattr(personal.os, "replace", boom)
    with pytest.raises(OSError):
        store.write(new, 0.9, {"examples": 1})
    monkeypatch.undo()
    again = PersonalStore(store.root)
    assert again.config()["content_hash"] == old_hash
    assert all(np.array_equal(again.weights()[k], old[k]) for k in old)
    PersonalPlugin(store.root)  # loads
    again.write(new, 0.9, {"examples": 1})  # the next write succeeds and cleans the debris
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []
    assert again.config()["content_hash"] != old_hash


def test_a_damaged_store_is_one_clear_error(tiny, tmp_path):
    export, _, _ = tiny
    store = PersonalStore.create(export, tmp_path / "store")
    ptd = store.current / "plugin-train.ptd"
    data = bytearray(ptd.read_bytes())
    data[-5] ^= 0xFF
    ptd.write_bytes(bytes(data))
    with pytest.raises(PluginError, match="corrupt"):
        PersonalPlugin(store.root)
    with pytest.raises(PluginError, match="not a personal plugin store"):
        PersonalStore(tmp_path)
