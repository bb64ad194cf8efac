"""Resuming a session on a new connection (docs/PROTOCOL.md §6, "Resumption"): the methods of
`GatewayProtocol` that the host calls for a `ResumeWanted`, kept apart from the steady state.

On a session this gateway holds: `check_resume(hello)`, then `resume(next)`. On a fresh
protocol for a session this gateway does not hold (another replica's, or a restarted
gateway's; signed resume tokens only): `check_rebuild(hello)`, then `rebuilt(session,
prompt_tokens, commits)`. The secrets themselves are spa/protocol/gateway/resume_secrets.py's.
"""

from collections import deque

from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway.actions import LINE_WORK
from spa.protocol.gateway.drafts import SidePos
from spa.protocol.gateway.handshake import check_hello, check_prompt


class Resuming:
    """Mixed into GatewayProtocol: these methods work on its state."""

    def check_resume(self, hello: m.Hello) -> None:
        """On the session a `ResumeWanted` names: raise resume_failed unless the secret is valid
        for this session (spa/protocol/gateway/resume_secrets.py) and the hello asks for the same
        generation (plugin, prompt, options, and the uploads if it sends them again).
        SessionMoved: the session was resumed on another replica since (rebuild it)."""
        self.resumption.check_held(hello.resume.secret, self.session)
        if (hello.plugin, hello.prompt, hello.options) != (self.hello.plugin, self.hello.prompt,
                                                           self.hello.options) or \
                (hello.projection is not None and (self.hello.projection is None or
                                               hello.projection.digest != self.hello.projection.digest)) or \
                (hello.gate is not None and hello.gate != self.hello.gate):
            raise ProtocolError("resume_failed", "the resume hello differs from the session's (plugin, prompt, "
                                                 "options or uploads)")
        sent = hello.resume.tokens
        if sent is not None:  # what the device committed must be what this gateway verified
            mine = [c.token for c in self._commits]
            n = min(len(sent), len(mine))
            if list(sent[:n]) != mine[:n]:
                raise ProtocolError("resume_failed", "the committed tokens differ from the session's")
        self._resume_tokens = sent

    def resume(self, next_pos: int, secret: str | None = None) -> None:
        """Continue after a lost connection; the device has committed every position < next_pos.
        Queues `resumed`, then `end` again if the session ended, else a step for each unverified
        drafted position. Any pending need_taps/side exchange is forgotten: the device gates the
        resent steps again. Raises resume_failed (the session unchanged) if it cannot."""
        self._require(not self._drafting, "resume() while a draft is computed")
        if self.phase == "ended" and self.end_msg is None or self.phase not in ("generating", "ended"):
            raise ProtocolError("resume_failed", "the session is not generating")
        if not self.first_pos <= next_pos <= self.next_draft_pos:
            raise ProtocolError("resume_failed", f"device resumes at position {next_pos}; the gateway verified "
                                                 f"up to {self.verified}")
        if next_pos > self.verified:  # the device committed drafts; their accept was lost
            self._settled_before(next_pos)
            if any(p < next_pos and side.token is None for p, side in self._sides.items()):
                raise ProtocolError("resume_failed", f"position {min(self._sides)} awaits a side output")
            self.decided = max(self.decided, next_pos)
            self._verify()
        # Everything the device had not committed is forgotten, on both sides: it gates the
        # resent steps again. Verified positions it missed (lost verdicts, or drafts verified
        # after them) come back as commits.
        commits = self._commits[next_pos - self.first_pos:]
        self.stats.side_positions -= len(self._sides)
        self._sides.clear()
        self.decided = self.verified
        # Unsent messages and the work for them are void: resent below. Line work stays queued:
        # the KV caches must follow.
        self._outbox.clear()
        self._actions = deque(a for a in self._actions if isinstance(a, LINE_WORK))
        self._actions.extend(self.branching.close())
        self._held = None
        self._stash.clear()
        self.pushed.clear()  # resent steps carry no taps: the device asks with need_taps
        self.resumption.rotate(self.session, self.hello, self._committed_ids(), secret)
        self.stats.resumes += 1
        self.closing = False
        self._outbox.append(m.Resumed(self.session, self.secret, self.epoch, self.verified, commits).to_dict())
        if self.end_msg is not None:  # the device missed `end`
            self._outbox.append(self.end_msg)
            self.closing = True
            return
        self._outbox += [self._step(d) for d in self._drafts]  # identical to the first time
        self._maybe_end()

    def _settled_before(self, next_pos: int) -> None:
        """A settling device commits the token it proved at once, before the gateway hears it: when
        that `settled` was lost, the resume hello's committed tokens say what it proved. A position
        that awaits a side output (asked with need_taps), or whose pushed taps the device answered
        with another token than the draft, was settled with the device's token (G9 trusts the
        device's proof in any case); the other positions before next_pos were accepted."""
        tokens = self._resume_tokens
        if not self.settling or tokens is None:
            return
        for d in list(self._drafts):
            if not self.verified <= d.pos < next_pos or d.pos - self.first_pos >= len(tokens):
                break
            token, side = int(tokens[d.pos - self.first_pos]), self._sides.get(d.pos)
            if side is not None and side.taps_sent and side.s is None and side.token is None:
                side.token = token
            elif side is None and d.pos in self.pushed and token != d.token:
                self._sides[d.pos] = SidePos(taps_sent=True, token=token)
                self.stats.side_positions += 1
            if token != d.token:  # a change voids every later draft: nothing after it was committed
                break

    def check_rebuild(self, hello: m.Hello) -> None:
        """On the fresh protocol whose `ResumeWanted` names a session this gateway does not hold:
        check the hello like a new one (limits, uploads), then its resume token
        (spa/protocol/gateway/resume_secrets.py), which is spent."""
        self._require(self.phase == "hello" and hello.resume is not None, "check_rebuild() out of place")
        uploads = check_hello(hello, self.backbone, self.limits, self.auth_token, self.projections)
        if hello.resume.tokens is not None and len(hello.resume.tokens) > hello.options.max_new_tokens:
            raise ProtocolError("resume_failed", "the resume claims more tokens than the session may have")
        self.resumption.check_rebuild(hello)
        self.uploads = uploads
        self._accept(hello)

    def rebuilt(self, session: str, prompt_tokens: int, commits: list) -> None:
        """After check_rebuild, the prompt tokenized: the session continues from the device's
        committed tokens (`commits`: m.Commit for positions P - 1 upwards, pieces from the host's
        vocabulary). Queues `resumed` (and `end` if those tokens already end the generation).
        Unless it ended, the host must then have a main line holding the prompt and every
        committed token but the last: the next Draft feeds that one."""
        self._require(self.phase == "ready" and self.hello.resume is not None, "rebuilt() without check_rebuild()")
        check_prompt(prompt_tokens, self.limits)
        first = prompt_tokens - 1
        if self.hello.resume.next != first + len(commits) or [c.pos for c in commits] != list(
                range(first, first + len(commits))):
            raise ProtocolError("resume_failed", f"device resumes at position {self.hello.resume.next} with "
                                                 f"{len(commits)} committed tokens after a prompt of {prompt_tokens}")
        self.session = session
        self.first_pos = self.verified = self.decided = first
        self.phase = "generating"
        self.stats.prompt_tokens = prompt_tokens
        self.stats.rebuilt_tokens = len(commits)
        for c in commits:
            if self.finish_reason:
                raise ProtocolError("resume_failed", "committed tokens go on after the end of the generation")
            self.verified = self.decided = c.pos + 1
            self._committed(c)
        self._next_feed = commits[-1].token if commits else None  # None: the prefill's states
        self.resumption.rotate(session, self.hello, self._committed_ids())
        self.stats.resumes += 1
        self._outbox.append(m.Resumed(session, self.secret, self.epoch, self.verified, ()).to_dict())
        self._maybe_end()
