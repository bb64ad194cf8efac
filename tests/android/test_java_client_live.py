"""The Java client (host JVM) against the real Python gateway commits the Python device's tokens.

The Java client computes gate and side with its own float32 executor from the
exported weights; the Python device runs the `.pte` in ExecuTorch. Those
numerics legitimately differ (Java math vs XNNPACK), so, per the numerics
contract, the tests first assert that their data has margin (no p_t within 1e-3
of tau, top-2 logit gap > 1e-3 on every position), then demand identical
tokens. Every mode of the protocol is run: lock-step and draft-ahead, one and
several side outputs in flight, pushed taps, the cloud-side projection, frame
compression none/zstd, and resumption after dropped connections (the fault
proxy of tests/gateway/test_faults.py between the Java client and the gateway).
One shared gateway, 20 tokens per run, to keep the suite fast. The mode tests run
both clients without settlement, so both speak the same protocol and, in lock-step,
send the same bytes; the settlement tests (protocol version 3: the device proves its
side tokens with the backbone's output head that `spa export` left in the cache) run
both clients settling, on the shared gateway and on one that streams branch lines
over a 300 ms link, and through cuts of the settling path.
"""

import asyncio
import json
import subprocess
import threading

import pytest

from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from spa.protocol.messages import Options
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from tests.conftest import GATEWAY_TOKEN, ROOT
from tests.gateway.test_faults import Fault, FaultProxy

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


@pytest.fixture(scope="module")
def doc0(backbone, pte, tmp_path_factory):
    """aclsum:test:0's prompt (also in a file, for the Java CLI), a tau with margin, its reference run."""
    prompt = device_prompt(pte.config, load_document("aclsum:test:0", pte.config.max_doc_tokens))
    tau, ref = _with_margin(backbone, pte, prompt)
    prompt_file = tmp_path_factory.mktemp("java-live") / "prompt.txt"
    prompt_file.write_text(prompt)
    return prompt, prompt_file, tau, ref


def _java(url, export_dir, prompt_file, tau, *args, max_new=MAX_NEW) -> dict:
    """`cli.sh` (the Java device) against url; its JSON result."""
    proc = subprocess.run([str(CLI), "--gateway", url, "--plugin", str(export_dir), "--prompt-file", str(prompt_file),
                           "--token", GATEWAY_TOKEN, "--max-new-tokens", str(max_new), "--tau", repr(tau), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("doc", ["aclsum:test:0", "aclsum:test:4"])
def test_java_client_commits_the_python_device_tokens(gateway, exported, pte, backbone, doc, tmp_path, java_ready):
    export_dir, _ = exported
    prompt = device_prompt(pte.config, load_document(doc, pte.config.max_doc_tokens))
    tau, ref = _with_margin(backbone, pte, prompt)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt)
    for window in (0, 4):
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=window, max_new_tokens=MAX_NEW),
                                         tau=tau, token=GATEWAY_TOKEN, settle=False))
        java = _java(gateway.url, export_dir, prompt_file, tau, "--window", str(window), "--in-flight", "1",
                     "--no-push-taps", "--no-cloud-projection", "--no-settle")
        assert python.tokens == ref.tokens
        assert java["tokens"] == python.tokens, (window, java["text"], python.text)
        assert java["sigma"] == python.sigmas
        assert java["text"] == python.text
        if window == 0:  # lock-step: the same messages, from the same encoder (with W > 0 how many
            # sigma = 0 positions one accept covers depends on when steps arrive)
            assert java["stats"]["bytes_up"] == python.stats["bytes_up"]


# (name, Java CLI options, run_session options): spa summarize's modes, W = 4
MODES = [
    ("in flight 1", ["--in-flight", "1", "--no-push-taps", "--no-cloud-projection"], {"max_in_flight": 1}),
    ("in flight 4", ["--in-flight", "4", "--no-push-taps", "--no-cloud-projection"], {"max_in_flight": 4}),
    ("pushed taps", ["--in-flight", "4", "--push-taps", "--no-cloud-projection"],
     {"max_in_flight": 4, "push_taps": True}),
    ("projection", ["--in-flight", "4", "--no-push-taps"],  # the Java CLI's default: the projection, by hash
     {"max_in_flight": 4, "cloud_projection": True}),
]


