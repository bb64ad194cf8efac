"""On-device learning through a real gateway: `spa personalize` against the SmolLM2 gateway of the run,
the quick plugin's training program (written by the session's `spa export`), and then the learned plugin
through the split, token for token against the in-process reference with that plugin.

The learning here is cut to one epoch on five short examples (seconds, not minutes); what a full run
does is `spa bench device --learning` (benchmarks/learnbench.py)."""

import asyncio
import json

import msgpack
import numpy as np
import pytest
import zstandard
from websockets.asyncio.server import serve

from device_runtime.client import run_session
from device_runtime.documents import device_prompt, load_document
from device_runtime.personalize import personalize
from spa.errors import SpaError
from spa.model.personal import PersonalPlugin, PersonalStore
from spa.model.reference import reference_generate
from spa.protocol.messages import Options
from tests.conftest import GATEWAY_TOKEN, run_spa
from training.examples import example_settings

EXAMPLES = [
    ("We train a small side network beside a frozen language model and gate it per token. On three "
     "benchmarks it matches fine-tuning at a fraction of the cost.", "A gated side network matches fine-tuning."),
    ("The cloud runs the backbone while the phone runs a tiny plugin; only states at gated positions "
     "cross the network.", "The phone's plugin saves bandwidth by gating."),
    ("We quantize activations to eight bits with a few outlier channels kept in half precision, and the "
     "tokens do not change.", "Int8 activations with outliers are lossless."),
    ("Drafting ahead lets the gateway continue while the device verifies, and a changed token rolls "
     "the drafts back.", "Drafting ahead hides the round trip."),
    ("A person's own summaries teach the plugin their style; twenty examples are enough to move the "
     "held-out loss.", "Twenty examples teach a personal style."),
]


def write_examples(path):
    path.write_text("".join(json.dumps({"document": d, "summary": s}) + "\n" for d, s in EXAMPLES))
    return path


def frame_map(data: bytes) -> dict:
    payload = zstandard.ZstdDecompressor().decompress(data) if data[:4] == b"\x28\xb5\x2f\xfd" else data
    return msgpack.unpackb(payload, raw=False)


@pytest.fixture(scope="module")
def taught(exported, gateway, tmp_path_factory):
    out, manifest = exported
    assert manifest["training"]["file"] == "plugin-train.pte", manifest.get("training")
    root = tmp_path_factory.mktemp("teach")
    frames = []
    settings = example_settings()
    settings.epochs = 1
    report = asyncio.run(personalize(gateway.url, out / "plugin-fp32.pte", write_examples(root / "mine.jsonl"),
                                     out=root / "store", token=GATEWAY_TOKEN, settings=settings,
                                     on_frame=lambda direction, data: frames.append((direction, data))))
    return report, frames, root


def test_the_device_learns_and_no_weight_or_gradient_crosses_the_wire(taught, exported):
    report, frames, root = taught
    store = PersonalStore(root / "store")
    assert report["version"] == "v000001" and store.current.name == "v000001"
    config = store.config()
    assert config["tau"] == report["tau"]
    record = config["training"]["personalized"][-1]
    assert record["examples"] == 5 and len(record["examples_sha256"]) == 64
    assert not any(d[:20] in json.dumps(config) or s in json.dumps(config) for d, s in EXAMPLES)  # never their text
    assert report["traffic"]["examples"] == 5 and report["traffic"]["bytes_down"] > 0

    # Up: one teach per example (the schema's fields, text and ints only: no bin, no float) and a bye.
    up = [frame_map(data) for direction, data in frames if direction == "up"]
    assert [m["type"] for m in up] == ["teach"] * 5 + ["bye"]
    for m in up[:-1]:
        assert set(m) == {"type", "token", "plugin", "prompt", "summary", "codec", "outliers"}
        assert all(isinstance(v, (str, int)) for k, v in m.items() if k != "plugin")
    assert [m["summary"] for m in up[:-1]] == [s for _, s in EXAMPLES]
    down = [frame_map(data) for direction, data in frames if direction == "down"]
    assert {m["type"] for m in down} == {"states"}
    # No frame holds any weight, before or after learning, as float32 or float16 bytes.
    out, _ = exported
    start = PersonalStore.create(out, root / "fresh").weights()
    learned = store.weights()
    blob = b"".join(data for _, data in frames)
    payloads = b"".join(zstandard.ZstdDecompressor().decompress(data) for _, data in frames)
    for weights in (start, learned):
        for name, w in weights.items():
            flat = w.reshape(-1)
            nz = flat[np.flatnonzero(flat)[:8]]
            if len(nz) < 8:
                continue
            for raw in (nz.astype("<f4").tobytes(), nz.astype("<f2").tobytes()):
                assert raw not in blob and raw not in payloads, name
    assert any(not np.array_equal(start[k], learned[k]) for k in learned)  # and it did learn something


