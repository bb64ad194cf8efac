"""Branch drafting (`branches = K > 0`; docs/PROTOCOL.md §6, "Branch drafting").

While the gateway waits for the side output of a sigma = 1 position t, it also
drafts the continuations of the K runners-up of the backbone's own choice at t,
each on a *branch line*: a line (KV cache + states) forked from the main line
at t + 1. When the verdict of t changes the token to a branch's token, that
branch line becomes the main line and its drafts go out at once; otherwise the
branch lines are dropped. One branch point at a time.

This object owns the branch lines' protocol state and returns the line actions
the host must run; the core protocol decides when to open and resolve.
"""

from dataclasses import dataclass

from spa.protocol.gateway.actions import Draft, DropLine, ForkLine
from spa.protocol.gateway.drafts import Drafted
from spa.protocol.gateway.stats import GatewayStats


@dataclass
class BranchLine:
    line: int  # its line id
    token: int  # the alternative x_{t+1}
    drafts: list  # Drafted of positions t + 1, t + 2, ... on this line
    feed: int  # the token to feed for its next draft


class Branching:
    def __init__(self, k: int, stats: GatewayStats):
        if k < 0:
            raise ValueError(f"branches must be >= 0, not {k}")
        self.k = k
        self.stats = stats
        self.at: int | None = None  # the branch point t, while it is open
        self.lines: dict[int, BranchLine] = {}  # by line id, best alternative first

    def open(self, t: int, parent: int, entry: Drafted, new_line, worth_drafting) -> list[ForkLine]:
        """Open the branch point t (`entry`: the main line's draft there): a ForkLine of `parent`
        for each alternative that `worth_drafting(token)`. `new_line()` gives fresh line ids.
        Opened even without lines: t is then not looked at again until it is resolved."""
        self.at = t
        forks = []
        for token in dict.fromkeys(entry.alternatives[: self.k]):  # one line per token
            if worth_drafting(token):
                line = new_line()
                self.lines[line] = BranchLine(line, token, [], token)
                forks.append(ForkLine(line, parent, t + 1))
        self.stats.branch_points += bool(forks)
        return forks

    def drafts(self, epoch: int, window: int, first_pos: int, max_new_tokens: int, eos_ids) -> list[Draft]:
        """The next draft of each branch line that may still draft: what the main line could hold
        right after a hit, W + 1 positions from t + 1, not past an EOS or max_new_tokens."""
        out = []
        for b in self.lines.values():
            if b.drafts and b.drafts[-1].token in eos_ids:
                continue
            pos = b.drafts[-1].pos + 1 if b.drafts else self.at + 1
            if pos - first_pos < max_new_tokens and len(b.drafts) <= window:
                out.append(Draft(epoch, pos, b.feed, b.line))
        return out

    def drafted(self, line: int, entry: Drafted | None) -> bool:
        """A branch draft was computed (`entry`; None when it is stale). False when its line is gone."""
        self.stats.branch_drafts += 1
        b = self.lines.get(line)
        if b is None or entry is None:
            self.stats.branch_wasted += 1
            return False
        b.drafts.append(entry)
        b.feed = entry.token
        return True

    def hit(self, token: int) -> BranchLine | None:
        """The branch line of `token` (the changed token at the branch point), whatever it has drafted
        so far: its KV cache already holds the token, its drafts (and one in progress) go on as the
        main line's, so even a line without a draft yet saves the redraft of the token."""
        line = next((b for b in self.lines.values() if b.token == token), None)
        self.stats.branch_hits += line is not None
        self.stats.branch_misses += line is None
        return line

    def close(self, keep: BranchLine | None = None) -> list[DropLine]:
        """The branch point is resolved: drop its lines but `keep` (adopted as the main line);
        the drafts they computed count as wasted."""
        if self.at is None:
            return []
        dropped = [b for b in self.lines.values() if b is not keep]
        self.stats.branch_wasted += sum(len(b.drafts) for b in dropped)
        self.lines.clear()
        self.at = None
        return [DropLine(b.line) for b in dropped]