def test_java_client_commits_the_python_device_tokens_in_every_mode(gateway, exported, pte, doc0, java_ready):
    export_dir, _ = exported
    prompt, prompt_file, tau, ref = doc0
    runs = {}
    for name, java_args, python_kw in MODES:
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=4, max_new_tokens=MAX_NEW), tau=tau,
                                         token=GATEWAY_TOKEN, settle=False, **python_kw))
        java = _java(gateway.url, export_dir, prompt_file, tau, "--window", "4", *java_args, "--no-settle")
        assert java["tokens"] == python.tokens, (name, java["text"], python.text)
        assert java["sigma"] == python.sigmas, name
        assert java["text"] == python.text, name
        stats = java["stats"]
        for key in ("push_taps", "cloud_projection"):
            assert stats[key] == python.stats[key], (name, key)
        assert stats["gateway"]["tokens"] == len(ref.tokens)
        assert 1 <= stats["max_in_flight"] <= int(java_args[1]), name
        runs[name] = (java, python)
    if "projection" not in runs:
        return
    # without projection the tokens are the reference's; with it the gateway projects with float16 weights
    assert runs["in flight 4"][0]["tokens"] == ref.tokens
    java_push = runs["pushed taps"][0]["stats"]
    assert java_push["pushed_taps_used"] > 0  # some sigma = 1 positions skipped need_taps
    assert java_push["messages_up"].get("need_taps", 0) < runs["in flight 4"][0]["stats"]["messages_up"]["need_taps"]
    # the projection's taps are r columns, not H: far fewer bytes down per side token, as for Python
    java_proj, python_proj = runs["projection"]
    assert java_proj["stats"]["bytes_down"] < runs["in flight 4"][0]["stats"]["bytes_down"]
    # Both name the weights by hash; the Python run just left them with this gateway, so the Java
    # client's hello needs no upload (upload_needed would have made it send them).
    assert java_proj["stats"]["projection_uploads"] == 0
    assert java_proj["stats"]["handshake_bytes_up"] < 4096 <= python_proj.stats["handshake_bytes_up"] or \
        python_proj.stats["projection_uploads"] == 0


def test_java_and_python_clients_agree_with_and_without_frame_compression(gateway, exported, pte, doc0, java_ready):
    """Compression negotiated in the handshake (PROTOCOL.md §2): `none` (a phone without zstd) and `zstd`
    give the same tokens, from both clients, against the real gateway; only the bytes change."""
    export_dir, _ = exported
    prompt, prompt_file, tau, ref = doc0
    runs = {}
    for offer, chosen in (("none", "none"), ("zstd", "zstd"), ("auto", "zstd"), ("none,zstd", "none")):
        java = _java(gateway.url, export_dir, prompt_file, tau, "--window", "4", "--compression", offer)
        assert java["stats"]["compression"] == chosen, (offer, java["stats"]["compression"])
        assert java["tokens"] == ref.tokens, (offer, java["text"])
        runs["java", offer] = java["stats"]
    for offer in (("none",), ("zstd",)):
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=4, max_new_tokens=MAX_NEW), tau=tau,
                                         token=GATEWAY_TOKEN, compression=offer, settle=False))
        assert python.stats["compression"] == offer[0]
        assert python.tokens == ref.tokens
        runs["python", offer[0]] = python.stats
    # uncompressed frames cost more bytes down, for both clients alike
    assert runs["java", "none"]["bytes_down"] > runs["java", "zstd"]["bytes_down"]
    assert runs["python", "none"]["bytes_down"] > runs["python", "zstd"]["bytes_down"]


