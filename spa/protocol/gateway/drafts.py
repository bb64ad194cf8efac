"""The gateway protocol's records of drafted and side positions."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Drafted:
    """A drafted position: the backbone's token there, as its `step` says it."""

    pos: int
    token: int
    piece: bytes
    f: dict  # encoded f_pos, kept to send the step again after a resume
    alternatives: tuple = ()  # the runners-up of the backbone's choice at pos (branch drafting)
    margin: float | None = None  # the backbone's top-2 logit margin at pos, where options.gate_margin
    exact: dict | None = None  # f_pos itself (f32, encoded), kept for a settling session's taps


@dataclass
class SidePos:
    """A sigma = 1 position in flight."""

    taps_sent: bool = False
    s: np.ndarray | None = None  # the side output, once received
    head_asked: bool = False
    token: int | None = None  # the token the device settled, once received (no side output, no head)
