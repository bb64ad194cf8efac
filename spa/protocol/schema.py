"""The wire protocol's schema, written once (spa/protocol/schema.json), and what is made from it.

schema.json lists every message (fields, types, ranges, who sends it), the maps inside messages,
the error codes with their close codes, the limits with their defaults and the `end.stats` keys.
From it:

* the Python side takes its error codes (spa/protocol/errors.py) and the directions of the
  messages (spa/protocol/messages.py); tests/protocol/test_schema.py checks the parser, the limits
  and the gateway's statistics against it;
* `java_source()` is android_demo's `Schema.java` (version, message types, directions, error codes,
  limits), which the Java client uses;
* `doc_tables()` are the tables of docs/PROTOCOL.md between `<!-- schema:NAME -->` markers;
* `message_vectors()` are tests/vectors/message_vectors.json: maps and the outcome every parser
  must agree on (the Python and the Java suites both run them).

    python -m spa.protocol.schema --write    # regenerate Schema.java, the doc tables, the vectors
    python -m spa.protocol.schema --check    # exit 1 if any of them is stale
"""

import functools
import json
import re
import sys
from pathlib import Path

import msgpack
import numpy as np

SCHEMA_PATH = Path(__file__).with_name("schema.json")
ROOT = Path(__file__).resolve().parents[2]
JAVA_PATH = ROOT / "android_demo/protocol/src/main/java/org/spa/protocol/Schema.java"
DOC_PATH = ROOT / "docs/PROTOCOL.md"
VECTORS_PATH = ROOT / "tests/vectors/message_vectors.json"
INT32_MAX = (1 << 31) - 1


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def receives(side: str) -> frozenset:
    """The message types `side` ("device" or "gateway") receives; `error` goes both ways."""
    sender = "gateway" if side == "device" else "device"
    return frozenset(name for name, msg in schema()["messages"].items() if msg["from"] in (sender, "either"))


def fields(kind: str) -> list[dict]:
    """The fields of a message or of a map (`map:NAME`, `array:NAME`)."""
    if kind.startswith(("map:", "array:")):
        return schema()["maps"][kind.split(":", 1)[1]]
    return schema()["messages"][kind]["fields"]


# --- docs/PROTOCOL.md's tables ------------------------------------------------------------------

def _range(f: dict) -> str:
    t = f["type"]
    if "choices" in f:
        return "one of " + ", ".join(f"`\"{c}\"`" for c in f["choices"])
    if t == "int" and ("min" in f or "max" in f):
        return f"int in `[{f.get('min', 0)}, {_power(f.get('max', INT32_MAX))}]`"
    if t in ("float", "float32") and "min" in f:
        return f"{t} ≥ {f['min']:g}"
    if t == "str" and f.get("max_len"):
        return f"str ≤ {f['max_len']} characters"
    if t.startswith("map:"):
        return f"map (`{t[4:]}`)"
    if t.startswith("array:"):
        return f"array of `{t[6:]}` maps"
    return {"str_array": "array of str", "numbers": "map str → number", "act": "act (§5)"}.get(t, t)


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _power(n: int) -> str:
    return {INT32_MAX: "2^31 - 1", (1 << 63) - 1: "2^63 - 1"}.get(n, str(n))


def _field_table(rows: list[dict]) -> str:
    lines = ["| key | type | meaning |", "|---|---|---|"]
    for f in rows:
        optional = "" if f["required"] else ", optional"
        lines.append(f"| `{f['name']}` | {_range(f)}{optional} | {f['meaning']} |")
    return "\n".join(lines)


def doc_tables() -> dict[str, str]:
    s = schema()
    tables = {}
    lines = ["| message | sent by | fields (optional ones in brackets) | what it says |", "|---|---|---|---|"]
    for name, msg in s["messages"].items():
        names = ", ".join(f"`{f['name']}`" if f["required"] else f"[`{f['name']}`]" for f in msg["fields"]) or "—"
        lines.append(f"| `{name}` | {msg['from']} | {names} | {msg['meaning']} |")
    tables["messages"] = "\n".join(lines)
    for name in s["messages"]:
        if s["messages"][name]["fields"]:
            tables[f"message:{name}"] = _field_table(s["messages"][name]["fields"])
    for name, rows in s["maps"].items():
        tables[f"map:{name}"] = _field_table(rows)
    lines = ["| code | close code | meaning |", "|---|---|---|"]
    lines += [f"| `{e['code']}` | {e['close']} | {e['meaning']} |" for e in s["errors"]]
    tables["errors"] = "\n".join(lines)
    lines = ["| name | default | meaning |", "|---|---|---|"]
    lines += [f"| `{lim['name']}` | {_number(lim['default'])} | {lim['meaning']} |" for lim in s["limits"]]
    tables["limits"] = "\n".join(lines)
    lines = ["| key | meaning |", "|---|---|"]
    lines += [f"| `{st['name']}` | {st['meaning']} |" for st in s["stats"]]
    tables["stats"] = "\n".join(lines)
    return tables


