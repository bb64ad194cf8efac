"""The maps inside protocol messages (docs/PROTOCOL.md §4; their fields are spa/protocol/schema.json's)."""

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from spa.protocol import codec
from spa.protocol.fields import INT32_MAX, INT64_MAX, MAX_LAYER, Fields

CODECS = codec.SCHEMES
MAX_RANK = 4096


@dataclass(frozen=True)
class Plugin:
    fingerprint: str  # backbone fingerprint the plugin was trained on
    taps: tuple[int, ...]  # layer indices, ascending; 0 = embedding output
    content_hash: str

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "taps": list(self.taps), "content_hash": self.content_hash}

    @classmethod
    def read(cls, f: Fields) -> "Plugin":
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
    # Version 3: the device settles its own side tokens where it can prove them (PROTOCOL.md §6,
    # "Settlement"). Sent only when True, like gate_margin.
    settle: bool = False

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
        if self.settle:
            d["settle"] = True
        return d

    @classmethod
    def read(cls, f: Fields) -> "Options":
        return cls(
            window=f.integer("window"),
            codec=f.text("codec", choices=CODECS),
            outliers=f.integer("outliers", hi=codec.MAX_COLS),
            max_new_tokens=f.integer("max_new_tokens", lo=1),
            temperature=f.number("temperature", lo=0.0),
            seed=f.integer("seed", hi=INT64_MAX),
            gate_margin=f.d.get("gate_margin") is not None and f.flag("gate_margin"),
            settle=f.d.get("settle") is not None and f.flag("settle"),
        )



@dataclass(frozen=True)
class Projection:
    """The side network's per-tap input projections, uploaded for the cloud-side
    projection option (docs/PROTOCOL.md §4, hello): the gateway then sends r values per
    tap instead of H. Little-endian raw arrays; sizes are checked by the gateway,
    which knows H. Once a gateway holds them, a hello may name them by `hash` alone."""

    rank: int  # r
    weight: bytes | None  # float16 [len(taps), r, H]: W_in, then Down_l for each further tap
    bias: bytes | None  # float32 [len(taps), r]
    hash: str | None = None  # "sha256:<hex>" of weight then bias

    @staticmethod
    def hash_of(weight: bytes, bias: bytes) -> str:
        return "sha256:" + hashlib.sha256(weight + bias).hexdigest()

    @property
    def digest(self) -> str:
        """What the upload is, whichever form it came in."""
        return self.hash if self.weight is None else self.hash_of(self.weight, self.bias)

    def by_hash(self) -> "Projection":
        """The same upload named by its hash alone (what a device sends once the gateway has it)."""
        return Projection(self.rank, None, None, self.digest)

    def to_dict(self) -> dict:
        d = {"rank": self.rank}
        if self.weight is not None:
            d["weight"], d["bias"] = self.weight, self.bias
        if self.hash is not None:
            d["hash"] = self.hash
        return d

    @classmethod
    def read(cls, f: Fields) -> "Projection":
        rank = f.integer("rank", lo=1, hi=MAX_RANK)
        weight = None if f.d.get("weight") is None else f.blob("weight")
        bias = None if f.d.get("bias") is None else f.blob("bias")
        digest = None if f.d.get("hash") is None else f.text("hash")
        if weight is None and bias is not None or weight is None and digest is None:
            f.bad("weight", "expected weight and bias, or a hash alone")
        if bias is None and weight is not None:
            f.bad("bias", "expected weight and bias, or a hash alone")
        return cls(rank, weight, bias, digest)


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
    def read(cls, f: Fields) -> "GateUpload":
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
    def read(cls, f: Fields) -> "Resume":
        nxt = None if f.d.get("next") is None else f.integer("next")
        tokens = None
        if f.d.get("tokens") is not None:
            raw = f.blob("tokens")
            ids = np.frombuffer(raw, "<u4") if len(raw) % 4 == 0 else None
            if ids is None or (ids > INT32_MAX).any():
                f.bad("tokens", "expected bin of uint32 little-endian token ids below 2^31")
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
    def read(cls, f: Fields) -> "BackboneInfo":
        return cls(
            f.text("name"),
            f.text("fingerprint"),
            f.integer("num_layers", lo=1, hi=MAX_LAYER),
            f.integer("hidden_size", lo=1, hi=codec.MAX_COLS),
        )


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
    def read(cls, f: Fields) -> "Commit":
        sigma = None if f.d.get("sigma") is None else f.flag("sigma")
        return cls(f.integer("pos"), f.integer("token"), f.blob("piece"), sigma)


@dataclass(frozen=True)
class BranchRef:
    """Which branch line a streamed step belongs to: the continuation of `token` at branch point `pos`."""

    pos: int
    token: int

    def to_dict(self) -> dict:
        return {"pos": self.pos, "token": self.token}

    @classmethod
    def read(cls, f: Fields) -> "BranchRef":
        return cls(f.integer("pos"), f.integer("token"))
