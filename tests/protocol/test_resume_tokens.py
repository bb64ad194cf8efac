"""Signed resume tokens in the sans-I/O state machines (docs/PROTOCOL.md §6,
"Resumption", "Resume tokens"): a session resumed on a gateway that does not
hold it (another replica, a restart with the same secret) is rebuilt from
what the device sends and commits the same tokens; forged, expired, replayed
and mismatched resumes are `resume_failed` and reveal nothing."""

import numpy as np
import pytest

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway import GatewayProtocol, SessionMoved
from spa.protocol.limits import Limits
from spa.protocol.loopback import GatewayHost, Loopback
from spa.protocol.resume_tokens import ENDED, EXPIRED, REFUSED, REPLAYED, ResumeTokens
from spa.protocol.loopback import DeviceHost
from tests.protocol.fakes import (BACKBONE, EOS, H, P, TAPS, CountingModel, answer, device, drain, gate, hello, side,
                                  wanted)

SECRET = b"a deployment secret of 32 bytes!"
GRACE = 10.0


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


class Replica:
    """One gateway process: its token book (shared secret, own replay memory) and the sessions it
    holds, each a GatewayHost over the counting backbone of tests/protocol/fakes.py."""

    def __init__(self, clock, secret=SECRET):
        self.tokens = ResumeTokens(secret, clock)
        self.held: dict[str, GatewayHost] = {}

    def proto(self):
        return GatewayProtocol(BACKBONE, [EOS], Limits(resume_grace_s=GRACE), resumable=True,
                               resume_tokens=self.tokens)

    def start(self) -> GatewayHost:
        self.held["sid"] = GatewayHost(self.proto(), CountingModel(), "sid", secret=None)
        return self.held["sid"]

    def resume(self, resume_hello: dict) -> tuple[GatewayHost, list[dict]]:
        """A resume hello on a new connection, as cloud_gateway/server.py handles it: the session
        held here if its token is current, else rebuilt from the hello. (its host, what it sends)"""
        fresh = self.proto()
        action = wanted(fresh, resume_hello)
        sid = action.hello.resume.session
        if sid in self.held:
            host = self.held[sid]
            try:
                host.proto.check_resume(action.hello)
                host.proto.resume(action.hello.resume.next)
                return host, drain(host)
            except SessionMoved:
                del self.held[sid]
        fresh.check_rebuild(action.hello)
        tokens = action.hello.resume.tokens
        fresh.rebuilt(sid, P, [m.Commit(P - 1 + i, t, b"z") for i, t in enumerate(tokens)])
        fed = {P - 1: 3, **{P + i: t for i, t in enumerate(tokens[:-1])}}  # the KV cache: prompt + tokens but the last
        host = self.held[sid] = GatewayHost(fresh, CountingModel(fed), sid)
        return host, drain(host)


def _session(window, in_flight=1, cut=None, clock=None, replicas=2, tick=0.0):
    """A session on replica 0; when message number `cut` is about to be delivered the connection
    (and replica 0, as far as this session goes) dies, and the device resumes on replica 1."""
    clock = clock or Clock()
    reps = [Replica(clock) for _ in range(replicas)]
    pair = Loopback(reps[0].start(), device(window, in_flight), frames=None)
    pair.deliver_up()  # the hello
    dp, count, where = pair.device.proto, 0, 0
    while not dp.ended:
        clock.t += tick
        if pair.down or pair.up:
            count += 1
            if count == cut:
                pair.down.clear()
                pair.up.clear()
                where = (where + 1) % replicas
                pair.gateway, out = reps[where].resume(dp.resume_hello())
                pair.down.extend(out)
                continue
        pair.step()
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
        assert dp.stats.resumes == 1 and reps[1].held["sid"].proto.stats.resumes == 1  # rebuilt on replica 1
    assert cut > 20


def test_tokens_are_refreshed_on_steps_and_verdicts_while_time_passes():
    want, _, _ = _session(2)
    # A quarter grace per message: the gateway refreshes the token every other message or so, and a
    # session cut late resumes elsewhere with a token that would long have expired without refreshes.
    got, dp, _ = _session(2, cut=40, tick=GRACE / 4)
    assert got == want and dp.stats.resumes == 1
    clock, a, _, dp = _started()
    host = a.held["sid"]
    first = dp.secret
    clock.t += GRACE / 2
    sent = []
    for _ in range(3):
        for msg in dp.flush():
            host.receive(msg)
        for msg in drain(host):
            sent.append(msg)
            dp.receive(msg)
        answer(dp)
    refreshed = [msg for msg in sent if "secret" in msg]
    assert refreshed and refreshed[0]["type"] in ("step", "verdict") and len(refreshed) == 1  # once per half grace
    assert dp.secret == refreshed[0]["secret"] != first