MARKER = re.compile(r"(<!-- schema:(?P<name>[\w:]+) -->\n)(?P<body>.*?)(<!-- /schema -->)", re.S)


def docs_with_tables(text: str) -> str:
    """`text` (docs/PROTOCOL.md) with every marked table replaced by the schema's."""
    tables = doc_tables()

    def fill(match):
        if match["name"] not in tables:
            raise KeyError(f"docs/PROTOCOL.md names a schema table {match['name']!r} that does not exist")
        return match[1] + tables[match["name"]] + "\n" + match[4]

    return MARKER.sub(fill, text)


# --- Java ------------------------------------------------------------------------------------------

def java_source() -> str:
    s = schema()

    def strings(names) -> str:
        return "{" + ", ".join(f'"{n}"' for n in names) + "}"

    errors = "\n".join(f'        m.put("{e["code"]}", {e["close"]});' for e in s["errors"])
    limits = "\n".join(f'        m.put("{lim["name"]}", {float(lim["default"])!r});' for lim in s["limits"])
    return f"""package org.spa.protocol;

import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The wire protocol's constants, GENERATED from spa/protocol/schema.json by
 * `python -m spa.protocol.schema --write`: do not edit; tests check it is current.
 */
public final class Schema {{
    private Schema() {{}}

    public static final int VERSION = {s["version"]};
    /** The versions a gateway accepts in hello.version (a version 2 device gets version 2's behaviour). */
    public static final int[] VERSIONS = {{{", ".join(map(str, s["versions"]))}}};
    public static final int NORMAL_CLOSE = {s["normal_close"]};
    /** Every message type (docs/PROTOCOL.md section 4). */
    public static final String[] TYPES = {strings(s["messages"])};
    /** The types each side receives; `error` goes both ways. */
    public static final String[] GATEWAY_RECEIVES = {strings(sorted(receives("gateway")))};
    public static final String[] DEVICE_RECEIVES = {strings(sorted(receives("device")))};
    /** Error code -> websocket close code (docs/PROTOCOL.md section 7). */
    public static final Map<String, Integer> CLOSE_CODES;
    /** Limit name -> the reference gateway's default (docs/PROTOCOL.md section 8). */
    public static final Map<String, Double> LIMIT_DEFAULTS;

    static {{
        Map<String, Integer> m = new LinkedHashMap<String, Integer>();
{errors}
        CLOSE_CODES = Collections.unmodifiableMap(m);
    }}

    static {{
        Map<String, Double> m = new LinkedHashMap<String, Double>();
{limits}
        LIMIT_DEFAULTS = Collections.unmodifiableMap(m);
    }}
}}
"""


# --- message vectors -------------------------------------------------------------------------------

def _example(f: dict, path: str):
    """A valid value for field f."""
    t = f["type"]
    if path == "hello.version":
        return schema()["version"]
    if path.endswith("stats"):
        return {"tokens": 3, "rollbacks": 1}
    if "choices" in f:
        return f["choices"][0]
    if t == "int":
        return f.get("min", 0) + 1 if f.get("min", 0) else 1
    if t in ("float", "float32"):
        return 0.5
    return {
        "bool": True, "str": "text", "id": "id-1", "bin": b"\x01\x00\x00\x00", "layers": [0, 2],
        "numbers": {"a": 1, "b": 2.5}, "str_array": ["zstd", "none"], "act": _activation(),
    }.get(t) if not t.startswith(("map:", "array:")) else (
        example_map(t, path) if t.startswith("map:") else [example_map(t, path + "[0]")])


def _activation() -> dict:
    from spa.protocol import codec
    return codec.encode(np.arange(4, dtype=np.float32).reshape(1, 4), "int8", 1)


def example_map(kind: str, path: str) -> dict:
    """A valid map of `kind` (a message type, or map:NAME) with every field, optional ones too."""
    d = {"type": kind} if not kind.startswith(("map:", "array:")) else {}
    for f in fields(kind):
        d[f["name"]] = _example(f, f"{path}.{f['name']}")
    return d


_WRONG_TYPE = {"int": "1", "float": "x", "float32": "x", "bool": 1, "str": 1, "id": 1, "bin": "bytes?", "act": 1,
               "layers": [2, 1], "numbers": {"a": "b"}, "str_array": "zstd"}


