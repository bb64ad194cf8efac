"""What the gateway's protocol asks its host to do (docs/PROTOCOL.md §6).

The host holds the session's *lines*: the main line and, while branch drafting,
branch lines, each a KV cache plus the states of its unverified positions,
keyed by a line id the protocol chooses. The protocol says which line to
extend, copy, cut or drop; the host never decides that itself.

Compute actions (their results are reported back to the protocol):

    Prefill(hello)                 tokenize and prefill the prompt as line 0
                                   -> started(session, secret, prompt_tokens)
    ResumeWanted(hello)            find the session hello.resume names
                                   -> its check_resume + resume, or a fresh
                                      protocol's check_rebuild + rebuilt
    Draft(epoch, pos, feed, line)  feed `feed` to `line` (None: the states of pos
                                   exist already) and choose the backbone's token
                                   at pos -> draft_ready(...)
    SendTaps(line, pos)            the taps of pos as they go on the wire -> taps_ready(...)
    Head(line, pos, s)             the token of lm_head(norm(f_pos + s)) -> verdict_ready(...)

Line actions (bookkeeping, nothing to report; never dropped from the queue,
because the KV caches must follow them):

    ForkLine(line, parent, keep)   a new line whose KV cache is a copy of parent's positions < keep
    CutLine(line, keep)            keep line's KV cache of positions < keep; later states are void
    DropLine(line)                 free the line: its KV cache and states
    ForgetStates(line, upto)       the states of positions <= upto are no longer needed
"""

from dataclasses import dataclass

import numpy as np

from spa.protocol import messages as m

MAIN_LINE = 0  # the first main line's id; a branch hit makes a branch line the main line


@dataclass(frozen=True)
class Prefill:
    hello: m.Hello  # validated: version, auth, backbone, limits, uploads


@dataclass(frozen=True)
class ResumeWanted:
    hello: m.Hello  # validated like a new hello; hello.resume.next is set


@dataclass(frozen=True)
class Draft:
    epoch: int
    pos: int
    feed: int | None  # the token x_pos to feed; None: the states of pos exist (prefill, rebuild)
    line: int = MAIN_LINE


@dataclass(frozen=True)
class SendTaps:
    line: int
    pos: int


@dataclass(frozen=True)
class Head:
    line: int
    pos: int
    s: np.ndarray  # the device's side output as received, [H]


@dataclass(frozen=True)
class ForkLine:
    line: int  # the new line's id (unique within the session)
    parent: int
    keep: int  # its KV cache: a copy of parent's positions < keep


@dataclass(frozen=True)
class CutLine:
    line: int
    keep: int  # positions < keep stay in the KV cache


@dataclass(frozen=True)
class DropLine:
    line: int


@dataclass(frozen=True)
class ForgetStates:
    line: int
    upto: int


Action = Prefill | ResumeWanted | Draft | SendTaps | Head | ForkLine | CutLine | DropLine | ForgetStates
LINE_WORK = (ForkLine, CutLine, DropLine, ForgetStates)
