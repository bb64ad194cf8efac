"""What the gateway counts for one session; sent in `end.stats` (docs/PROTOCOL.md §4, `end`)."""

from dataclasses import asdict, dataclass


@dataclass
class GatewayStats:
    drafts: int = 0  # steps sent
    discarded: int = 0  # drafts voided by rollbacks
    side_positions: int = 0  # sigma = 1 positions
    rollbacks: int = 0  # verdicts that changed the draft
    pushed: int = 0  # steps that carried their taps (hello.gate)
    pushed_used: int = 0  # sigma = 1 positions answered from pushed taps
    early_taps: int = 0  # taps sent while a draft was being computed
    resumes: int = 0
    rebuilt_tokens: int = 0  # committed tokens fed again to rebuild the session on this gateway
    max_in_flight: int = 0  # most sigma = 1 positions awaiting their verdict at once
    stale: int = 0  # device messages of an epoch a rollback had ended (dropped)
    settled: int = 0  # sigma = 1 positions the device settled itself (no side output uploaded, no head)
    settled_changed: int = 0  # of which changed the draft
    heads: int = 0  # verdict heads asked of the host (side outputs received)
    branch_streamed: int = 0  # branch drafts sent to a settling device as step.branch
    # Branch drafting (`branches` > 0):
    branch_points: int = 0  # sigma = 1 positions whose alternatives were drafted
    branch_hits: int = 0  # changed tokens at a branch point whose branch line became the main line
    branch_misses: int = 0  # changed tokens at a branch point that no branch line continued
    branch_drafts: int = 0  # draft rows computed on branch lines
    branch_wasted: int = 0  # of which were dropped (unchanged verdict, miss, rollback, the other branches)
    # The backbone's work, as the host reported it:
    prompt_tokens: int = 0
    decode_steps: int = 0  # one-token decode steps run for this session
    batched_steps: int = 0  # of which ran batched with other rows (other sessions, branch lines)
    batch_rows: int = 0  # sum of those steps' batch sizes
    max_batch: int = 1

    def add_decode_step(self, batch: int) -> None:
        self.decode_steps += 1
        self.batched_steps += batch > 1
        self.batch_rows += batch
        self.max_batch = max(self.max_batch, batch)

    def to_dict(self) -> dict:
        d = asdict(self)
        rows = d.pop("batch_rows")
        d["mean_batch"] = round(rows / max(self.decode_steps, 1), 3)
        return d