def _bad_values(f: dict, path: str) -> list[tuple[str, object, str]]:
    """(why, value, expected code) of values field f must refuse."""
    t = f["type"]
    if path == "hello.version":
        return [("another version", schema()["version"] + 1, "version"), ("not an int", "2", "bad_field")]
    bad = [("wrong type", _WRONG_TYPE.get(t, 1), "bad_field")]
    if t == "int":
        lo, hi = f.get("min", 0), f.get("max", INT32_MAX)
        bad += [("below its range", lo - 1, "bad_field"), ("a bool", True, "bad_field")]
        if hi < (1 << 63) - 1:
            bad.append(("above its range", hi + 1, "bad_field"))
    if t in ("float", "float32"):
        bad.append(("not finite", float("nan"), "bad_field"))
        if "min" in f:
            bad.append(("below its range", f["min"] - 1.0, "bad_field"))
    if t == "float32":
        bad.append(("beyond float32", 1e39, "bad_field"))
    if "choices" in f:
        bad.append(("not a choice", "nope", "bad_field"))
    if t == "id":
        bad.append(("too long", "x" * 257, "bad_field"))
    if t == "str" and f.get("max_len"):
        bad.append(("too long", "x" * (f["max_len"] + 1), "bad_field"))
    return bad


def message_vectors() -> list[dict]:
    """Cases every parser must agree on: a valid map of each message, and per field its absence
    (required fields) and values out of type or range. `expect`: {"type": T} or {"code": C,
    "path": P} (the error message starts with P)."""
    cases = []

    def case(name, receiver, d, expect):
        cases.append({"name": name, "receiver": receiver, "msgpack": msgpack.packb(d, use_bin_type=True).hex(),
                      "expect": expect})

    for kind, msg in schema()["messages"].items():
        receiver = "device" if msg["from"] in ("gateway", "either") else "gateway"
        valid = example_map(kind, kind)
        case(f"{kind}: every field", receiver, valid, {"type": kind})
        required_only = {k: v for k, v in valid.items() if k == "type" or _required(kind, k)}
        case(f"{kind}: required fields only", receiver, required_only, {"type": kind})
        _field_cases(case, receiver, valid, kind, kind, [])
        other = "gateway" if receiver == "device" else "device"
        if msg["from"] != "either":
            case(f"{kind}: sent the wrong way", other, {"type": kind}, {"code": "unknown_type", "path": ""})
    case("no type", "gateway", {"epoch": 0}, {"code": "bad_field", "path": "message.type"})
    case("unknown type", "device", {"type": "stepp"}, {"code": "unknown_type", "path": ""})
    return cases


def _required(kind: str, name: str) -> bool:
    return next(f["required"] for f in fields(kind) if f["name"] == name)


def _field_cases(case, receiver, valid: dict, kind: str, path: str, where: list) -> None:
    """Cases for every field of the map at `where` inside `valid` (recursively into maps)."""
    def replaced(value, drop=False):
        d = json_copy(valid)
        target = d
        for key in where:
            target = target[key]
        if drop:
            del target[f["name"]]
        else:
            target[f["name"]] = value
        return d

    for f in fields(kind):
        fpath = f"{path}.{f['name']}"
        partners = _together(kind, f["name"])
        if f["required"]:
            case(f"{fpath}: missing", receiver, replaced(None, drop=True), {"code": "bad_field", "path": fpath})
        elif partners:  # sent with its partners or not at all: alone it is incomplete
            case(f"{fpath}: nil without its partners", receiver, replaced(None), {"code": "bad_field", "path": fpath})
        else:
            case(f"{fpath}: nil (absent)", receiver, replaced(None), {"type": valid["type"]})
        for why, value, code in _bad_values(f, fpath):
            case(f"{fpath}: {why}", receiver, replaced(value),
                 {"code": code, "path": fpath if code == "bad_field" else ""})
        if f["type"].startswith("map:"):
            _field_cases(case, receiver, valid, f["type"], fpath, where + [f["name"]])
        if f["type"].startswith("array:"):
            _field_cases(case, receiver, valid, f["type"], fpath + "[0]", where + [f["name"], 0])


def _together(kind: str, name: str) -> list[str]:
    """The fields of map `kind` that field `name` is sent with (schema.json "together")."""
    groups = schema().get("together", {}).get(kind.split(":", 1)[-1], []) if kind.startswith("map:") else []
    return next(([other for other in g if other != name] for g in groups if name in g), [])


def json_copy(d):
    """A deep copy of a map of plain values, bytes included."""
    if isinstance(d, dict):
        return {k: json_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [json_copy(v) for v in d]
    return d


def vectors_text() -> str:
    doc = {"about": "Generated from spa/protocol/schema.json by `python -m spa.protocol.schema --write`. Each case: "
                    "a msgpack map (hex) as `receiver` parses it, and the outcome: the message type, or the error "
                    "code and the path its message starts with (\"\": any message).",
           "cases": message_vectors()}
    return json.dumps(doc, indent=1) + "\n"


# --- the command -----------------------------------------------------------------------------------

def generated() -> dict[Path, str]:
    return {JAVA_PATH: java_source(), DOC_PATH: docs_with_tables(DOC_PATH.read_text()), VECTORS_PATH: vectors_text()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["--write"], ["--check"]):
        print("usage: python -m spa.protocol.schema --write | --check", file=sys.stderr)
        return 2
    stale = [path for path, text in generated().items() if not path.exists() or path.read_text() != text]
    if argv == ["--check"]:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python -m spa.protocol.schema --write", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(generated()[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
