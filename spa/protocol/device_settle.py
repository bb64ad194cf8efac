"""Settlement on the device (docs/PROTOCOL.md §6, "Settlement"): the methods of `DeviceProtocol`
that take a proven token (`certified`), keep the gateway's streamed branch lines, and begin a new
epoch where a token — proven here, or a verdict's — changed its draft, adopting the streamed line
of that token when there is one.
"""

import dataclasses

import numpy as np

from spa.protocol import messages as m


class Settling:
    """Mixed into DeviceProtocol: these methods work on its state."""

    def _on_branch_step(self, step: m.Step) -> None:
        """A streamed branch line's draft: kept until its branch point is committed (adopted if the
        point's token is the line's, dropped otherwise)."""
        self._expect(self.settles, f"step {step.pos} streams a branch line; the session does not settle")
        at, token = step.branch.pos, step.branch.token
        if at < self.next_pos or step.epoch < self.epoch:  # its point was committed another way: void
            return
        self._expect(step.epoch == self.epoch, f"branch step of epoch {step.epoch}, expected {self.epoch}")
        line = self.branches.setdefault((at, token), [])
        self._expect(step.pos == at + 1 + len(line) and step.pos <= at + 1 + self.window,
                     f"branch step {step.pos} of the line of {token} at {at} out of order")
        line.append((step, self._shaped(step.f_array, "step.f", 1)))

    def _keep_exact(self, pos: int, exact: np.ndarray | None, what: str) -> None:
        if self.settles:
            self._expect(exact is not None, f"{what}: missing; the session settles")
            self.exact[pos] = self._shaped(exact, what, 1)[0]

    def _changed(self, pos: int, token: int, epoch: int) -> None:
        """pos is committed with `token`, not its draft: the new epoch begins. Every later step and
        decision is void, but a streamed branch line of that token becomes the main line."""
        self.stats.rollbacks += 1
        self.changed_positions.add(pos)
        self.stats.dropped += len(self.steps)
        self._forget_after(pos)
        self.last_step_pos = pos
        self.next_gate = pos + 1
        self.sent_upto = min(self.sent_upto, pos + 1)
        self.epoch = epoch
        line = self.branches.pop((pos, token), [])
        self.branches.clear()  # the other lines continued tokens that lost
        if self.settles:
            self.adopted = (pos, token)
        for step, f in line:  # the branch's drafts, now the main line's in the new epoch
            self.steps[step.pos] = (dataclasses.replace(step, epoch=epoch, branch=None), f)
            self.last_step_pos = step.pos
        self.stats.branch_adopted += len(line)

    def certified(self, pos: int, token: int | None, piece: bytes = b"") -> None:
        """Report the proof of a RunHead: the token of pos (and its piece), or None where the proof
        does not hold (the side output then goes up, and the verdict decides)."""
        self._require(self.side_state.get(pos) == "head", f"certified({pos})")
        encoded, _ = self.heads.pop(pos)
        del self.exact[pos]
        if token is None:
            self.stats.unproven += 1
            self.outbox.append(m.Side(self.epoch, pos, encoded).to_dict())
            self.side_state[pos] = "verdict"
            return
        self.outbox.append(m.Settled(self.epoch, pos, int(token)).to_dict())
        self.side_state[pos] = "settled"
        self.proven[pos] = (int(token), bytes(piece))
        if token != self.steps[pos][0].draft:  # every later decision is void, whatever comes before pos
            self._forget_after(pos)
            self.last_step_pos = pos
            self.next_gate = pos + 1
            self.sent_upto = min(self.sent_upto, pos + 1)
        self._commit_settled()

    def _change_pending(self) -> bool:
        """A proven token that changes its draft awaits its commit: nothing after it is gated before
        (its steps are void; the branch line's come in the new epoch)."""
        return self._void_after() != float("inf")

    def _void_after(self) -> float:
        """The position of the earliest proven token that changes its draft (later ones are void), or inf."""
        return min((p for p in self.proven if self.proven[p][0] != self.steps[p][0].draft), default=float("inf"))
