"""Signed resume tokens in the sans-I/O state machines (docs/PROTOCOL.md §6,
"Resumption", "Resume tokens"): a session resumed on a gateway that does not
hold it (another replica, a restart with the same secret) is rebuilt from
what the device sends and commits the same tokens; forged, expired, replayed
and mismatched resumes are `resume_failed` and reveal nothing."""

from collections import deque

import numpy as np
import pytest

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway import Draft, GatewayProtocol, Head, Prefill, ResumeWanted, SendTaps, SessionMoved
from spa.protocol.limits import Limits
from spa.protocol.resume_tokens import EXPIRED, REFUSED, REPLAYED, ResumeTokens
from spa.protocol.device import RunGate, RunSide
from tests.protocol.test_resumption import BACKBONE, EOS, P, TAPS

SECRET = b"a deployment secret of 32 bytes!"


def _hello(window, resume=None) -> m.Hello:  # the session of tests/protocol/test_resumption.py
    return m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt",
                   m.Options(window=window, max_new_tokens=12, codec="f32"), resume)


def _f(pos, fed):
    return np.random.default_rng(pos * 1000 + fed).normal(0, 1, (1, BACKBONE.hidden_size)).astype(np.float32)


def _device_step(dp):
    """Gate: sigma = 1 on even positions; side output positive on positions divisible by 4."""
    while (action := dp.next_action()) is not None:
        if isinstance(action, RunGate):
            dp.gated(action.pos, action.pos % 2 == 0)
        elif isinstance(action, RunSide):
            value = 1.0 if action.pos % 4 == 0 else -1.0
            dp.side_output(action.pos, np.full((1, BACKBONE.hidden_size), value, np.float32))
GRACE = 10.0


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


class Replica:
    """One gateway process: its token book (shared secret, own replay memory) and the sessions it holds.
    The fake backbone drafts (7 pos + the token fed at pos) % 50 + 1; a side output with s[0] > 0 adds 1."""

    def __init__(self, clock, secret=SECRET):
        self.tokens = ResumeTokens(secret, clock)
        self.held: dict[str, tuple[GatewayProtocol, dict]] = {}

    def proto(self):
        return GatewayProtocol(BACKBONE, [EOS], Limits(resume_grace_s=GRACE), resumable=True, tokens=self.tokens)

    def start(self, window) -> tuple[GatewayProtocol, dict]:
        gp = self.proto()
        gp.receive(_hello(window).to_dict())
        assert isinstance(gp.next_action(), Prefill)
        gp.started("sid", None, P)
        self.held["sid"] = (gp, {P - 1: 3})
        return self.held["sid"]

    @staticmethod
    def take(gp, fed) -> list[dict]:
        while (action := gp.next_action()) is not None:
            if isinstance(action, Draft):
                if action.feed is not None:
                    fed[action.pos] = action.feed
                pos = action.pos
                gp.draft_ready(pos, _f(pos, fed[pos]), (7 * pos + fed[pos]) % 50 + 1, b"x")
            elif isinstance(action, SendTaps):
                gp.taps_ready(action.pos, np.ones((len(TAPS), BACKBONE.hidden_size), np.float32))
            elif isinstance(action, Head):
                draft = dict(gp.drafted)[action.pos]
                gp.verdict_ready(action.pos, draft + 1 if action.s[0] > 0 else draft, b"y")
        return gp.data_to_send()

    def resume(self, hello: dict):
        """A resume hello on a new connection, as cloud_gateway/server.py handles it: the session
        held here if its token is current, else rebuilt from the hello. (gp, fed, what it sends)."""
        fresh = self.proto()
        fresh.receive(hello)
        action = fresh.next_action()
        assert isinstance(action, ResumeWanted)
        sid = action.hello.resume.session
        if sid in self.held:
            gp, fed = self.held[sid]
            try:
                gp.check_resume(action.hello)
                gp.resume(action.hello.resume.next)
                return gp, fed, self.take(gp, fed)
            except SessionMoved:
                del self.held[sid]
        fresh.check_rebuild(action.hello)
        tokens = action.hello.resume.tokens
        fresh.rebuilt(sid, P, [m.Commit(P - 1 + i, t, b"z") for i, t in enumerate(tokens)])
        fed = {P - 1: 3, **{P + i: t for i, t in enumerate(tokens[:-1])}}  # the KV cache: prompt + tokens but the last
        self.held[sid] = (fresh, fed)
        return fresh, fed, self.take(fresh, fed)


