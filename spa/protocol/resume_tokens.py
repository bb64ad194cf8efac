"""Resume tokens any gateway replica can verify (docs/PROTOCOL.md §6, "Resumption").

A resume token is what `ready.secret`, `resumed.secret` and a refreshed
`step.secret`/`verdict.secret` carry. It is an HMAC-SHA256 (truncated to 128
bits) over a small msgpack payload, keyed by a secret the deployment shares
(`spa gateway --resume-secret-file`, `$SPA_RESUME_SECRET`; never on the
wire). The payload binds it to

* the session id,
* the generation: a digest of prompt, plugin, options and the uploads
  (cloud-side projection, gate) of the session's first hello,
* the committed prefix: the number `n` of generated tokens verified when it
  was issued and a digest of their ids,
* `g`, the number of resumes the session had when it was issued (a resume
  voids every token issued before it on the replica that holds the session),
* an expiry (`2 * resume_grace_s` after issue; the gateway refreshes the
  token at least every `resume_grace_s / 2` while it sends),

and a random nonce. So a replica that never saw the session can check a
resume hello against it and rebuild the session from what the device sends
(prompt, options, plugin, uploads, committed token ids), and one that holds
it can check it is the current one. A replica remembers every token used to
resume on it until the token expires (replays are refused there); another
replica does not know that a token was used, so a stolen unexpired token
can be replayed once per other replica — it then only reopens a generation
whose prompt and committed tokens the thief must present anyway.

Sans I/O: the clock is injected.
"""

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

import msgpack

from spa.errors import SpaError
from spa.protocol.errors import ProtocolError

TOKEN_VERSION = 1
MAC_BYTES = 16
DIGEST_BYTES = 16
MIN_SECRET_BYTES = 16
ENV_SECRET = "SPA_RESUME_SECRET"
# The answers of a refused resume: the same for "no such session" and "not this
# session's token", so a resume reveals nothing of other sessions.
REFUSED = ("unknown session or wrong secret (a gateway that does not hold the session rebuilds it only from a "
           "resume with resume.tokens, docs/PROTOCOL.md §6)")
EXPIRED = "the resume token expired"
REPLAYED = "the resume token was already used"
ENDED = "the session has ended (the device said bye, sent an error or closed the connection, or it finished)"


def _digest(*parts) -> bytes:
    return hashlib.sha256(msgpack.packb(list(parts), use_bin_type=True)).digest()[:DIGEST_BYTES]


def generation_digest(hello) -> bytes:
    """What a session generates: prompt, plugin, options and the uploads of its first hello."""
    proj = hello.projection
    gate = hello.gate
    return _digest(
        "generation",
        hello.prompt,
        hello.plugin.to_dict(),
        hello.options.to_dict(),
        None if proj is None else [proj.rank, proj.digest],  # the same for the weights and for their hash
        None if gate is None else [hashlib.sha256(gate.weight).digest(), hashlib.sha256(gate.bias).digest(),
                                   float(gate.tau)],
    )


def prefix_digest(tokens) -> bytes:
    """The committed prefix: generated token ids, in order."""
    return _digest("prefix", [int(t) for t in tokens])


@dataclass(frozen=True)
class TokenClaims:
    session: str
    g: int  # resumes the session had when the token was issued
    n: int  # generated tokens verified when it was issued
    prefix: bytes  # prefix_digest of those n tokens
    generation: bytes  # generation_digest of the session
    expires: float  # unix time
    mac: bytes  # identifies the token (replay memory)


def load_secret(path: str | None = None) -> bytes | None:
    """The deployment's shared secret: the file at `path`, else $SPA_RESUME_SECRET, else None
    (then each process makes its own: resumes work on that process only)."""
    if path:
        try:
            raw = open(path, "rb").read().strip()
        except OSError as exc:
            raise SpaError(f"cannot read the resume secret file {path}: {exc.strerror}") from None
        source = path
    elif os.environ.get(ENV_SECRET):
        raw, source = os.environ[ENV_SECRET].strip().encode(), f"${ENV_SECRET}"
    else:
        return None
    if len(raw) < MIN_SECRET_BYTES:
        raise SpaError(f"the resume secret in {source} is too short: use at least {MIN_SECRET_BYTES} bytes "
                       f"(e.g. `openssl rand -hex 32`)")
    return raw


class ResumeTokens:
    """Issues and checks resume tokens for every session of one gateway process."""

    def __init__(self, secret: bytes | None = None, clock=time.time):
        # A per-process random secret keeps the single-process behaviour: a
        # restarted gateway without a shared secret refuses old tokens.
        secret = secret if secret is not None else secrets.token_bytes(32)
        self._key = hmac.new(secret, b"spa resume token v1", hashlib.sha256).digest()
        self.clock = clock
        self._spent: dict[bytes, float] = {}  # mac -> expiry: tokens used to resume here
        self._ended: dict[str, float] = {}  # session -> until when its tokens could still be presented

    def issue(self, session: str, g: int, committed, generation: bytes, lifetime_s: float) -> str:
        committed = [int(t) for t in committed]
        payload = msgpack.packb([TOKEN_VERSION, session, int(g), len(committed), prefix_digest(committed),
                                 generation, int(self.clock() + lifetime_s) + 1, secrets.token_bytes(8)],
                                use_bin_type=True)
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:MAC_BYTES]
        return _b64(payload + mac)

    def check(self, token: str, session: str) -> TokenClaims:
        """The claims of a genuine, unexpired, unused token of `session`; resume_failed otherwise."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise ProtocolError("resume_failed", REFUSED) from None
        payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        good = hmac.new(self._key, payload, hashlib.sha256).digest()[:MAC_BYTES]
        if len(raw) <= MAC_BYTES or not hmac.compare_digest(mac, good):
            raise ProtocolError("resume_failed", REFUSED)
        try:
            version, sid, g, n, prefix, generation, expires, _nonce = msgpack.unpackb(payload, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):  # signed by us: cannot happen
            raise ProtocolError("resume_failed", REFUSED) from None
        if version != TOKEN_VERSION or not hmac.compare_digest(str(sid).encode(), session.encode()):
            raise ProtocolError("resume_failed", REFUSED)
        now = self.clock()
        if now > expires:
            raise ProtocolError("resume_failed", EXPIRED)
        self._prune(now)
        if sid in self._ended:
            raise ProtocolError("resume_failed", ENDED)
        if mac in self._spent:
            raise ProtocolError("resume_failed", REPLAYED)
        return TokenClaims(sid, g, n, prefix, generation, float(expires), mac)

    def spend(self, claims: TokenClaims) -> None:
        """`claims`' token resumed a session here: it never resumes again on this replica."""
        self._spent[claims.mac] = claims.expires

    def end(self, session: str, lifetime_s: float) -> None:
        """`session` is over here (ended by the device, or finished): none of its tokens, unexpired
        ones included (`lifetime_s`: the longest a token lives), resumes it on this replica again.
        Another replica cannot know (docs/PROTOCOL.md §6, "Resume tokens")."""
        self._ended[session] = self.clock() + lifetime_s

    def _prune(self, now: float) -> None:
        for mac in [m for m, exp in self._spent.items() if exp < now]:
            del self._spent[mac]
        for sid in [s for s, until in self._ended.items() if until < now]:
            del self._ended[sid]


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
