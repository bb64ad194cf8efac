"""docs/PROTOCOL.md and the reference code agree, on the points where they once did not.

Each test quotes the rule it checks. The prompt construction is rebuilt here
from the spec's own text (template, instruction, whitespace list, truncation
rules), as a third-party client would, and compared with the reference device.
"""

import asyncio
import dataclasses
import json
import math
import re
import types
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from websockets.asyncio.client import connect

from spa.protocol import codec
from spa.model.plugin import Plugin, PluginConfig
from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.frames import FrameCodec

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "docs" / "PROTOCOL.md").read_text()
H = 16
RNG = np.random.default_rng(3)
F = codec.encode(RNG.normal(0, 15, (1, H)))
T = codec.encode(RNG.normal(0, 15, (3, H)), "int4", 4)
HELLO = m.Hello("", m.Plugin("fp", (0, 2), "h"), "p", m.Options()).to_dict()


def error_of(d, receiver=None) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        m.parse(d, receiver)
    return e.value


def in_spec(text: str) -> bool:
    """`text` appears in the spec (whitespace-insensitive: the spec wraps lines)."""
    squash = lambda s: " ".join(s.split())  # noqa: E731
    return squash(text) in squash(SPEC)


# --- hello.version -------------------------------------------------------------


def test_version_rule():
    assert in_spec(f"protocol version: `{m.VERSION}` (this text), or `2` for a device that knows nothing of settlement")
    assert in_spec("another int is error `version`; a missing `version`, or one that is not an int")
    assert m.VERSIONS == (2, 3)
    for other in (min(m.VERSIONS) - 1, max(m.VERSIONS) + 1):
        assert error_of({**HELLO, "version": other, "plugin": None}).code == "version"
    for bad in ("1", 1.0, None, True, -1):
        e = error_of({**HELLO, "version": bad})
        assert e.code == "bad_field" and e.message.startswith("hello.version"), bad
    e = error_of({k: v for k, v in HELLO.items() if k != "version"})
    assert e.code == "bad_field" and e.message.startswith("hello.version")


# --- type ----------------------------------------------------------------------


def test_type_rule():
    assert in_spec("A map whose `type` is missing or not a str is `bad_field` (path `message.type`); a str of any "
                   "length that names no message is `unknown_type`.")
    for d in ({"epoch": 0}, {"type": None}, {"type": 5}, {"type": b"accept"}):
        e = error_of(d)
        assert e.code == "bad_field" and e.message in ("message.type: expected a str", "message.type: missing"), d
    long = "x" * 100_000
    e = error_of({"type": long})
    assert e.code == "unknown_type" and len(e.message) < 200  # no 32-character limit; the text stays short


@pytest.mark.parametrize("receiver, d", [
    ("gateway", {"type": "step"}),  # incomplete, and the wrong way: the direction decides first
    ("gateway", {"type": "step", "epoch": 0, "pos": 1, "f": F, "draft": 2, "piece": b""}),
    ("gateway", {"type": "ready"}),
    ("gateway", {"type": "end", "reason": 5}),
    ("device", {"type": "hello"}),
    ("device", {"type": "side", "epoch": -1}),
    ("device", {"type": "bye"}),
])
def test_a_message_sent_the_wrong_way_is_unknown_type(receiver, d):
    assert in_spec("decided from `type` alone before any other field is read")
    assert error_of(d, receiver).code == "unknown_type"


def test_both_protocol_machines_apply_the_direction_rule():
    from spa.protocol.device import DeviceProtocol
    from spa.protocol.gateway import GatewayProtocol

    backbone = m.BackboneInfo("fake", "fp", num_layers=4, hidden_size=H)
    for receive, d in ((GatewayProtocol(backbone, eos_ids=[0]).receive, {"type": "step"}),
                       (GatewayProtocol(backbone, eos_ids=[0]).receive, {"type": "verdict", "epoch": "x"}),
                       (DeviceProtocol(m.Hello("", m.Plugin("fp", (0, 2), "h"), "p", m.Options())).receive,
                        {"type": "need_taps"})):
        with pytest.raises(ProtocolError) as e:
            receive(d)
        assert e.value.code == "unknown_type", d


def test_each_side_receives_its_own_messages_and_error():
    assert m.RECEIVES["gateway"] | m.RECEIVES["device"] == set(m.MESSAGES)
    assert m.RECEIVES["gateway"] & m.RECEIVES["device"] == {"error"}
    assert m.parse({"type": "error", "code": "x", "message": "y"}, "gateway") == m.Error("x", "y")
    assert m.parse({"type": "error", "code": "x", "message": "y"}, "device") == m.Error("x", "y")
    assert m.parse(m.Accept(0, 3).to_dict(), "gateway") == m.Accept(0, 3)
    assert error_of({"type": "accept", "epoch": 0}, "gateway").code == "bad_field"  # right way, incomplete