DOCS = ["aclsum:test:0", "aclsum:test:1"]


def test_the_learned_plugin_through_the_split_equals_its_reference(taught, gateway, backbone):
    _, _, root = taught
    plugin = PersonalPlugin(root / "store")
    projection = plugin.projection_weights()
    for doc in DOCS:
        prompt = device_prompt(plugin.config, load_document(doc, plugin.config.max_doc_tokens))
        ref = reference_generate(backbone, plugin, prompt, tau=plugin.tau, max_new_tokens=24, projection=projection)
        result = asyncio.run(run_session(gateway.url, plugin, prompt, Options(window=4, max_new_tokens=24),
                                         token=GATEWAY_TOKEN, cloud_projection=True, push_taps=True,
                                         max_in_flight=4, settle=True))
        assert result.tokens == ref.tokens and result.sigmas == ref.sigmas, doc
    # the command line too, with spa summarize's defaults (projection, pushed taps, settlement)
    proc = run_spa("summarize", DOCS[0], "--plugin", root / "store", "--gateway", gateway.url, "--token",
                   GATEWAY_TOKEN, "--max-new-tokens", "24", "--json")
    prompt = device_prompt(plugin.config, load_document(DOCS[0], plugin.config.max_doc_tokens))
    ref = reference_generate(backbone, plugin, prompt, tau=plugin.tau, max_new_tokens=24, projection=projection)
    assert json.loads(proc.stdout)["tokens"] == ref.tokens


def test_the_gateway_refuses_what_it_must(taught, exported, gateway, tmp_path):
    out, _ = exported
    examples = write_examples(tmp_path / "mine.jsonl")
    with pytest.raises(SpaError, match="unauthorized"):
        asyncio.run(personalize(gateway.url, out, examples, out=tmp_path / "a", token="wrong"))
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"document": d, "summary": "word " * 700}) + "\n" for d, _ in EXAMPLES))
    with pytest.raises(SpaError, match="limit: .*max_teach_tokens"):
        asyncio.run(personalize(gateway.url, out, long, out=tmp_path / "b", token=GATEWAY_TOKEN))
    assert not (tmp_path / "b" / "v000001").exists()  # nothing learned, nothing written


def test_a_gateway_that_predates_teaching_is_one_clear_line(exported, tmp_path):
    """An older gateway's parser does not know `teach`: it answers unknown_type (4001), as for any type."""
    out, _ = exported

    async def old_gateway(conn):
        await conn.recv()
        reply = {"type": "error", "code": "unknown_type", "message": "unknown message type 'teach'"}
        await conn.send(zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(reply)))
        await conn.close(4001)

    async def attempt():
        async with serve(old_gateway, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            await personalize(f"ws://127.0.0.1:{port}", out, write_examples(tmp_path / "mine.jsonl"),
                              out=tmp_path / "store")

    with pytest.raises(SpaError, match="predates on-device learning"):
        asyncio.run(attempt())


def test_the_states_are_spa_trains_forward(exported, gateway, backbone):
    """What comes down for an example is the forward `spa train` caches (training/tapcache.py), here in f32."""
    import torch

    from device_runtime.teach_client import fetch_states
    from spa.model.pte_plugin import PtePlugin
    from spa.protocol import messages as m

    out, manifest = exported
    pte = PtePlugin(out / manifest["variants"]["fp32"]["file"])
    document, summary = EXAMPLES[0]
    prompt = device_prompt(pte.config, document)
    parts, traffic = asyncio.run(fetch_states(
        gateway.url, m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash),
        [(prompt, summary)], hidden=pte.config.hidden_size, rank=pte.config.rank, token=GATEWAY_TOKEN, codec="f32"))
    ids, target = backbone.encode(prompt), backbone.encode(summary) + [min(backbone.eos_token_ids)]
    states = backbone.forward(torch.tensor([ids + target]), backbone.new_cache())[0][len(ids) - 1:-1]
    assert parts[0].targets.tolist() == target
    scale = float(states.abs().max())
    assert np.abs(parts[0].f - states[:, -1].numpy()).max() <= 1e-4 * scale
    assert np.abs(parts[0].x - states[:, pte.config.taps].numpy()).max() <= 1e-4 * scale
    assert traffic.tokens == [len(target)]


