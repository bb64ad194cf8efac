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

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from spa.protocol.errors import ProtocolError
from spa.protocol.fields import MAX_NAME, Fields  # noqa: F401  (MAX_NAME: ids' length, for callers)
# The maps inside messages, importable from here as from their own module:
from spa.protocol.message_parts import (BackboneInfo, BranchRef, Commit, GateUpload, Options, Plugin,  # noqa: F401
                                        Projection, Resume)
from spa.protocol.schema import receives, schema
from spa.protocol.teach_messages import States, Teach  # on-device learning's pair (PROTOCOL.md §6, "Teaching")

VERSION = schema()["version"]  # 3: settlement; 2: several side outputs in flight, resumed.commits
VERSIONS = tuple(schema()["versions"])  # what a gateway accepts in hello.version
MAX_RESUMED_COMMITS = 1 << 16  # at most max_new_tokens in practice
END_REASONS = ("eos", "max_tokens")


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
    def read(cls, f: Fields) -> "Hello":
        # Version first: a hello of another version may have other fields.
        version = f.integer("version")
        if version not in VERSIONS:
            raise ProtocolError("version", f"protocol version {version} is not supported "
                                           f"({' or '.join(map(str, VERSIONS))})")
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
    def read(cls, f: Fields) -> "Accept":
        return cls(f.integer("epoch"), f.integer("upto"))


@dataclass(frozen=True)
class NeedTaps:
    TYPE: ClassVar[str] = "need_taps"
    epoch: int
    pos: int  # sigma = 1 here; every position < pos is accepted

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos}

    @classmethod
    def read(cls, f: Fields) -> "NeedTaps":
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
    def read(cls, f: Fields) -> "Side":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        s, s_array = f.activation("s")
        return cls(epoch, pos, s, s_array)


@dataclass(frozen=True)
class Settled:
    """Version 3: the device proved the token of a sigma = 1 position itself (PROTOCOL.md §6,
    "Settlement"); its side output stays on the device."""

    TYPE: ClassVar[str] = "settled"
    epoch: int
    pos: int
    token: int  # x_{pos+1}, committed on the device

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos, "token": self.token}

    @classmethod
    def read(cls, f: Fields) -> "Settled":
        return cls(f.integer("epoch"), f.integer("pos"), f.integer("token"))


