"""The Java client (host JVM) against the real Python gateway commits the Python device's tokens.

The Java client computes gate and side with its own float32 executor from the
exported weights; the Python device runs the `.pte` in ExecuTorch. Those
numerics legitimately differ (Java math vs XNNPACK), so, per the numerics
contract, the test first asserts that its data has margin (no p_t within 1e-3
of tau, top-2 logit gap > 1e-3 on every position), then demands identical
tokens.
"""

import asyncio
import json
import subprocess

import pytest

from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from spa.protocol.messages import Options
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import GATEWAY_TOKEN, ROOT

MAX_NEW = 20
CLI = ROOT / "android_demo" / "scripts" / "cli.sh"


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


def _with_margin(backbone, pte, prompt):
    """A tau at which this document's reference run has margin and uses the side on some tokens only."""
    for tau in (0.5, 0.3, 0.7, 0.1, 0.9, 0.05):
        ref = reference_generate(backbone, pte, prompt, tau=tau, max_new_tokens=MAX_NEW)
        margin = min(abs(p - tau) for p in ref.gate_p) > 1e-3 and min(ref.logit_gap) > 1e-3
        if margin and 0 < sum(ref.sigmas) < len(ref.sigmas):
            return tau, ref
    pytest.fail("no tau gives this document margin and a mixed gate; pick another document")


@pytest.mark.parametrize("doc", ["aclsum:test:0", "aclsum:test:4"])
def test_java_client_commits_the_python_device_tokens(gateway, exported, pte, backbone, doc, tmp_path, java_ready):
    export_dir, _ = exported
    prompt = device_prompt(pte.config, load_document(doc, pte.config.max_doc_tokens))
    tau, ref = _with_margin(backbone, pte, prompt)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt)
    for window in (0, 4):
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=window, max_new_tokens=MAX_NEW),
                                         tau=tau, token=GATEWAY_TOKEN))
        proc = subprocess.run([str(CLI), "--gateway", gateway.url, "--plugin", str(export_dir),
                               "--prompt-file", str(prompt_file), "--token", GATEWAY_TOKEN, "--window", str(window),
                               "--max-new-tokens", str(MAX_NEW), "--tau", repr(tau)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        java = json.loads(proc.stdout)
        assert python.tokens == ref.tokens
        assert java["tokens"] == python.tokens, (window, java["text"], python.text)
        assert java["sigma"] == python.sigmas
        assert java["text"] == python.text
        if window == 0:  # lock-step: the same messages, from the same encoder (with W > 0 how many
            # sigma = 0 positions one accept covers depends on when steps arrive)
            assert java["stats"]["bytes_up"] == python.stats["bytes_up"]


def test_java_and_python_clients_agree_with_and_without_frame_compression(gateway, exported, pte, backbone, tmp_path,
                                                                         java_ready):
    """Compression negotiated in the handshake (PROTOCOL.md §2): `none` (a phone without zstd) and `zstd`
    give the same tokens, from both clients, against the real gateway; only the bytes change."""
    export_dir, _ = exported
    prompt = device_prompt(pte.config, load_document("aclsum:test:0", pte.config.max_doc_tokens))
    tau, ref = _with_margin(backbone, pte, prompt)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt)
    runs = {}
    for offer, chosen in (("none", "none"), ("zstd", "zstd"), ("auto", "zstd"), ("none,zstd", "none")):
        proc = subprocess.run([str(CLI), "--gateway", gateway.url, "--plugin", str(export_dir), "--prompt-file",
                               str(prompt_file), "--token", GATEWAY_TOKEN, "--window", "4", "--max-new-tokens",
                               str(MAX_NEW), "--tau", repr(tau), "--compression", offer],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        java = json.loads(proc.stdout)
        assert java["stats"]["compression"] == chosen, (offer, java["stats"]["compression"])
        assert java["tokens"] == ref.tokens, (offer, java["text"])
        runs["java", offer] = java["stats"]
    for offer in (("none",), ("zstd",)):
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=4, max_new_tokens=MAX_NEW), tau=tau,
                                         token=GATEWAY_TOKEN, compression=offer))
        assert python.stats["compression"] == offer[0]
        assert python.tokens == ref.tokens
        runs["python", offer[0]] = python.stats
    # uncompressed frames cost more bytes down, for both clients alike
    assert runs["java", "none"]["bytes_down"] > runs["java", "zstd"]["bytes_down"]
    assert runs["python", "none"]["bytes_down"] > runs["python", "zstd"]["bytes_down"]