def test_with_the_projection_the_states_are_the_clouds_projections_and_the_weights_cross_once(exported, gateway,
                                                                                              backbone):
    from device_runtime.teach_client import fetch_states
    from spa.model.projection import project
    from spa.model.pte_plugin import PtePlugin
    from spa.protocol import messages as m

    out, manifest = exported
    pte = PtePlugin(out / manifest["variants"]["fp32"]["file"])
    weight, bias = pte.projection_weights()
    weight = weight + np.float16(0.001)  # weights this gateway has not seen in another test
    upload = m.Projection(weight.shape[1], weight.astype("<f2").tobytes(), bias.astype("<f4").tobytes())
    pairs = [(device_prompt(pte.config, d), s) for d, s in EXAMPLES[:3]]
    wire = m.Plugin(pte.config.backbone["fingerprint"], tuple(pte.config.taps), pte.content_hash)
    frames = []
    parts, traffic = asyncio.run(fetch_states(
        gateway.url, wire, pairs, hidden=pte.config.hidden_size, rank=pte.config.rank, token=GATEWAY_TOKEN,
        codec="f32", projection=upload, on_frame=lambda direction, data: frames.append((direction, data))))
    assert traffic.projection_uploads == 1  # named by hash, upload_needed, then the weights once
    with_weights = [f for d, f in frames if d == "up" and "weight" in frame_map(f).get("projection", {})]
    assert len(with_weights) == 1
    assert traffic.to_dict()["bytes_up_per_example_without_upload"] < 2000
    ids = backbone.encode(pairs[0][0])
    target = backbone.encode(pairs[0][1]) + [min(backbone.eos_token_ids)]
    import torch

    states = backbone.forward(torch.tensor([ids + target]), backbone.new_cache())[0][len(ids) - 1:-1]
    assert parts[0].x.shape == (len(target), len(pte.config.taps), pte.config.rank)
    want = np.stack([project(row[pte.config.taps].numpy(), weight, bias) for row in states])
    assert np.abs(parts[0].x - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def test_teaches_waiting_together_are_one_forward_with_the_solo_states(backbone):
    """cloud_gateway/teaching.py's batched forward (right-padded rows) against each row's solo forward."""
    from cloud_gateway.teaching import forward

    taps = [0, 10, 20, 30]
    requests = []
    for document, summary in EXAMPLES[:3]:
        prompt, target = backbone.encode(document), backbone.encode(summary) + [min(backbone.eos_token_ids)]
        requests.append((prompt + target, len(prompt), taps, True))
    batched = forward(backbone, requests)
    for request, (f, x, margins) in zip(requests, batched):
        solo_f, solo_x, solo_m = forward(backbone, [request])[0]
        assert f.shape == solo_f.shape and x.shape == solo_x.shape == (len(request[0]) - request[1], len(taps), 576)
        scale = float(np.abs(solo_x).max())
        assert np.abs(x - solo_x).max() <= 1e-3 * scale and np.abs(f - solo_f).max() <= 1e-3 * scale
        assert np.abs(margins - solo_m).max() <= 1e-2


def test_a_teaching_connection_counts_as_a_session(backbone):
    """With max_sessions 1, an open teaching connection makes a new session (or a second teaching
    connection) `busy`; once it says bye, a session starts."""
    from websockets.asyncio.client import connect as ws_connect

    from cloud_gateway.process import ThreadedGateway
    from spa.protocol import messages as m
    from spa.protocol.frames import FrameCodec
    from spa.protocol.limits import Limits

    plugin = m.Plugin(backbone.identity.fingerprint, (0, 30), "h")
    teach = m.Teach("", plugin, "A short prompt.", "A summary.", "int8", 8).to_dict()
    hello = m.Hello("", plugin, "A short prompt.", m.Options(max_new_tokens=2)).to_dict()

    async def scenario(url):
        frames = FrameCodec()
        async with ws_connect(url, compression=None) as teacher:
            await teacher.send(frames.pack(teach))
            assert frames.unpack(await teacher.recv())["type"] == "states"
            for first in (hello, teach):  # the teaching connection is still open
                async with ws_connect(url, compression=None) as other:
                    await other.send(FrameCodec().pack(first))
                    answer = FrameCodec().unpack(await other.recv())
                    assert answer["type"] == "error" and answer["code"] == "busy", answer
            await teacher.send(frames.pack(m.Bye().to_dict()))
        for _ in range(50):  # the gateway frees the teaching connection's place as the close completes
            async with ws_connect(url, compression=None) as session:
                await session.send(FrameCodec().pack(hello))
                answer = FrameCodec().unpack(await session.recv())
            if answer["type"] != "error":
                break
            await asyncio.sleep(0.1)
        assert answer["type"] == "ready", answer

    with ThreadedGateway(backbone, Limits(max_sessions=1)) as gw:
        asyncio.run(scenario(gw.url))


def test_bad_input_to_spa_personalize_is_one_line_and_writes_nothing(exported, tmp_path):
    out, _ = exported
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "a text", "summary": ""}\n')
    for args, says in ((["--examples", tmp_path / "none.jsonl", "--plugin", out], "no such file"),
                       (["--examples", bad, "--plugin", out], "line 1"),
                       (["--examples", bad, "--plugin", tmp_path / "nothing.pte"], "no such export")):
        proc = run_spa("personalize", *args, "--out", tmp_path / "store", "--gateway", "ws://127.0.0.1:9", check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("spa personalize: error:") and says in lines[-1], lines[-1]
        assert not (tmp_path / "store").exists()