class _ProxyThread:
    """tests/gateway/test_faults.py's FaultProxy on an event loop of its own thread, so that a
    subprocess (the Java client) can go through it."""

    def __init__(self, target_port: int, faults):
        self.proxy = FaultProxy(target_port, faults)
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self.proxy.start())
        self.started.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(30), "the fault proxy did not start"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.proxy.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("window,in_flight", [(0, 1), (4, 4)])
def test_java_client_resumes_after_dropped_connections_with_identical_tokens(gateway, exported, doc0, java_ready,
                                                                            window, in_flight):
    """Four cuts in one session, each on a new connection: a step lost, a side output lost, a verdict
    lost (the gateway sends it again in resumed.commits), a step cut in half. The Java client resumes
    with the latest signed token each time; its tokens are the uninterrupted reference's."""
    export_dir, _ = exported
    prompt, prompt_file, tau, ref = doc0
    faults = [Fault("down", "step", 3, conn=0), Fault("up", "side", 1, conn=1),
              Fault("down", "verdict", 1, conn=2), Fault("down", "step", 2, mode="half", conn=3)]
    with _ProxyThread(gateway.port, faults) as proxy:
        java = _java(f"ws://127.0.0.1:{proxy.port}", export_dir, prompt_file, tau, "--window", str(window),
                     "--in-flight", str(in_flight), "--compression", "zstd",  # the proxy reads zstd frames
                     "--no-settle")  # these cuts hit side outputs and verdicts; settling: the test below
    assert all(f.fired for f in faults), (faults, proxy.proxy.seen)
    assert java["tokens"] == ref.tokens, java["text"]
    assert java["sigma"] == ref.sigmas
    assert java["stats"]["resumes"] == 4 and proxy.proxy.connections == 5
    assert java["stats"]["gateway"]["resumes"] == 4


def _assert_settled(java: dict, ref) -> None:
    """The Java device settled: it proved some side tokens, sent `side` only where a proof did not
    hold, and the gateway computed no verdict head for a settled token."""
    s = java["stats"]
    assert s["settle"] and s["settled"] > 0, s
    assert s["messages_up"].get("side", 0) == s["unproven"] == s["gateway"]["heads"], s
    assert s["messages_up"].get("settled", 0) >= s["settled"], s
    assert s["gateway"]["settled"] + s["gateway"]["heads"] == sum(ref.sigmas), (s, sum(ref.sigmas))


def test_java_client_settles_its_side_tokens_like_the_python_device(gateway, exported, pte, doc0, java_ready):
    """Settlement with the Java device (its own float32 proof on the memory-mapped output head): the
    reference's tokens, lock-step and W 4 with pushed taps and 4 in flight; the same tokens proven
    as by the Python device (both proofs are sound; they may differ only where a slack is within
    float rounding of 0, which this document does not have)."""
    export_dir, _ = exported
    prompt, prompt_file, tau, ref = doc0
    for window, args, kw in ((0, ["--in-flight", "1", "--no-push-taps"], {}),
                             (4, ["--in-flight", "4", "--push-taps"], {"max_in_flight": 4, "push_taps": True})):
        python = asyncio.run(run_session(gateway.url, pte, prompt, Options(window=window, max_new_tokens=MAX_NEW),
                                         tau=tau, token=GATEWAY_TOKEN, settle=True, **kw))
        java = _java(gateway.url, export_dir, prompt_file, tau, "--window", str(window), "--no-cloud-projection", *args)
        assert java["tokens"] == python.tokens == ref.tokens, (window, java["text"], python.text)
        assert java["sigma"] == ref.sigmas
        _assert_settled(java, ref)
        assert java["stats"]["settled"] == python.stats["settled"], (window, java["stats"], python.stats)
        if window == 0:  # lock-step: the same messages, `settled` where the Python device sent it
            assert java["stats"]["messages_up"] == python.stats["messages_up"]
            assert java["stats"]["bytes_up"] == python.stats["bytes_up"]
    # A device that does not settle gets the gateway's verdicts from the same gateway, same tokens.
    plain = _java(gateway.url, export_dir, prompt_file, tau, "--window", "4", "--no-settle")
    assert plain["tokens"] == ref.tokens and not plain["stats"]["settle"] and plain["stats"]["settled"] == 0