def _session(window, in_flight=1, cut=None, clock=None, replicas=2, tick=0.0):
    """A session on replica 0; when message number `cut` is about to be delivered the connection
    (and replica 0, as far as this session goes) dies, and the device resumes on replica 1."""
    clock = clock or Clock()
    reps = [Replica(clock) for _ in range(replicas)]
    gp, fed = reps[0].start(window)
    dp = DeviceProtocol(_hello(window), in_flight)
    to_dev, to_gw = deque(Replica.take(gp, fed)), deque()
    count, where = 0, 0
    while not dp.ended:
        clock.t += tick
        if to_dev or to_gw:
            queue = to_dev if to_dev else to_gw
            msg = queue.popleft()
            count += 1
            if count == cut:
                to_dev.clear()
                to_gw.clear()
                where = (where + 1) % replicas
                gp, fed, out = reps[where].resume(dp.resume_hello())
                to_dev.extend(out)
                continue
            if queue is to_dev:
                dp.receive(msg)
                _device_step(dp)
                if not to_dev:
                    to_gw.extend(dp.flush())
            else:
                gp.receive(msg)
                to_dev.extend(Replica.take(gp, fed))
        else:
            to_dev.extend(Replica.take(gp, fed))
            to_gw.extend(dp.flush())
            assert to_dev or to_gw, "stuck"
    return [(c.pos, c.token) for c in dp.committed], dp, reps


@pytest.mark.parametrize("window, in_flight", [(0, 1), (3, 2)])
def test_a_replica_that_never_saw_the_session_rebuilds_it_at_every_point(window, in_flight):
    want, plain, _ = _session(window, in_flight)
    assert plain.stats.rollbacks > 0
    cut = 1
    while True:
        cut += 1
        got, dp, reps = _session(window, in_flight, cut)
        assert got == want, (window, cut)
        if dp.stats.resumes == 0:
            break
        assert dp.stats.resumes == 1 and reps[1].held["sid"][0].stats.resumes == 1  # rebuilt on replica 1
    assert cut > 20


def test_tokens_are_refreshed_on_steps_and_verdicts_while_time_passes():
    want, _, _ = _session(2)
    # A quarter grace per message: the gateway refreshes the token every other message or so, and a
    # session cut late resumes elsewhere with a token that would long have expired without refreshes.
    got, dp, _ = _session(2, cut=40, tick=GRACE / 4)
    assert got == want and dp.stats.resumes == 1
    clock, a, _, dp = _started()
    gp, fed = a.held["sid"]
    first = dp.secret
    clock.t += GRACE / 2
    sent = []
    for _ in range(3):
        for msg in dp.flush():
            gp.receive(msg)
        for msg in Replica.take(gp, fed):
            sent.append(msg)
            dp.receive(msg)
        _device_step(dp)
    refreshed = [msg for msg in sent if "secret" in msg]
    assert refreshed and refreshed[0]["type"] in ("step", "verdict") and len(refreshed) == 1  # once per half grace
    assert dp.secret == refreshed[0]["secret"] != first


def _started(window=2, refresh=True):
    clock = Clock()
    a, b = Replica(clock), Replica(clock)
    gp, fed = a.start(window)
    dp = DeviceProtocol(_hello(window))
    for msg in Replica.take(gp, fed):
        dp.receive(msg)
    _device_step(dp)
    while len(dp.committed) < 3:  # a few tokens committed, the session under way
        if refresh and len(dp.committed) == 2:
            clock.t += GRACE / 2  # so that a refreshed token covers committed tokens
        for msg in dp.flush():
            gp.receive(msg)
        for msg in Replica.take(gp, fed):
            dp.receive(msg)
        _device_step(dp)
    return clock, a, b, dp


def _refused(replica, hello: dict) -> str:
    with pytest.raises(ProtocolError) as err:
        replica.resume(hello)
    assert err.value.code == "resume_failed"
    return err.value.message