def _started(window=2, refresh=True):
    clock = Clock()
    a, b = Replica(clock), Replica(clock)
    host = a.start()
    host.receive(hello(window).to_dict())
    dp = DeviceProtocol(hello(window))
    for msg in drain(host):
        dp.receive(msg)
    answer(dp)
    while len(dp.committed) < 3:  # a few tokens committed, the session under way
        if refresh and len(dp.committed) == 2:
            clock.t += GRACE / 2  # so that a refreshed token covers committed tokens
        for msg in dp.flush():
            host.receive(msg)
        for msg in drain(host):
            dp.receive(msg)
        answer(dp)
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
    host, out = b.resume(hello)
    assert out[0]["type"] == "resumed" and out[0]["secret"] != token
    assert host.proto.stats.rebuilt_tokens == len(dp.committed)
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
    host_a, out = a.resume(old)  # held: resumed in place, the token rotated
    gp_a = host_a.proto
    assert gp_a.resumption.gen == 1 and out[0]["type"] == "resumed"
    assert _refused(a, old) == REPLAYED  # used: void here (and so is every token issued before that resume)
    dp.receive(out[0])
    _, out = b.resume(dp.resume_hello())  # now the device reaches b: rebuilt there, g = 2
    assert b.held["sid"].proto.resumption.gen == 2
    dp.receive(out[0])
    # a still holds its stale copy (g = 1): b's token makes it give way, and a rebuilds the session
    newer = m.parse(dp.resume_hello())
    with pytest.raises(SessionMoved):
        gp_a.check_resume(newer)
    host, out = a.resume(newer.to_dict())
    assert host.proto is not gp_a and host.proto.resumption.gen == 3 and out[0]["type"] == "resumed"


def test_a_margin_gate_session_with_pushed_taps_is_rebuilt_where_it_was_not_held():
    """A margin gate uploads a gate of [2, H + 1]: the hello is checked once, by the same code for a
    new session and a rebuilt one, so the rebuild accepts what the first hello was accepted with."""
    opts = m.Options(window=2, max_new_tokens=12, codec="f32", gate_margin=True)
    upload = m.GateUpload(np.zeros((2, H + 1), "<f4").tobytes(), np.zeros(2, "<f4").tobytes(), 0.5)
    margin_hello = m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt", opts, gate=upload)

    def session(cut_after: int | None):
        clock = Clock()
        a, b = Replica(clock), Replica(clock)
        pair = Loopback(a.start(), DeviceHost(DeviceProtocol(margin_hello), gate, side), frames=None)
        dp = pair.device.proto
        while not dp.ended:
            if cut_after is not None and len(dp.committed) >= cut_after and dp.stats.resumes == 0:
                pair.down.clear()
                pair.up.clear()
                pair.gateway, out = b.resume(dp.resume_hello())  # b never saw the session
                assert out[0]["type"] == "resumed"
                assert pair.gateway.proto.uploads.gate.weight.shape == (2, H + 1)
                pair.down.extend(out)
            pair.step()
        return [c.token for c in dp.committed], dp

    want, _ = session(None)
    got, dp = session(3)
    assert got == want and dp.stats.resumes == 1 and dp.end.stats["rebuilt_tokens"] >= 3


def test_an_ended_session_is_not_revived_by_its_tokens():
    """Ended means ended: once the gateway freed a session the device ended (bye, an error, a close
    frame) or that finished, its unexpired tokens resume it nowhere on that gateway."""
    clock, a, b, dp = _started()
    hello_again = dp.resume_hello()
    a.tokens.end("sid", 2 * GRACE)  # what cloud_gateway/server.py does when it frees an ended session
    del a.held["sid"]
    assert _refused(a, hello_again) == ENDED
    host, out = b.resume(hello_again)  # another replica cannot know (docs/PROTOCOL.md §6)
    assert out[0]["type"] == "resumed"


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