# --- activations -----------------------------------------------------------------


def test_f32_activations_accept_either_odtype():
    assert in_spec("for scheme `f32`, which has no outliers, it means nothing: senders send `\"f16\"`, "
                   "receivers accept either")
    x = RNG.normal(0, 3, (2, H)).astype(np.float32)
    sent = codec.encode(x, "f32")
    assert sent["odtype"] == "f16"
    for odtype in ("f16", "f32"):
        assert np.array_equal(codec.decode({**sent, "odtype": odtype}), x)
    with pytest.raises(ProtocolError):
        codec.decode({**sent, "odtype": "bf16"})


def test_parse_keeps_each_decoded_activation():
    pushed = m.Step(0, 4, F, 7, b"a", taps=T)
    for msg, fields in ((pushed, {"f_array": F, "taps_array": T}), (m.Step(0, 4, F, 7, b"a"), {"f_array": F}),
                        (m.Taps(0, 4, T), {"taps_array": T}), (m.Side(0, 4, F), {"s_array": F})):
        got = m.parse(FrameCodec().unpack(FrameCodec().pack(msg.to_dict())))
        assert got == msg  # the arrays take no part in equality
        for name, encoded in fields.items():
            array = getattr(got, name)
            assert array.dtype == np.float32 and np.array_equal(array, codec.decode(encoded)), name
        assert getattr(msg, next(iter(fields))) is None  # built to be sent: nothing decoded
    assert m.parse(m.Step(0, 4, F, 7, b"a").to_dict()).taps_array is None


def test_parse_decodes_each_activation_once(monkeypatch):
    calls = []
    real = codec.decode
    monkeypatch.setattr(codec, "decode", lambda d: calls.append(1) or real(d))
    m.parse(m.Step(0, 4, F, 7, b"a", taps=T).to_dict())
    assert len(calls) == 2


# --- error texts ---------------------------------------------------------------------


def test_error_texts_read_well():
    e = error_of({**HELLO, "prompt": 5})
    assert e.message == "hello.prompt: expected a str"
    e = error_of({**HELLO, "gate": {"weight": b"", "bias": b"", "tau": "high"}})
    assert e.message == "hello.gate.tau: expected a finite number"
    e = error_of({**HELLO, "options": {**HELLO["options"], "temperature": -1}})
    assert e.message == "hello.options.temperature: expected a finite number >= 0"
    for payload in (b"\xc1", b"\xc1\xc1 not msgpack", b"\x91" * 5000 + b"\xc0"):
        with pytest.raises(ProtocolError) as exc:
            FrameCodec().unpack(zstandard.compress(payload))
        reason = exc.value.message.removeprefix("bad msgpack: ")
        assert exc.value.message.startswith("bad msgpack: ") and len(reason) > 10, exc.value.message


# --- the gate rule -----------------------------------------------------------------


def test_gate_rule_is_in_the_spec_and_is_what_the_plugin_computes():
    for rule in ("`p_t = softmax(M_c rms(f̂_t) + b)[1]`", "**`sigma_t = 1` exactly when `p_t > tau`**",
                 "`spa train` chooses it on the validation split", "(`spa summarize --tau`)",
                 "**The `.pte` methods take raw inputs and normalise inside**"):
        assert in_spec(rule), rule
    torch.manual_seed(0)
    plugin = Plugin(PluginConfig(backbone={"hidden_size": H, "num_layers": 4}, taps=[0, 2, 4])).eval()
    f = torch.from_numpy(codec.decode(F)[0])
    w = plugin.gate.classifier.weight.detach().numpy().astype(np.float64)
    b = plugin.gate.classifier.bias.detach().numpy().astype(np.float64)
    x = f.numpy().astype(np.float64)
    x = x / math.sqrt(np.mean(x * x) + 1e-6)  # the spec's rms, fed the raw decoded f
    logits = w @ x + b
    p_spec = float(np.exp(logits[1]) / np.exp(logits).sum())
    p = float(plugin.gate(f)[0])
    assert abs(p - p_spec) < 1e-5
    assert float(plugin.sigma(f, tau=p)) == 0.0  # p = tau: closed (strictly greater)
    assert float(plugin.sigma(f, tau=float(np.nextafter(np.float32(p), np.float32(-1))))) == 1.0  # p is float32


# --- closing after a received error ------------------------------------------------------


