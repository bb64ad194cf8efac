"""The margin gate (spa/model/plugin.py MARGIN_GATE): the gate also reads the backbone's top-2 logit margin.

From the wire to the split: the margin's encoding and checks (`options.gate_margin`,
`step.margin`), the device protocol handing it to the gate, the cloud's copy of
the gate for pushed taps, a quick plugin trained with `--gate-margin` and
exported (the `.pte`'s gate reads [f, m] and matches eager torch), and the
split over real sockets producing exactly the reference's tokens.
"""

import asyncio

import numpy as np
import pytest
import torch

from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from spa.protocol import codec
from spa.model.cloud_gate import gate_probability
from spa.model.generate import logit_margin
from spa.model.plugin import MARGIN_GATE, Plugin, PluginConfig, gate_row, load_plugin
from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol, RunGate
from spa.protocol.errors import ProtocolError
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import GATEWAY_TOKEN, run_spa

H = 16
F = codec.encode(np.random.default_rng(5).normal(0, 15, (1, H)))


# --- values ------------------------------------------------------------------


def test_logit_margin_is_the_top_two_gap_in_float32():
    logits = torch.tensor([0.5, 3.25, -1.0, 3.0, 3.25 - 2 ** -20])
    assert logit_margin(logits) == pytest.approx(2 ** -20, abs=0)  # the runner-up, not the second distinct value
    assert logit_margin(torch.tensor([[2.0, 2.0, 1.0]])) == 0.0  # a tie
    assert logit_margin(torch.tensor([1.0, 7.5], dtype=torch.bfloat16)) == 6.5


def _margin_plugin(hidden=H) -> Plugin:
    config = PluginConfig(backbone={"name": "b", "fingerprint": "fp", "num_layers": 2, "hidden_size": hidden},
                          taps=[0, 2], gate_input=MARGIN_GATE)
    torch.manual_seed(0)
    plugin = Plugin(config)
    with torch.no_grad():
        plugin.gate.classifier.weight[:, -1] = torch.tensor([1.0, -1.0])
    return plugin.eval()


def test_the_margin_gate_reads_log1p_of_the_margin_beside_rms_f():
    plugin = _margin_plugin()
    assert plugin.config.gate_width == H + 1 and plugin.gate.classifier.in_features == H + 1
    f = torch.randn(H) * 15
    with torch.no_grad():
        p = [plugin.gate(gate_row(f, torch.tensor(mg)))[0].item() for mg in (0.0, 1.0, 10.0)]
        weight, bias = plugin.gate.classifier.weight.detach(), plugin.gate.classifier.bias.detach()
        x = torch.cat([f * torch.rsqrt(f.pow(2).mean() + 1e-6), torch.log1p(torch.tensor([1.0]))])
        assert p[1] == pytest.approx(torch.softmax(weight @ x + bias, -1)[1].item(), abs=1e-6)
    assert p[0] > p[1] > p[2]  # a confident backbone closes this gate
    # The cloud's copy of the gate (pushed taps) computes the same p from the uploaded weights.
    cloud = gate_probability(f.numpy(), weight.numpy(), bias.numpy(), margin=1.0)
    assert cloud == pytest.approx(p[1], abs=1e-6)


# --- the wire -----------------------------------------------------------------


def test_options_gate_margin_is_optional_and_sent_only_when_set():
    assert "gate_margin" not in m.Options().to_dict()  # older gateways see the same options map
    assert m.Options(gate_margin=True).to_dict()["gate_margin"] is True
    hello = m.Hello("", m.Plugin("fp", (0, 2), "h"), "p", m.Options(gate_margin=True)).to_dict()
    assert m.parse(hello, "gateway").options.gate_margin
    hello["options"]["gate_margin"] = 1
    with pytest.raises(ProtocolError, match="hello.options.gate_margin"):
        m.parse(hello, "gateway")


def test_step_margin_round_trips_as_float32_and_bad_values_are_refused():
    step = m.Step(0, 4, F, 7, b"a", margin=0.1).to_dict()
    assert "margin" not in m.Step(0, 4, F, 7, b"a").to_dict()
    assert m.parse(step, "device").margin == float(np.float32(0.1))  # read as a float32
    for bad in (-0.5, float("nan"), float("inf"), 1e39, "1", True):
        with pytest.raises(ProtocolError, match="step.margin") as e:
            m.parse(step | {"margin": bad}, "device")
        assert e.value.code == "bad_field"


