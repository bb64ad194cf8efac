"""wss://: the gateway serves TLS with its own certificate and key; the device
verifies it against a CA bundle. The certificate is self-signed, made by
`openssl req` in the test, for 127.0.0.1."""

import asyncio
import shutil
import subprocess

import pytest

from cloud_gateway.process import GatewayProcess, ThreadedGateway
from cloud_gateway.server import tls_context
from device_runtime.client import run_session
from spa.errors import SpaError
from spa.protocol import messages as m
from spa.protocol.limits import Limits
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import GATEWAY_TOKEN, run_spa

PROMPT = "<|im_start|>user\nWhat is a river?<|im_end|>\n<|im_start|>assistant\n"
MAX_NEW = 6


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=spa-test-gateway",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


def test_wss_session_is_verified_and_lossless(backbone, pte, certificate):
    cert, key = certificate
    ref = reference_generate(backbone, pte, PROMPT, tau=pte.tau, max_new_tokens=MAX_NEW)
    options = m.Options(window=2, max_new_tokens=MAX_NEW)
    with ThreadedGateway(backbone, Limits(), ssl_context=tls_context(str(cert), str(key))) as gw:
        assert gw.url.startswith("wss://")
        result = asyncio.run(run_session(gw.url, pte, PROMPT, options, cafile=str(cert)))
        assert result.tokens == ref.tokens
        # Without the CA the device refuses the gateway's certificate: a one-line error.
        with pytest.raises(SpaError, match="cannot reach the gateway.*CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(run_session(gw.url, pte, PROMPT, options))
        # Plain ws:// to a TLS port does not get a session either.
        with pytest.raises(SpaError, match="cannot reach the gateway"):
            asyncio.run(run_session(gw.url.replace("wss://", "ws://"), pte, PROMPT, options, open_timeout=10))
        assert gw.wait_until(lambda g: not g.sessions)


def test_cli_gateway_and_summarize_over_wss(pte_path, certificate, tmp_path):
    cert, key = certificate
    bad = run_spa("gateway", "--certfile", tmp_path / "missing.pem", "--port", "0", check=False, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("spa gateway: error: cannot load the TLS certificate")
    with GatewayProcess("--certfile", str(cert), "--keyfile", str(key), "--token", GATEWAY_TOKEN) as gw:
        assert gw.url.startswith("wss://127.0.0.1:")
        proc = run_spa("summarize", "aclsum:test:0", "--plugin", pte_path, "--gateway", gw.url, "--cafile", cert,
                       "--token", GATEWAY_TOKEN, "--max-new-tokens", "4", "--json", timeout=300)
        assert '"tokens": 4' in proc.stdout or '"finish_reason": "eos"' in proc.stdout
        refused = run_spa("summarize", "aclsum:test:0", "--plugin", pte_path, "--gateway", gw.url, "--token",
                          GATEWAY_TOKEN, "--max-new-tokens", "4", check=False, timeout=300)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
