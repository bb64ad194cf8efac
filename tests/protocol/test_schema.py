"""One protocol schema (spa/protocol/schema.json): the Python parser, the limits, the gateway's
statistics, the Java constants, the tables of docs/PROTOCOL.md and the shared message vectors all
agree with it."""

import json
from dataclasses import fields

import pytest

from spa.protocol import messages as m
from spa.protocol import schema as s
from spa.protocol.errors import CODES, ProtocolError
from spa.protocol.gateway import GatewayStats
from spa.protocol.limits import Limits


def test_the_generated_files_are_current():
    stale = [str(path.relative_to(s.ROOT)) for path, text in s.generated().items() if path.read_text() != text]
    assert not stale, f"stale (run python -m spa.protocol.schema --write): {stale}"


def _outcome(case) -> dict:
    try:
        return {"type": m.parse(__import__("msgpack").unpackb(bytes.fromhex(case["msgpack"]), raw=False),
                                case["receiver"]).TYPE}
    except ProtocolError as e:
        return {"code": e.code, "message": e.message}


def test_the_python_parser_agrees_with_every_message_vector():
    cases = json.loads(s.VECTORS_PATH.read_text())["cases"]
    assert len(cases) > 250
    wrong = []
    for case in cases:
        got, want = _outcome(case), case["expect"]
        if "type" in want:
            ok = got.get("type") == want["type"]
        else:
            ok = got.get("code") == want["code"] and got.get("message", "").startswith(want["path"])
        if not ok:
            wrong.append(f"{case['name']}: expected {want}, got {got}")
    assert not wrong, "\n".join(wrong[:20])


def test_every_message_and_map_sends_exactly_the_schema_fields():
    """A message built in Python with every field set puts on the wire exactly the schema's keys."""
    for kind in s.schema()["messages"]:
        d = s.example_map(kind, kind)
        sent = m.parse(d).to_dict()
        assert set(sent) == set(d), (kind, set(sent) ^ set(d))


def test_directions_error_codes_limits_and_stats_are_the_schema():
    sch = s.schema()
    assert m.VERSION == sch["version"]
    assert set(m.MESSAGES) == set(sch["messages"])
    assert m.RECEIVES["gateway"] == {k for k, v in sch["messages"].items() if v["from"] in ("device", "either")}
    assert {code: close for code, (close, _) in CODES.items()} == {e["code"]: e["close"] for e in sch["errors"]}
    assert Limits().to_dict() == {lim["name"]: lim["default"] for lim in sch["limits"]}
    stats = {"tokens", *GatewayStats().to_dict()}
    assert stats == {st["name"] for st in sch["stats"]}, stats ^ {st["name"] for st in sch["stats"]}
    assert {f.name for f in fields(Limits)} == {lim["name"] for lim in sch["limits"]}


def test_a_stale_doc_table_is_noticed_and_rewritten():
    text = "before\n<!-- schema:errors -->\n| old |\n<!-- /schema -->\nafter\n<!-- schema:limits -->\n<!-- /schema -->\n"
    out = s.docs_with_tables(text)
    assert out.startswith("before\n<!-- schema:errors -->\n| code |") and "| old |" not in out
    assert "\nafter\n<!-- schema:limits -->\n| name |" in out and out.endswith("<!-- /schema -->\n")
    with pytest.raises(KeyError):
        s.docs_with_tables("<!-- schema:nothing -->\n<!-- /schema -->")