@pytest.fixture(scope="module")
def branch_gateway_300ms():
    """A gateway streaming the branch lines of 2 alternatives, behind a 300 ms round trip (as in
    tests/device/test_split.py: a line's first draft reaches the device before its proof needs it)."""
    from benchmarks.link import LinkProfile, ProxyLink
    from cloud_gateway.process import GatewayProcess

    with GatewayProcess("--token", GATEWAY_TOKEN, "--max-sessions", "4", "--branches", "2") as gw, \
            ProxyLink(LinkProfile("test-300ms", 300.0, None, None)) as link:
        yield gw, link.device_url("127.0.0.1", gw.port)


def test_java_client_continues_a_proven_change_on_a_streamed_branch_line(exported, pte, backbone, branch_gateway_300ms,
                                                                       java_ready):
    """With branch lines streamed, a token the Java device proved changed its draft continues on that
    token's line without a round trip (branch_adopted > 0), and the tokens stay the reference's. The
    documents, tau and length of tests/device/test_split.py's branch test, whose changes include tokens
    among the backbone's two runners-up (about one change in four is)."""
    export_dir, _ = exported
    _, url = branch_gateway_300ms
    adopted, rollbacks = 0, 0
    for doc in ("aclsum:test:0", "aclsum:test:1", "aclsum:test:2"):
        prompt = device_prompt(pte.config, load_document(doc, pte.config.max_doc_tokens))
        tau, max_new = pte.tau, 24
        ref = reference_generate(backbone, pte, prompt, tau=tau, max_new_tokens=max_new)
        assert min(ref.logit_gap) > 1e-3 and min(abs(p - tau) for p in ref.gate_p) > 1e-3, doc  # margin
        prompt_file = export_dir.parent / f"java-branch-{doc.replace(':', '-')}.txt"
        prompt_file.write_text(prompt)
        java = _java(url, export_dir, prompt_file, tau, "--window", "4", "--in-flight", "4", "--push-taps",
                     "--no-cloud-projection", max_new=max_new)
        print(doc, {k: java["stats"][k] for k in ("rollbacks", "branch_adopted", "settled", "unproven")})
        assert java["tokens"] == ref.tokens, (doc, java["text"])
        _assert_settled(java, ref)
        adopted += java["stats"]["branch_adopted"]
        rollbacks += java["stats"]["rollbacks"]
        assert java["stats"]["gateway"]["branch_streamed"] > 0, java["stats"]["gateway"]
    assert rollbacks > 0 and adopted > 0, (rollbacks, adopted)


def test_java_client_resumes_a_settling_session_after_dropped_connections(gateway, exported, doc0, java_ready):
    """Cuts on the settling path, each on a new connection: a step (with its exact f) lost, taps lost,
    a `settled` lost (the resume hello's committed tokens say what the device proved), a `settled`
    cut in half. The Java device resumes each time; its tokens are the reference's."""
    export_dir, _ = exported
    prompt, prompt_file, tau, ref = doc0
    faults = [Fault("down", "step", 2, conn=0), Fault("down", "taps", 1, conn=1),
              Fault("up", "settled", 1, conn=2), Fault("up", "settled", 1, mode="half", conn=3)]
    with _ProxyThread(gateway.port, faults) as proxy:
        java = _java(f"ws://127.0.0.1:{proxy.port}", export_dir, prompt_file, tau, "--window", "4",
                     "--in-flight", "4", "--no-push-taps", "--no-cloud-projection", "--compression", "zstd")
    assert all(f.fired for f in faults), (faults, proxy.proxy.seen)
    assert java["tokens"] == ref.tokens, java["text"]
    assert java["stats"]["settled"] > 0 and java["stats"]["resumes"] == 4, java["stats"]