def test_gateway_closes_with_1000_after_a_device_error(gateway):
    assert in_spec("it closes the connection itself with **1000**")
    fingerprint = next(line for line in gateway.output if "spa gateway: serving" in line).split("(")[1].split(")")[0]
    from tests.conftest import GATEWAY_TOKEN

    hello = m.Hello(GATEWAY_TOKEN, m.Plugin(fingerprint, (0, 1), "h"), "Hello there.",
                    m.Options(window=1, max_new_tokens=8)).to_dict()
    error = {"type": "error", "code": "internal", "message": "the device broke"}

    async def run(first: list):
        fc, got = FrameCodec(), []
        async with connect(gateway.url, compression=None) as conn:
            for d in first:
                await conn.send(fc.pack(d))
                if d["type"] == "hello":
                    got += [fc.unpack(await asyncio.wait_for(conn.recv(), 60)) for _ in range(2)]  # ready, step
            await conn.send(fc.pack(error))
            try:
                async for data in conn:
                    got.append(fc.unpack(data))
            except Exception:  # noqa: BLE001 - the close is what we look at
                pass
            await conn.wait_closed()
            return got, conn.close_code

    for first in ([], [hello]):  # before a session, and in the middle of one
        got, close_code = asyncio.run(run(first))
        assert close_code == 1000 and not [g for g in got if g["type"] == "error"], (first, got)


@pytest.mark.parametrize("ending", ["bye", "error", "close frame"])
def test_a_session_the_device_ended_cannot_be_resumed(gateway, ending):
    """§2/§7: a device that says bye, sends an error or closes with a close frame abandons its
    session; its unexpired resume token must not revive it (the gateway would have rebuilt it)."""
    assert in_spec("abandons its session, like `bye`")
    fingerprint = next(line for line in gateway.output if "spa gateway: serving" in line).split("(")[1].split(")")[0]
    from tests.conftest import GATEWAY_TOKEN

    hello = m.Hello(GATEWAY_TOKEN, m.Plugin(fingerprint, (0, 1), "h"), "Hello there.",
                    m.Options(window=1, max_new_tokens=8))

    async def run():
        fc = FrameCodec()
        async with connect(gateway.url, compression=None) as conn:
            await conn.send(fc.pack(hello.to_dict()))
            ready = m.parse(fc.unpack(await asyncio.wait_for(conn.recv(), 60)))
            await asyncio.wait_for(conn.recv(), 60)  # the first step
            if ending == "bye":
                await conn.send(fc.pack({"type": "bye"}))
            elif ending == "error":
                await conn.send(fc.pack(m.Error("internal", "the device broke").to_dict()))
            await conn.close()
        await asyncio.sleep(0.5)  # the gateway frees the session
        resume = m.Resume(ready.session, ready.secret, ready.prompt_tokens - 1, ())
        again = dataclasses.replace(hello, resume=resume)
        async with connect(gateway.url, compression=None) as conn:
            await conn.send(fc.pack(again.to_dict()))
            answer = fc.unpack(await asyncio.wait_for(conn.recv(), 60))
        return answer

    answer = asyncio.run(run())
    assert answer["type"] == "error" and answer["code"] == "resume_failed", answer
    assert "ended" in answer["message"]


# --- the prompt, rebuilt from the spec's text --------------------------------------------


def _spec_prompt_section() -> str:
    start = SPEC.index("**The prompt.**")
    return SPEC[start:SPEC.index("**Cloud-side projection.**", start)]


class ThirdPartyPrompt:
    """A client written from docs/PROTOCOL.md §4, "The prompt", and nothing else."""

    def __init__(self):
        text = _spec_prompt_section()
        self.template = json.loads(re.search(r'as a JSON string,\s*`("<\|im_start\|>.*?")`', text, re.S).group(1))
        self.instruction = json.loads(re.search(r'is\s+`("Summarize[^`]*")`', text).group(1))
        spaces = re.search(r"`str.isspace\(\)` accepts:(.*?)\. A text", text, re.S).group(1)
        self.space = set()
        for item in spaces.replace("\n", " ").split(","):
            ends = [int(u, 16) for u in re.findall(r"U\+([0-9A-F]{4})", item)]
            self.space |= {chr(c) for c in range(ends[0], ends[-1] + 1)}

    @staticmethod
    def est(s: str) -> int:
        return (len(s) + 3) // 4

    def prompt(self, document: str) -> str:
        return self.template.replace("{instruction}", self.instruction).replace("{document}", document)

    def plain(self, text: str, n: int) -> str:
        words, word = [], ""
        for ch in text:
            if ch in self.space:
                if word:
                    words.append(word)
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
        t, c = " ".join(words), 4 * n
        if len(t) <= c:
            return t
        cut = t[:c].rfind(" ")
        return t[:cut] if cut > 0 else t[:c]

    def paper(self, row: dict, n: int) -> str:
        budget, keep = n - self.est(row["title"]), {}
        for section in ("abstract", "conclusion", "introduction"):
            for sentence in row["sentences"].get(section, []):
                cost = self.est(" " + sentence)
                if cost > budget:
                    break
                budget -= cost
                keep.setdefault(section, []).append(sentence)
        lines = [row["title"]] + [f"{s[0].upper()}{s[1:]}: " + " ".join(keep[s])
                                  for s in ("abstract", "introduction", "conclusion") if keep.get(s)]
        return "\n".join(lines)