def test_forged_expired_replayed_and_mismatched_resumes_are_refused():
    clock, a, b, dp = _started()
    hello = dp.resume_hello()
    token = hello["resume"]["secret"]
    assert len(token) <= m.MAX_NAME and dp.committed  # an id on the wire; the device has committed tokens

    def with_resume(**change):
        return {**hello, "resume": {**hello["resume"], **change}}

    flipped = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert _refused(b, with_resume(secret=flipped)) == REFUSED  # forged: another MAC
    assert _refused(a, with_resume(secret=flipped)) == REFUSED  # the same answer where the session is held
    assert _refused(Replica(clock, b"another deployment's secret!!!!!"), hello) == REFUSED
    assert _refused(b, with_resume(session="0" * 32)) == REFUSED  # my token does not open another session
    assert "differs" in _refused(b, {**hello, "prompt": "another prompt"})
    tampered = list(m.parse(hello).resume.tokens)
    tampered[0] += 1
    assert "committed tokens differ" in _refused(
        b, with_resume(tokens=np.asarray(tampered, "<u4").tobytes()))
    # Genuine: resumes once on b (rebuilt there) ...
    gp, _, out = b.resume(hello)
    assert out[0]["type"] == "resumed" and out[0]["secret"] != token and gp.stats.rebuilt_tokens == len(dp.committed)
    # ... and never again there (replayed), nor where the session was held before (rotated: moved on).
    assert _refused(b, hello) == REPLAYED
    # Expired: a fresh, unused token presented two graces after it was issued.
    clock2, a2, b2, dp2 = _started()
    clock2.t += 2 * GRACE + 2
    assert _refused(b2, dp2.resume_hello()) == EXPIRED
    assert _refused(a2, dp2.resume_hello()) == EXPIRED


def test_a_resume_voids_older_tokens_and_a_stale_copy_gives_way():
    clock, a, b, dp = _started()
    old = dp.resume_hello()
    gp_a, _, out = a.resume(old)  # held: resumed in place, the token rotated
    assert gp_a.resume_gen == 1 and out[0]["type"] == "resumed"
    assert _refused(a, old) == REPLAYED  # used: void here (and so is every token issued before that resume)
    dp.receive(out[0])
    _, _, out = b.resume(dp.resume_hello())  # now the device reaches b: rebuilt there, g = 2
    assert b.held["sid"][0].resume_gen == 2
    dp.receive(out[0])
    # a still holds its stale copy (g = 1): b's token makes it give way, and a rebuilds the session
    newer = m.parse(dp.resume_hello())
    with pytest.raises(SessionMoved):
        gp_a.check_resume(newer)
    gp, _, out = a.resume(newer.to_dict())
    assert gp is not gp_a and gp.resume_gen == 3 and out[0]["type"] == "resumed"


# --- a restarted `spa gateway` with the same secret (live, loopback) ---------------------------------


def test_a_restarted_gateway_with_the_same_secret_resumes_the_session(backbone, pte_path, tmp_path):
    """`spa gateway --resume-secret-file F` killed (no goodbye) after the device's first token and
    started again on the same port with the same file: the device resumes on the new process,
    which rebuilds the session, and the summary equals the uninterrupted reference token for token."""
    import asyncio

    from cloud_gateway.process import GatewayProcess
    from device_runtime.client import run_session
    from device_runtime.documents import device_prompt, load_document
    from spa.model.pte_plugin import PtePlugin
    from spa.model.reference import reference_generate

    pte = PtePlugin(pte_path)
    prompt = device_prompt(pte.config, load_document("aclsum:test:4", pte.config.max_doc_tokens))
    want = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=24)
    secret = tmp_path / "resume.secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    args = ("--resume-grace", "120", "--resume-secret-file", secret)
    gateways = [GatewayProcess(*args)]
    try:
        async def main():
            started = asyncio.Event()
            session = asyncio.create_task(run_session(
                gateways[0].url, pte, prompt, m.Options(window=0, max_new_tokens=24),
                on_commit=lambda piece, sigma: started.set()))
            await started.wait()
            loop = asyncio.get_running_loop()
            old = gateways[0]
            old.proc.kill()  # no close frames: the device's connection is reset
            await loop.run_in_executor(None, old.proc.wait)
            gateways.append(await loop.run_in_executor(None, lambda: GatewayProcess(*args, port=old.port)))
            return await session

        result = asyncio.run(main())
    finally:
        for gw in gateways:
            gw.stop()
    assert result.tokens == want.tokens and result.sigmas == want.sigmas
    assert result.finish_reason == want.finish_reason
    assert result.stats["resumes"] == 1
    assert 1 <= result.stats["gateway"]["rebuilt_tokens"] < len(want.tokens)  # rebuilt from the committed ones
