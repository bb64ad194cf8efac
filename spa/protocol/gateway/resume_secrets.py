"""A session's resume secrets on the gateway: issued, refreshed, checked (docs/PROTOCOL.md §6,
"Resumption" and "Resume tokens").

With `ResumeTokens` (signed tokens any replica of a deployment can verify) the
secrets are issued here, refreshed on steps and verdicts once the current one
is half a grace old, and checked against the session (one this gateway holds)
or against the resume hello alone (a session this gateway must rebuild).
Without them the host hands in opaque random secrets and only the gateway that
holds a session can resume it.
"""

import hmac

from spa.protocol import messages as m
from spa.protocol.errors import ProtocolError
from spa.protocol.resume_tokens import REFUSED, ResumeTokens, TokenClaims, generation_digest, prefix_digest

class SessionMoved(Exception):
    """The resume token is newer than the session this gateway holds: the session was resumed
    on another replica since. The host drops its copy and rebuilds the session."""


class Resumption:
    def __init__(self, tokens: ResumeTokens | None, grace_s: float):
        self.tokens = tokens
        self.grace_s = grace_s
        self.gen = 0  # resumes of this session so far (on any replica): tokens carry it
        self.secret: str | None = None  # the latest secret handed to the device
        self._issued_at = 0.0  # when the latest token was issued (the tokens' clock)
        self._claims: TokenClaims | None = None  # of the token check_held accepted, spent by rotate
        self._generation: bytes | None = None  # generation_digest of the session's hello, hashed once

    def issue(self, session: str, hello: m.Hello, committed: list[int], secret: str | None = None) -> str:
        """A new secret for the session as it stands: `secret` (opaque, from the host), or a signed token."""
        if secret is None:
            if self.tokens is None:
                raise RuntimeError("gateway protocol misuse: no secret given and no resume tokens")
            self._issued_at = self.tokens.clock()
            if self._generation is None:  # hashes the uploads (~1 MB with the projection): once
                self._generation = generation_digest(hello)
            secret = self.tokens.issue(session, self.gen, committed, self._generation, 2 * self.grace_s)
        self.secret = secret
        return secret

    def due(self) -> bool:
        """Is the current token half a grace old? (Tokens expire 2 grace after issue, so a device
        losing its link always holds one valid for a grace.)"""
        return self.tokens is not None and self.tokens.clock() - self._issued_at >= self.grace_s / 2

    def check_held(self, secret: str, session: str | None) -> None:
        """A resume of a session this gateway holds: its current opaque secret, or a genuine,
        unexpired, unused token issued since the session's last resume (any of them: a refresh
        does not void the earlier tokens of the same resume generation). SessionMoved: the
        session was resumed elsewhere since."""
        if self.tokens is None:
            if self.secret is None or not hmac.compare_digest(secret.encode(), self.secret.encode()):
                raise ProtocolError("resume_failed", REFUSED)
            return
        if session is None:
            raise ProtocolError("resume_failed", REFUSED)
        claims = self.tokens.check(secret, session)
        if claims.g > self.gen:
            raise SessionMoved()
        if claims.g < self.gen:  # issued before a resume: rotated away
            raise ProtocolError("resume_failed", REFUSED)
        self._claims = claims

    def check_rebuild(self, hello: m.Hello) -> None:
        """A resume of a session this gateway does not hold: the token must be genuine, unexpired,
        unused here, of that session and generation, and the device's committed tokens must start
        with the prefix it covers. The token is spent at once."""
        resume = hello.resume
        if self.tokens is None or resume.tokens is None:  # nothing to rebuild from (REFUSED says so)
            raise ProtocolError("resume_failed", REFUSED)
        claims = self.tokens.check(resume.secret, resume.session)
        if generation_digest(hello) != claims.generation:
            raise ProtocolError("resume_failed", "the resume hello differs from the session's (plugin, prompt, "
                                                 "options or uploads)")
        if claims.n > len(resume.tokens) or prefix_digest(resume.tokens[:claims.n]) != claims.prefix:
            raise ProtocolError("resume_failed", "the committed tokens differ from the session's")
        self.tokens.spend(claims)
        self.gen = claims.g

    def rotate(self, session: str, hello: m.Hello, committed: list[int], secret: str | None = None) -> str:
        """The session resumes: every earlier secret is void from now on (here), the checked token
        is spent, and a new secret is issued."""
        self.gen += 1
        if self._claims is not None:
            self.tokens.spend(self._claims)
            self._claims = None
        return self.issue(session, hello, committed, secret)
