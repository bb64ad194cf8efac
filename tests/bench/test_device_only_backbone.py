"""The device-only baseline's model: the whole backbone with a static KV cache, exported to ExecuTorch.

The full SmolLM2 export takes minutes and ~650 MB (spa bench link does it
once and checks its tokens against the eager backbone, recorded in its
report); here the same code runs on the real SmolLM2 weights cut to two
decoder layers, so the ExecuTorch program is built and run in well under a
minute, and its tokens are compared with the eager model's where the choice
has margin.
"""

import copy

import pytest
import torch

from export.device_only import StaticKVDecoder, PteBackbone, eager_greedy, export_backbone, parity_prompt
from spa.model.backbone import Backbone, BackboneIdentity


def test_static_kv_decoder_matches_the_hf_model_on_prefill_and_steps(backbone):
    ids = backbone.encode(parity_prompt(backbone))
    decoder = StaticKVDecoder(backbone.model, max_seq_len=128).eval()
    with torch.no_grad():
        got = decoder(torch.tensor([ids]), torch.arange(len(ids)))[0]
        ref = backbone.model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(got, ref, atol=2e-3), (got - ref).abs().max()
        seq = list(ids)
        for _ in range(3):  # one-token steps through the static cache
            token = int(torch.argmax(got))
            got = decoder(torch.tensor([[token]]), torch.tensor([len(seq)]))[0]
            seq.append(token)
            ref = backbone.model(torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(got, ref, atol=2e-3), (got - ref).abs().max()


@pytest.fixture(scope="module")
def two_layer_backbone(backbone):
    model = copy.deepcopy(backbone.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    ident = backbone.identity
    return Backbone(model, backbone.tokenizer,
                    BackboneIdentity(ident.name + "-2layers", ident.fingerprint + "-2", 2, ident.hidden_size,
                                     ident.vocab_size))


def test_exported_backbone_gives_the_eager_tokens(two_layer_backbone, tmp_path):
    report = export_backbone(two_layer_backbone, tmp_path, "fp32", max_seq_len=96, progress=lambda _: None)
    parity = report["parity"]
    assert parity["ok"] and parity["checked"] >= 4, parity
    assert (tmp_path / "backbone-fp32.pte").stat().st_size == report["bytes"]
    # The runtime keeps its KV cache across calls; a second prompt overwrites it from position 0.
    pte = PteBackbone(tmp_path / "backbone-fp32.pte")
    other = two_layer_backbone.encode("Hello! Tell me one fact about the moon.")
    ref, gaps = eager_greedy(two_layer_backbone, other, 4)
    got = pte.generate(other, 4)
    checked = next((i for i, g in enumerate(gaps) if g <= 1e-2), len(gaps))
    assert checked > 0 and got[:checked] == ref[:checked]
