"""Protocol messages (version 2) as dataclasses; docs/PROTOCOL.md §4 is the spec.

`parse(d)` turns an unpacked msgpack map into a message, validating every field
(type and range) and raising ProtocolError("bad_field", "<path>: <why>") on the
first defect. `msg.to_dict()` builds the map to send. Keys a message does not
define are ignored, so a later version can add optional fields.

Activations (`f`, `taps`, `s`) keep their encoded form (spa.protocol.codec), which is
what `to_dict` sends. Parsing decodes each one once, to validate it, and keeps
the decoded float32 matrix on the message (`Step.f_array`, `Step.taps_array`,
`Taps.taps_array`, `Side.s_array`) so that no receiver decodes it again. A
message built locally to be sent leaves those None.

`parse(d, receiver)` also enforces the direction: a known type that the
receiver never receives is `unknown_type` before its fields are looked at
(docs/PROTOCOL.md §3).
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from spa.protocol import codec
from spa.protocol.errors import ProtocolError
from spa.protocol.schema import receives, schema

VERSION = schema()["version"]  # 2: several side outputs in flight; resumed.commits
INT32_MAX = (1 << 31) - 1  # positions, epochs, token ids, counts: a Java int
INT64_MAX = (1 << 63) - 1  # seeds: a Java long
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_LAYER = 1024
MAX_RESUMED_COMMITS = 1 << 16  # at most max_new_tokens in practice
MAX_NAME = 256  # ids, fingerprints, hashes, codes
CODECS = codec.SCHEMES
END_REASONS = ("eos", "max_tokens")


class _Fields:
    """Typed access to one msgpack map; `path` names it in error messages."""

    def __init__(self, d, path: str):
        if not isinstance(d, dict):
            raise ProtocolError("bad_field", f"{path}: expected a map")
        self.d, self.path = d, path

    def _get(self, name: str):
        if name not in self.d:
            raise ProtocolError("bad_field", f"{self.path}.{name}: missing")
        return self.d[name]

    def _bad(self, name: str, why: str):
        raise ProtocolError("bad_field", f"{self.path}.{name}: {why}")

    def integer(self, name: str, lo: int = 0, hi: int = INT32_MAX) -> int:
        v = self._get(name)
        if type(v) is not int or not lo <= v <= hi:  # bool is not an int here
            self._bad(name, f"expected an int in [{lo}, {hi}]")
        return v

    def number(self, name: str, lo: float) -> float:
        v = self._get(name)
        if type(v) not in (int, float) or not math.isfinite(v) or v < lo:
            self._bad(name, "expected a finite number" + ("" if lo == -math.inf else f" >= {lo:g}"))
        return float(v)

    def float32(self, name: str, lo: float) -> float:
        """A number read as a float32, whatever width it was packed with; finite as a float32 too."""
        v = self.number(name, lo)
        if abs(v) > FLOAT32_MAX:
            self._bad(name, "expected a finite float32")
        return float(np.float32(v))

    def flag(self, name: str) -> bool:
        v = self._get(name)
        if type(v) is not bool:
            self._bad(name, "expected a bool")
        return v

    def text(self, name: str, max_len: int | None = MAX_NAME, choices=None) -> str:
        v = self._get(name)
        if type(v) is not str or (max_len is not None and len(v) > max_len):
            self._bad(name, "expected a str" + ("" if max_len is None else f" of at most {max_len} characters"))
        if choices is not None and v not in choices:
            self._bad(name, f"expected one of {', '.join(choices)}")
        return v

    def blob(self, name: str) -> bytes:
        v = self._get(name)
        if type(v) is not bytes:
            self._bad(name, "expected bin (bytes)")
        return v

    def map(self, name: str) -> "_Fields":
        return _Fields(self._get(name), f"{self.path}.{name}")

    def numbers(self, name: str) -> dict:
        """A map of str -> finite int or float (stats, limits)."""
        v = self._get(name)
        if not isinstance(v, dict) or not all(
            type(k) is str and type(x) in (int, float) and math.isfinite(x) for k, x in v.items()
        ):
            self._bad(name, "expected a map of str to finite numbers")
        return v

    def layers(self, name: str) -> tuple[int, ...]:
        v = self._get(name)
        if (
            not isinstance(v, list)
            or not v
            or not all(type(x) is int and 0 <= x <= MAX_LAYER for x in v)
            or any(a >= b for a, b in zip(v, v[1:]))
        ):
            self._bad(name, f"expected a non-empty ascending list of ints in [0, {MAX_LAYER}]")
        return tuple(v)

    def activation(self, name: str) -> tuple[dict, np.ndarray]:
        """(the encoded map, its decoded float32 [rows, cols]): decoded here, once."""
        v = self._get(name)
        try:
            return v, codec.decode(v)
        except ProtocolError as e:
            self._bad(name, e.message)


@dataclass(frozen=True)
class Plugin:
    fingerprint: str  # backbone fingerprint the plugin was trained on
    taps: tuple[int, ...]  # layer indices, ascending; 0 = embedding output
    content_hash: str

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "taps": list(self.taps), "content_hash": self.content_hash}

    @classmethod
    def read(cls, f: _Fields) -> "Plugin":
        return cls(f.text("fingerprint"), f.layers("taps"), f.text("content_hash"))


@dataclass(frozen=True)
class Options:
    window: int = 0  # W: drafted-but-unverified positions beyond the first; 0 = lock-step
    codec: str = "int8"  # activation scheme for f, taps and s
    outliers: int = 8  # outlier channels per row
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0  # sampling noise for position t comes from (seed, t)
    # Each step carries the backbone's top-2 logit margin (a margin gate reads it). Optional on
    # the wire, absent = False; sent only when True, so older peers see the same options map.
    gate_margin: bool = False

    def to_dict(self) -> dict:
        d = {
            "window": self.window,
            "codec": self.codec,
            "outliers": self.outliers,
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "seed": self.seed,
        }
        if self.gate_margin:
            d["gate_margin"] = True
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Options":
        return cls(
            window=f.integer("window"),
            codec=f.text("codec", choices=CODECS),
            outliers=f.integer("outliers", hi=codec.MAX_COLS),
            max_new_tokens=f.integer("max_new_tokens", lo=1),
            temperature=f.number("temperature", lo=0.0),
            seed=f.integer("seed", hi=INT64_MAX),
            gate_margin=f.d.get("gate_margin") is not None and f.flag("gate_margin"),
        )


MAX_RANK = 4096


@dataclass(frozen=True)
class Projection:
    """The side network's per-tap input projections, uploaded for the cloud-side
    projection option (docs/PROTOCOL.md §4, hello): the gateway then sends r values per
    tap instead of H. Little-endian raw arrays; sizes are checked by the
    gateway, which knows H."""

    rank: int  # r
    weight: bytes  # float16 [len(taps), r, H]: W_in, then Down_l for each further tap
    bias: bytes  # float32 [len(taps), r]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "weight": self.weight, "bias": self.bias}

    @classmethod
    def read(cls, f: _Fields) -> "Projection":
        return cls(f.integer("rank", lo=1, hi=MAX_RANK), f.blob("weight"), f.blob("bias"))


@dataclass(frozen=True)
class GateUpload:
    """The device's gate, uploaded so that the gateway pushes taps with the steps
    where it predicts sigma = 1 (docs/PROTOCOL.md §4, hello; spa/model/cloud_gate.py)."""

    weight: bytes  # float32 [2, H] (a margin gate: [2, H + 1]), little-endian: M_c
    bias: bytes  # float32 [2]
    tau: float

    def to_dict(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "tau": float(self.tau)}

    @classmethod
    def read(cls, f: _Fields) -> "GateUpload":
        return cls(f.blob("weight"), f.blob("bias"), f.number("tau", lo=-math.inf))


@dataclass(frozen=True)
class Resume:
    session: str  # ready.session
    secret: str  # the latest resume token: ready.secret, a refreshed step/verdict.secret, or resumed.secret
    # The first position the device has not committed (P - 1 + its committed
    # tokens). Optional in the map; a gateway that resumes requires it.
    next: int | None = None
    # The ids of every generated token the device committed, in order (on the
    # wire: bin, uint32 little-endian). Optional; a gateway that does not hold
    # the session (another replica, a restart) needs them to rebuild it.
    tokens: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        d = {"session": self.session, "secret": self.secret}
        if self.next is not None:
            d["next"] = self.next
        if self.tokens is not None:
            d["tokens"] = np.asarray(self.tokens, "<u4").tobytes()
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Resume":
        nxt = None if f.d.get("next") is None else f.integer("next")
        tokens = None
        if f.d.get("tokens") is not None:
            raw = f.blob("tokens")
            ids = np.frombuffer(raw, "<u4") if len(raw) % 4 == 0 else None
            if ids is None or (ids > INT32_MAX).any():
                f._bad("tokens", "expected bin of uint32 little-endian token ids below 2^31")
            tokens = tuple(int(t) for t in ids)
        return cls(f.text("session"), f.text("secret"), nxt, tokens)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    fingerprint: str
    num_layers: int  # L; taps may name layers 0..L
    hidden_size: int  # H; columns of f, taps and s

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
        }

    @classmethod
    def read(cls, f: _Fields) -> "BackboneInfo":
        return cls(
            f.text("name"),
            f.text("fingerprint"),
            f.integer("num_layers", lo=1, hi=MAX_LAYER),
            f.integer("hidden_size", lo=1, hi=codec.MAX_COLS),
        )


# --- device -> gateway ---------------------------------------------------


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    token: str  # auth token; "" when the gateway needs none
    plugin: Plugin
    prompt: str  # formatted by the device (chat template included)
    options: Options
    resume: Resume | None = None  # continue a session whose connection was lost (PROTOCOL.md §6)
    version: int = VERSION
    # Cloud-side projection (opt-in, new sessions only; a resume keeps the session's).
    projection: Projection | None = field(default=None, repr=False)
    # Pushed taps (opt-in, new sessions only, like projection).
    gate: GateUpload | None = field(default=None, repr=False)
    # Frame compressions the device can read and write, preferred first (PROTOCOL.md §2);
    # None: not sent, which means ("zstd",).
    compression: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        d = {
            "type": self.TYPE,
            "version": self.version,
            "token": self.token,
            "plugin": self.plugin.to_dict(),
            "prompt": self.prompt,
            "options": self.options.to_dict(),
        }
        if self.resume is not None:
            d["resume"] = self.resume.to_dict()
        if self.projection is not None:
            d["projection"] = self.projection.to_dict()
        if self.gate is not None:
            d["gate"] = self.gate.to_dict()
        if self.compression is not None:
            d["compression"] = list(self.compression)
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Hello":
        # Version first: a hello of another version may have other fields.
        version = f.integer("version")
        if version != VERSION:
            raise ProtocolError("version", f"protocol version {version} is not supported (only {VERSION})")
        resume, projection, gate = f.d.get("resume"), f.d.get("projection"), f.d.get("gate")
        return cls(
            token=f.text("token"),
            plugin=Plugin.read(f.map("plugin")),
            prompt=f.text("prompt", max_len=None),
            options=Options.read(f.map("options")),
            resume=None if resume is None else Resume.read(f.map("resume")),
            projection=None if projection is None else Projection.read(f.map("projection")),
            gate=None if gate is None else GateUpload.read(f.map("gate")),
            compression=_compression_offer(f),
        )


@dataclass(frozen=True)
class Accept:
    TYPE: ClassVar[str] = "accept"
    epoch: int
    upto: int  # every position <= upto had sigma = 0: its draft is committed

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "upto": self.upto}

    @classmethod
    def read(cls, f: _Fields) -> "Accept":
        return cls(f.integer("epoch"), f.integer("upto"))


@dataclass(frozen=True)
class NeedTaps:
    TYPE: ClassVar[str] = "need_taps"
    epoch: int
    pos: int  # sigma = 1 here; every position < pos is accepted

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos}

    @classmethod
    def read(cls, f: _Fields) -> "NeedTaps":
        return cls(f.integer("epoch"), f.integer("pos"))


@dataclass(frozen=True)
class Side:
    TYPE: ClassVar[str] = "side"
    epoch: int
    pos: int
    s: dict  # encoded activation, 1 row
    s_array: np.ndarray | None = field(default=None, repr=False, compare=False)  # decoded s [1, H]; set by parse

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos, "s": self.s}

    @classmethod
    def read(cls, f: _Fields) -> "Side":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        s, s_array = f.activation("s")
        return cls(epoch, pos, s, s_array)


@dataclass(frozen=True)
class Bye:
    TYPE: ClassVar[str] = "bye"

    def to_dict(self) -> dict:
        return {"type": self.TYPE}

    @classmethod
    def read(cls, f: _Fields) -> "Bye":
        return cls()


# --- gateway -> device ---------------------------------------------------


@dataclass(frozen=True)
class Ready:
    TYPE: ClassVar[str] = "ready"
    session: str
    secret: str  # resume secret
    backbone: BackboneInfo
    prompt_tokens: int  # P; the first step has pos = P - 1
    limits: dict = field(default_factory=dict)  # the gateway's Limits, by name
    # The frame compression of this connection from this message on (PROTOCOL.md §2); set per
    # connection by the transport (cloud_gateway/session.py). Absent on the wire: "zstd".
    compression: str = "zstd"

    def to_dict(self) -> dict:
        return {
            "type": self.TYPE,
            "session": self.session,
            "secret": self.secret,
            "backbone": self.backbone.to_dict(),
            "prompt_tokens": self.prompt_tokens,
            "limits": self.limits,
            "compression": self.compression,
        }

    @classmethod
    def read(cls, f: _Fields) -> "Ready":
        return cls(
            f.text("session"),
            f.text("secret"),
            BackboneInfo.read(f.map("backbone")),
            f.integer("prompt_tokens", lo=1),
            f.numbers("limits"),
            _compression_choice(f),
        )


@dataclass(frozen=True)
class Step:
    TYPE: ClassVar[str] = "step"
    epoch: int
    pos: int  # t
    f: dict  # encoded f_t, 1 row
    draft: int  # the backbone's token x_{t+1}, kept if sigma_t = 0
    piece: bytes  # UTF-8 bytes of the draft's text, possibly a partial character
    taps: dict | None = None  # pushed taps of this position (hello.gate predicted sigma = 1), as in `taps`
    # Decoded by parse (None on a message built to be sent): f [1, H], pushed taps [rows, cols].
    f_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    taps_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    secret: str | None = None  # a refreshed resume token (replaces the device's), or None
    # The backbone's top-1 minus top-2 logit at pos (options.gate_margin), a float32 >= 0; else None.
    margin: float | None = None

    def to_dict(self) -> dict:
        d = {
            "type": self.TYPE,
            "epoch": self.epoch,
            "pos": self.pos,
            "f": self.f,
            "draft": self.draft,
            "piece": self.piece,
        }
        if self.taps is not None:
            d["taps"] = self.taps
        if self.secret is not None:
            d["secret"] = self.secret
        if self.margin is not None:
            d["margin"] = float(self.margin)
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Step":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        fmap, f_array = f.activation("f")
        draft, piece = f.integer("draft"), f.blob("piece")
        taps, taps_array = (None, None) if f.d.get("taps") is None else f.activation("taps")
        secret = None if f.d.get("secret") is None else f.text("secret")
        margin = None if f.d.get("margin") is None else f.float32("margin", lo=0.0)
        return cls(epoch, pos, fmap, draft, piece, taps, f_array, taps_array, secret, margin)


@dataclass(frozen=True)
class Taps:
    TYPE: ClassVar[str] = "taps"
    epoch: int
    pos: int
    taps: dict  # encoded activation, one row per tapped layer, in plugin.taps order
    taps_array: np.ndarray | None = field(default=None, repr=False, compare=False)  # decoded; set by parse

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos, "taps": self.taps}

    @classmethod
    def read(cls, f: _Fields) -> "Taps":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        taps, taps_array = f.activation("taps")
        return cls(epoch, pos, taps, taps_array)


@dataclass(frozen=True)
class Verdict:
    TYPE: ClassVar[str] = "verdict"
    epoch: int  # the epoch after the verdict: old + 1 when changed
    pos: int
    token: int  # the committed x_{pos+1}
    piece: bytes
    changed: bool  # token != the draft; drafts after pos are void
    secret: str | None = None  # a refreshed resume token (replaces the device's), or None

    def to_dict(self) -> dict:
        d = {
            "type": self.TYPE,
            "epoch": self.epoch,
            "pos": self.pos,
            "token": self.token,
            "piece": self.piece,
            "changed": self.changed,
        }
        if self.secret is not None:
            d["secret"] = self.secret
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Verdict":
        secret = None if f.d.get("secret") is None else f.text("secret")
        return cls(
            f.integer("epoch"), f.integer("pos"), f.integer("token"), f.blob("piece"), f.flag("changed"), secret
        )


@dataclass(frozen=True)
class End:
    TYPE: ClassVar[str] = "end"
    reason: str  # "eos" | "max_tokens"
    stats: dict  # str -> number; "tokens" (generated tokens) is always there

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "reason": self.reason, "stats": self.stats}

    @classmethod
    def read(cls, f: _Fields) -> "End":
        end = cls(f.text("reason", choices=END_REASONS), f.numbers("stats"))
        if type(end.stats.get("tokens")) is not int:
            raise ProtocolError("bad_field", "end.stats.tokens: expected an int")
        return end


@dataclass(frozen=True)
class Commit:
    pos: int
    token: int
    piece: bytes
    # Whether the device's gate opened at pos (the token is a verdict's) or not (a draft's);
    # None where unknown (commits rebuilt from a resume hello). Optional on the wire.
    sigma: bool | None = None

    def to_dict(self) -> dict:
        d = {"pos": self.pos, "token": self.token, "piece": self.piece}
        if self.sigma is not None:
            d["sigma"] = self.sigma
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Commit":
        sigma = None if f.d.get("sigma") is None else f.flag("sigma")
        return cls(f.integer("pos"), f.integer("token"), f.blob("piece"), sigma)


@dataclass(frozen=True)
class Resumed:
    """Answer to a `hello` with `resume`: the session continues on this connection."""

    TYPE: ClassVar[str] = "resumed"
    session: str
    secret: str  # the new resume secret; the one just used is void
    epoch: int  # the gateway's epoch from now on
    pos: int  # the first position the gateway has not verified; steps resume here
    # The positions the gateway verified that the device had not committed
    # (a verdict lost on the way, and drafts the gateway verified after it),
    # in order from the device's `next`: pos = next + len(commits).
    commits: tuple[Commit, ...] = ()
    compression: str = "zstd"  # this connection's frame compression, as in `ready`

    def to_dict(self) -> dict:
        d = {"type": self.TYPE, "session": self.session, "secret": self.secret, "epoch": self.epoch,
             "pos": self.pos, "compression": self.compression}
        if self.commits:
            d["commits"] = [c.to_dict() for c in self.commits]
        return d

    @classmethod
    def read(cls, f: _Fields) -> "Resumed":
        commits = f.d.get("commits")
        commits = [] if commits is None else commits  # optional: absent or nil (PROTOCOL.md §3)
        if not isinstance(commits, list) or len(commits) > MAX_RESUMED_COMMITS:
            f._bad("commits", f"expected a list of at most {MAX_RESUMED_COMMITS} commits")
        return cls(f.text("session"), f.text("secret"), f.integer("epoch"), f.integer("pos"),
                   tuple(Commit.read(_Fields(c, f"resumed.commits[{i}]")) for i, c in enumerate(commits)),
                   _compression_choice(f))


def _compression_offer(f: _Fields) -> tuple[str, ...] | None:
    """hello.compression: 1 to 8 names, preferred first (unknown names are allowed: the gateway skips them)."""
    offer = f.d.get("compression")
    if offer is None:
        return None
    if (not isinstance(offer, list) or not 1 <= len(offer) <= 8
            or any(type(c) is not str or not 0 < len(c) <= 32 for c in offer)):
        f._bad("compression", "expected a list of 1 to 8 names of at most 32 characters")
    return tuple(offer)


def _compression_choice(f: _Fields) -> str:
    """ready/resumed.compression: absent from an older gateway, which means zstd."""
    return "zstd" if f.d.get("compression") is None else f.text("compression", max_len=32)


# --- either direction ----------------------------------------------------


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[str] = "error"
    code: str  # a key of spa.protocol.errors.CODES (receivers accept others)
    message: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "code": self.code, "message": self.message}

    @classmethod
    def read(cls, f: _Fields) -> "Error":
        return cls(f.text("code"), f.text("message", max_len=4096))

    @classmethod
    def of(cls, e: ProtocolError) -> "Error":
        return cls(e.code, e.message[:4096])


MESSAGES = {m.TYPE: m for m in (Hello, Accept, NeedTaps, Side, Bye, Ready, Step, Taps, Verdict, End, Error,
                                 Resumed)}
Message = Hello | Accept | NeedTaps | Side | Bye | Ready | Step | Taps | Verdict | End | Error | Resumed


# The types each side receives (docs/PROTOCOL.md §4, from spa/protocol/schema.json); `error` goes both ways.
RECEIVES = {side: receives(side) for side in ("gateway", "device")}


def parse(d: dict, receiver: str | None = None) -> Message:
    """Validate an unpacked map and return its message; raises ProtocolError.

    `receiver` ("gateway" or "device"): a type that side never receives is
    `unknown_type`, decided from `type` alone, before any other field is read.
    None accepts the messages of both directions (tests, tools).
    """
    f = _Fields(d, "message")
    kind = f.text("type", max_len=None)  # missing or not a str: bad_field (message.type)
    if kind not in MESSAGES:
        raise ProtocolError("unknown_type", f"unknown message type {_shown(kind)}")
    if receiver is not None and kind not in RECEIVES[receiver]:
        raise ProtocolError("unknown_type", f"the {receiver} does not receive {kind!r}")
    return MESSAGES[kind].read(_Fields(d, kind))


def _shown(kind: str, limit: int = 64) -> str:
    """repr of an unknown type for an error text, shortened: it may be megabytes long."""
    return repr(kind) if len(kind) <= limit else repr(kind[:limit]) + f"... ({len(kind)} characters)"