@dataclass(frozen=True)
class Bye:
    TYPE: ClassVar[str] = "bye"

    def to_dict(self) -> dict:
        return {"type": self.TYPE}

    @classmethod
    def read(cls, f: Fields) -> "Bye":
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
    settle: bool = False  # version 3: the gateway accepts `settled` (sent only when True)

    def to_dict(self) -> dict:
        d = {
            "type": self.TYPE,
            "session": self.session,
            "secret": self.secret,
            "backbone": self.backbone.to_dict(),
            "prompt_tokens": self.prompt_tokens,
            "limits": self.limits,
            "compression": self.compression,
        }
        if self.settle:
            d["settle"] = True
        return d

    @classmethod
    def read(cls, f: Fields) -> "Ready":
        return cls(
            f.text("session"),
            f.text("secret"),
            BackboneInfo.read(f.map("backbone")),
            f.integer("prompt_tokens", lo=1),
            f.numbers("limits"),
            _compression_choice(f),
            f.d.get("settle") is not None and f.flag("settle"),
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
    exact: dict | None = None  # with pushed taps of a settling session: f_t itself (f32), encoded
    exact_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    branch: BranchRef | None = None  # a branch line's draft (a settling session), not the main line's

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
        if self.exact is not None:
            d["exact"] = self.exact
        if self.branch is not None:
            d["branch"] = self.branch.to_dict()
        if self.secret is not None:
            d["secret"] = self.secret
        if self.margin is not None:
            d["margin"] = float(self.margin)
        return d

    @classmethod
    def read(cls, f: Fields) -> "Step":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        fmap, f_array = f.activation("f")
        draft, piece = f.integer("draft"), f.blob("piece")
        taps, taps_array = (None, None) if f.d.get("taps") is None else f.activation("taps")
        secret = None if f.d.get("secret") is None else f.text("secret")
        margin = None if f.d.get("margin") is None else f.float32("margin", lo=0.0)
        exact, exact_array = (None, None) if f.d.get("exact") is None else f.activation("exact")
        branch = None if f.d.get("branch") is None else BranchRef.read(f.map("branch"))
        return cls(epoch, pos, fmap, draft, piece, taps, f_array, taps_array, secret, margin, exact, exact_array,
                   branch)


@dataclass(frozen=True)
class Taps:
    TYPE: ClassVar[str] = "taps"
    epoch: int
    pos: int
    taps: dict  # encoded activation, one row per tapped layer, in plugin.taps order
    taps_array: np.ndarray | None = field(default=None, repr=False, compare=False)  # decoded; set by parse
    exact: dict | None = None  # a settling session: f_pos itself (f32), encoded
    exact_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {"type": self.TYPE, "epoch": self.epoch, "pos": self.pos, "taps": self.taps}
        if self.exact is not None:
            d["exact"] = self.exact
        return d

    @classmethod
    def read(cls, f: Fields) -> "Taps":
        epoch, pos = f.integer("epoch"), f.integer("pos")
        taps, taps_array = f.activation("taps")
        exact, exact_array = (None, None) if f.d.get("exact") is None else f.activation("exact")
        return cls(epoch, pos, taps, taps_array, exact, exact_array)


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
    def read(cls, f: Fields) -> "Verdict":
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
    def read(cls, f: Fields) -> "End":
        end = cls(f.text("reason", choices=END_REASONS), f.numbers("stats"))
        if type(end.stats.get("tokens")) is not int:
            raise ProtocolError("bad_field", "end.stats.tokens: expected an int")
        return end


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
    def read(cls, f: Fields) -> "Resumed":
        commits = f.d.get("commits")
        commits = [] if commits is None else commits  # optional: absent or nil (PROTOCOL.md §3)
        if not isinstance(commits, list) or len(commits) > MAX_RESUMED_COMMITS:
            f.bad("commits", f"expected a list of at most {MAX_RESUMED_COMMITS} commits")
        return cls(f.text("session"), f.text("secret"), f.integer("epoch"), f.integer("pos"),
                   tuple(Commit.read(Fields(c, f"resumed.commits[{i}]")) for i, c in enumerate(commits)),
                   _compression_choice(f))


def _compression_offer(f: Fields) -> tuple[str, ...] | None:
    """hello.compression: 1 to 8 names, preferred first (unknown names are allowed: the gateway skips them)."""
    offer = f.d.get("compression")
    if offer is None:
        return None
    if (not isinstance(offer, list) or not 1 <= len(offer) <= 8
            or any(type(c) is not str or not 0 < len(c) <= 32 for c in offer)):
        f.bad("compression", "expected a list of 1 to 8 names of at most 32 characters")
    return tuple(offer)


def _compression_choice(f: Fields) -> str:
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
    def read(cls, f: Fields) -> "Error":
        return cls(f.text("code"), f.text("message", max_len=4096))

    @classmethod
    def of(cls, e: ProtocolError) -> "Error":
        return cls(e.code, e.message[:4096])


MESSAGES = {m.TYPE: m for m in (Hello, Accept, NeedTaps, Side, Settled, Bye, Teach, Ready, Step, Taps, Verdict, End,
                                 Error, Resumed, States)}
Message = (Hello | Accept | NeedTaps | Side | Settled | Bye | Teach | Ready | Step | Taps | Verdict | End | Error
           | Resumed | States)


# The types each side receives (docs/PROTOCOL.md §4, from spa/protocol/schema.json); `error` goes both ways.
RECEIVES = {side: receives(side) for side in ("gateway", "device")}


def parse(d: dict, receiver: str | None = None) -> Message:
    """Validate an unpacked map and return its message; raises ProtocolError.

    `receiver` ("gateway" or "device"): a type that side never receives is
    `unknown_type`, decided from `type` alone, before any other field is read.
    None accepts the messages of both directions (tests, tools).
    """
    f = Fields(d, "message")
    kind = f.text("type", max_len=None)  # missing or not a str: bad_field (message.type)
    if kind not in MESSAGES:
        raise ProtocolError("unknown_type", f"unknown message type {_shown(kind)}")
    if receiver is not None and kind not in RECEIVES[receiver]:
        raise ProtocolError("unknown_type", f"the {receiver} does not receive {kind!r}")
    return MESSAGES[kind].read(Fields(d, kind))


def _shown(kind: str, limit: int = 64) -> str:
    """repr of an unknown type for an error text, shortened: it may be megabytes long."""
    return repr(kind) if len(kind) <= limit else repr(kind[:limit]) + f"... ({len(kind)} characters)"