PLAIN_TEXTS = [
    "Short text.",
    "  Leading and\ttrailing\n\nwhitespace, paragraphs\r\nand {braces} {document} {instruction}.  ",
    "no\u00a0break\u2003em\u3000ideographic\x1cfile-separator\u200bzero-width(not a space)",
    "x" * 2000,  # one word longer than the budget: cut inside it
    ("word " * 3000) + "end",
    "Résumé naïve ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " * 200,  # code points, not UTF-16 units or bytes
]


@pytest.fixture(scope="module")
def client():
    return ThirdPartyPrompt()


@pytest.fixture(scope="module")
def config(backbone):
    """A plugin config as `spa train` records it: the backbone's own chat template and the instruction."""
    from spa.data.prompts import GENERIC_INSTRUCTION, chat_template

    return types.SimpleNamespace(prompt_template=chat_template(backbone.tokenizer), instruction=GENERIC_INSTRUCTION)


def test_the_spec_names_the_trained_template_and_instruction(client, backbone):
    """The template the spec quotes is SmolLM2's own chat template, as `spa train` records it (a
    client that follows the text gets the trained prompt's tokens)."""
    from spa.data.prompts import GENERIC_INSTRUCTION, chat_template

    assert client.template == chat_template(backbone.tokenizer)
    assert client.instruction == GENERIC_INSTRUCTION


@pytest.mark.parametrize("n", [1, 7, 128, 384, 4096])
def test_third_party_plain_text_prompt_is_the_reference_prompt(client, config, tmp_path, n):
    from device_runtime.documents import device_prompt, load_document

    for i, text in enumerate(PLAIN_TEXTS):
        path = tmp_path / f"doc{i}.txt"
        path.write_bytes(text.encode())  # no newline translation
        assert device_prompt(config, load_document(str(path), n)) == client.prompt(client.plain(text, n)), (i, n)


def test_third_party_aclsum_prompt_is_the_reference_prompt(client, config):
    from device_runtime.documents import device_prompt, load_document
    from spa.system.paths import package_dir

    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in open(package_dir("aclsum") / "dataset" / f"{split}.jsonl")]
        for index in range(0, len(rows), 7):
            for n in (1, 128, 384, 1000):
                mine = client.prompt(client.paper(rows[index], n))
                assert device_prompt(config, load_document(f"aclsum:{split}:{index}", n)) == mine, (split, index, n)


# --- the budget: the note and the flag -----------------------------------------------------


def test_a_cut_document_says_what_was_kept(tmp_path):
    from device_runtime.documents import read_document

    path = tmp_path / "long.txt"
    path.write_text("A word.\n\n" * 2000)
    doc = read_document(str(path), 128)
    assert doc.note() == ("document cut to 511 of 18,000 characters: the first 128 of 4,000 words "
                          "(--max-doc-tokens 128; at most 4,096)")
    assert read_document(str(path), 4096).note() is None  # 15,999 characters fit in 16,384
    paper = read_document("aclsum:test:0", 384)
    assert paper.note().startswith(f"document cut to {len(paper.text):,} of ")
    assert "the title and " in paper.note() and "sentences" in paper.note()


def test_summarize_checks_max_doc_tokens():
    from tests.conftest import run_spa

    for bad in ("0", "4097", "-3"):
        proc = run_spa("summarize", "README.md", "--plugin", "missing.pte", "--max-doc-tokens", bad, check=False,
                       timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--max-doc-tokens must be between 1 and 4096" in proc.stderr, proc.stderr


def test_summarize_says_on_stderr_what_it_kept(gateway, pte_path, tmp_path):
    from tests.conftest import GATEWAY_TOKEN, run_spa

    path = tmp_path / "long.txt"
    path.write_text("A word.\n\n" * 2000)
    proc = run_spa("summarize", path, "--plugin", pte_path, "--gateway", gateway.url, "--token", GATEWAY_TOKEN,
                   "--max-new-tokens", "2", "--max-doc-tokens", "16", "--json", timeout=300)
    assert ("spa summarize: document cut to 63 of 18,000 characters: the first 16 of 4,000 words "
            "(--max-doc-tokens 16; at most 4,096)") in proc.stderr.splitlines(), proc.stderr
    assert json.loads(proc.stdout)["stats"]["tokens"] >= 1