def _generating(gate_margin: bool, window: int = 2) -> DeviceProtocol:
    hello = m.Hello("", m.Plugin("fp", (0, 2), "h"), "p", m.Options(window=window, gate_margin=gate_margin))
    dp = DeviceProtocol(hello)
    dp.receive(m.Ready("s", "r", m.BackboneInfo("b", "fp", 2, H), 5, {}).to_dict())
    return dp


def test_the_device_hands_the_steps_margin_to_its_gate_and_refuses_steps_without_one():
    dp = _generating(gate_margin=True)
    dp.receive(m.Step(0, 4, F, 9, b"a", margin=2.5).to_dict())
    action = dp.next_action()
    assert isinstance(action, RunGate) and action.margin == 2.5
    dp.gated(4, False)
    with pytest.raises(ProtocolError, match="no margin") as e:  # a gateway that predates gate margins
        dp.receive(m.Step(0, 5, F, 9, b"b").to_dict())
    assert e.value.code == "bad_field"
    plain = _generating(gate_margin=False)
    plain.receive(m.Step(0, 4, F, 9, b"a", margin=2.5).to_dict())
    assert plain.next_action().margin is None  # a plain gate reads f alone


# --- a trained plugin, its .pte, and the split ---------------------------------


@pytest.fixture(scope="module")
def margin_export(tmp_path_factory):
    """A quick plugin trained with the flip labels and the margin gate, exported (fp32)."""
    root = tmp_path_factory.mktemp("margin")
    run_spa("train", "--quick", "--profile", "outcome", "--gate-labels", "flip", "--gate-margin",
            "--out", root / "plugin")
    run_spa("export", root / "plugin", "--out", root / "export", "--variants", "fp32", "--no-training")
    return root


def test_a_trained_margin_gate_uses_the_margin_and_its_pte_matches_eager(margin_export, backbone):
    plugin = load_plugin(margin_export / "plugin")
    assert plugin.config.gate_input == MARGIN_GATE
    assert plugin.config.training["settings"]["gate_input"] == MARGIN_GATE
    # Trained on flip labels, the gate opens more where the backbone hesitates: a negative margin weight.
    weight = plugin.gate.classifier.weight.detach()
    assert (weight[1, -1] - weight[0, -1]).item() < -0.1, weight[:, -1]
    pte = PtePlugin(margin_export / "export" / "plugin-fp32.pte")
    assert pte.config.gate_margin and pte.gate_weights()[0].shape == (2, backbone.hidden_size + 1)
    f = torch.randn(backbone.hidden_size) * 15
    with torch.no_grad():
        for margin in (0.0, 0.7, 12.0):
            row = gate_row(f, torch.tensor(margin))
            assert abs(pte.gate(row.numpy()) - plugin.gate(row)[0].item()) <= 1e-4
    with pytest.raises(Exception, match="reads 577 values"):
        pte.gate(f.numpy())  # f alone is refused, not misread


DOCS = ["aclsum:test:0", "aclsum:test:1"]
MAX_NEW = 24


def test_the_split_with_a_margin_gate_equals_the_reference(margin_export, backbone, gateway):
    pte = PtePlugin(margin_export / "export" / "plugin-fp32.pte")
    side, total = 0, 0
    for doc in DOCS:
        prompt = device_prompt(pte.config, load_document(doc, pte.config.max_doc_tokens))
        ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=MAX_NEW)
        side, total = side + sum(ref.sigmas), total + len(ref.sigmas)
        for window, in_flight, push in ((0, 1, False), (8, 4, False), (8, 4, True)):
            options = m.Options(window=window, max_new_tokens=MAX_NEW)
            result = asyncio.run(run_session(gateway.url, pte, prompt, options, token=GATEWAY_TOKEN,
                                             max_in_flight=in_flight, push_taps=push))
            assert result.tokens == ref.tokens, (doc, window, in_flight, push)
            assert result.sigmas == ref.sigmas, (doc, window, in_flight, push)
            if push:  # the cloud's copy of the margin gate predicted the device's: taps came with the steps
                assert result.stats["gateway"]["pushed"] > 0
    assert 0 < side < total, (side, total)  # the gate really decides
