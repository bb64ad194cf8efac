"""The teaching messages (docs/PROTOCOL.md §4 `teach`, `states`; §6 "Teaching").

On-device learning needs, for each of a person's examples, the backbone's states at
the positions that predict the example's summary tokens (teacher forcing): what
`spa train` caches on a workstation. A device asks for them with `teach` (the
example's prompt and summary, the plugin's taps, the codec), and the gateway
answers with one or more `states` messages of consecutive rows. The plugin's
weights and gradients never travel: training happens on the device.

Parsing validates every field as spa/protocol/messages.py does (the same `Fields`
reader, the same maps); `States` also decodes its activations once and keeps them
(`f_array`, `taps_array`), and its targets and margins as arrays.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from spa.protocol.fields import INT32_MAX, Fields
from spa.protocol.message_parts import CODECS, Plugin, Projection


@dataclass(frozen=True)
class Teach:
    TYPE: ClassVar[str] = "teach"
    token: str  # auth token; "" when the gateway needs none
    plugin: Plugin
    prompt: str  # formatted by the device, the example's document in it
    summary: str  # the example's summary: the gateway tokenizes it and appends EOS
    codec: str = "int8"  # scheme of states.f and states.taps
    outliers: int = 8
    margin: bool = False  # states carry the backbone's top-2 logit margins (a margin gate)
    projection: Projection | None = field(default=None, repr=False)  # cloud-side projection: d instead of taps

    def to_dict(self) -> dict:
        d = {"type": self.TYPE, "token": self.token, "plugin": self.plugin.to_dict(), "prompt": self.prompt,
             "summary": self.summary, "codec": self.codec, "outliers": self.outliers}
        if self.margin:
            d["margin"] = True
        if self.projection is not None:
            d["projection"] = self.projection.to_dict()
        return d

    @classmethod
    def read(cls, f: Fields) -> "Teach":
        projection = f.d.get("projection")
        return cls(
            token=f.text("token"),
            plugin=Plugin.read(f.map("plugin")),
            prompt=f.text("prompt", max_len=None),
            summary=f.text("summary", max_len=None),
            codec=f.text("codec", choices=CODECS),
            outliers=f.integer("outliers", hi=65536),
            margin=f.d.get("margin") is not None and f.flag("margin"),
            projection=None if projection is None else Projection.read(f.map("projection")),
        )


@dataclass(frozen=True)
class States:
    TYPE: ClassVar[str] = "states"
    first: int  # index among the example's summary tokens of this message's first row
    total: int  # the example's summary tokens, EOS included
    prompt_tokens: int  # P: row i is position P - 1 + first + i
    targets: bytes  # uint32 LE, one per row: the tokens the rows predict
    f: dict  # encoded f_t, rows x H
    taps: dict  # encoded taps, rows * len(plugin.taps) x H (x r with the cloud-side projection)
    margins: bytes | None = None  # float32 LE, one per row (teach.margin)
    # Decoded by parse (None on a message built to be sent).
    f_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    taps_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def target_ids(self) -> np.ndarray:
        return np.frombuffer(self.targets, "<u4").astype(np.int64)

    @property
    def margin_values(self) -> np.ndarray | None:
        return None if self.margins is None else np.frombuffer(self.margins, "<f4").astype(np.float32)

    def to_dict(self) -> dict:
        d = {"type": self.TYPE, "first": self.first, "total": self.total, "prompt_tokens": self.prompt_tokens,
             "targets": self.targets, "f": self.f, "taps": self.taps}
        if self.margins is not None:
            d["margins"] = self.margins
        return d

    @classmethod
    def read(cls, f: Fields) -> "States":
        first, total, prompt_tokens = f.integer("first"), f.integer("total", lo=1), f.integer("prompt_tokens", lo=1)
        targets = f.blob("targets")
        if len(targets) % 4 or (len(targets) and int(np.frombuffer(targets, "<u4").max()) > INT32_MAX):
            f.bad("targets", "expected uint32 little-endian token ids below 2^31")
        fmap, f_array = f.activation("f")
        taps, taps_array = f.activation("taps")
        margins = None
        if f.d.get("margins") is not None:
            margins = f.blob("margins")
            values = np.frombuffer(margins, "<f4") if len(margins) % 4 == 0 else None
            if values is None or not np.all(np.isfinite(values)) or np.any(values < 0):
                f.bad("margins", "expected finite float32 values >= 0, little-endian")
        return cls(first, total, prompt_tokens, targets, fmap, taps, margins, f_array, taps_array)
