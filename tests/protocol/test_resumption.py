"""Resumption in the sans-I/O state machines (docs/PROTOCOL.md §6, "Resumption"):
both sides driven against each other in memory with a fake backbone, the
connection "lost" at every point of a session, and the resumed session's
commits compared with an uninterrupted one."""

import numpy as np
import pytest

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol, RunGate, RunSide
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway import Draft, GatewayProtocol, Head, Prefill, ResumeWanted, SendTaps

H, TAPS, P, EOS = 8, (0, 2), 5, 0
BACKBONE = m.Backbone("fake-lm", "fp-1", num_layers=2, hidden_size=H)


def _hello(window, resume=None) -> m.Hello:
    return m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt",
                   m.Options(window=window, max_new_tokens=12, codec="f32"), resume)


def _f(pos, fed):
    return np.random.default_rng(pos * 1000 + fed).normal(0, 1, (1, H)).astype(np.float32)


class FakeGateway:
    """The draft at pos is (7 pos + the token fed at pos) % 50 + 1 (never EOS); a
    side output with s[0] > 0 turns a draft d into d + 1 (a rollback)."""

    def __init__(self, window):
        self.gp = GatewayProtocol(BACKBONE, [EOS], resumable=True)
        self.gp.receive(_hello(window).to_dict())
        assert isinstance(self.gp.next_action(), Prefill)
        self.gp.started("sid", "secret-0", P)
        self.fed = {P - 1: 3}  # position -> the token fed there

    def take(self) -> list[dict]:
        """Run what the protocol asks for (each draft at once); what the gateway sends now."""
        while (action := self.gp.next_action()) is not None:
            if isinstance(action, Draft):
                if action.feed is not None:
                    self.fed[action.pos] = action.feed
                pos, fed = action.pos, self.fed[action.pos]
                self.gp.draft_ready(pos, _f(pos, fed), (7 * pos + fed) % 50 + 1, b"x")
            elif isinstance(action, SendTaps):
                self.gp.taps_ready(action.pos, np.ones((len(TAPS), H), np.float32))
            elif isinstance(action, Head):
                draft = dict(self.gp.drafted)[action.pos]
                token = draft + 1 if action.s[0] > 0 else draft
                self.gp.verdict_ready(action.pos, token, b"y")
        return self.gp.data_to_send()

    def receive(self, d: dict) -> None:
        self.gp.receive(d)

    def resume(self, hello: dict) -> list[dict]:
        """A new connection: the resume hello checked as the I/O layer does."""
        fresh = GatewayProtocol(BACKBONE, [EOS], resumable=True)
        fresh.receive(hello)
        action = fresh.next_action()
        assert isinstance(action, ResumeWanted)
        self.gp.check_resume(action.hello)
        self.gp.resume(action.hello.resume.next, f"secret-{action.hello.resume.next}")
        return self.take()


def _device_step(dp):
    """Gate: sigma = 1 on even positions; side output positive on positions divisible by 4."""
    while (action := dp.next_action()) is not None:
        if isinstance(action, RunGate):
            dp.gated(action.pos, action.pos % 2 == 0)
        elif isinstance(action, RunSide):
            dp.side_output(action.pos, np.full((1, H), 1.0 if action.pos % 4 == 0 else -1.0, np.float32))


def _run(window, cut=None, in_flight=1):
    """A session; when message number `cut` (either direction) is about to be
    delivered, the connection dies: it and everything in flight are lost, and
    the device resumes. Returns the device's commits and its protocol."""
    from collections import deque

    gw, dp = FakeGateway(window), DeviceProtocol(_hello(window), in_flight)
    to_dev, to_gw = deque(gw.take()), deque()
    count = 0
    while not dp.ended:
        if to_dev or to_gw:
            queue = to_dev if to_dev else to_gw
            msg = queue.popleft()
            count += 1
            if count == cut:  # the link dies
                to_dev.clear()
                to_gw.clear()
                to_dev.extend(gw.resume(dp.resume_hello()))
                continue
            if queue is to_dev:
                dp.receive(msg)
                _device_step(dp)
                if not to_dev:
                    to_gw.extend(dp.flush())
            else:
                gw.receive(msg)
                to_dev.extend(gw.take())
        else:
            to_dev.extend(gw.take())
            to_gw.extend(dp.flush())
            assert to_dev or to_gw, "stuck"
    return [(c.pos, c.token) for c in dp.committed], dp


@pytest.mark.parametrize("window, in_flight", [(0, 1), (2, 1), (4, 3)])
def test_resume_at_every_point_commits_the_same_tokens(window, in_flight):
    want, plain = _run(window, in_flight=in_flight)
    assert len(want) == 12 and plain.stats.rollbacks > 0 and plain.stats.resumes == 0
    assert (plain.stats.max_in_flight > 1) == (in_flight > 1)
    total = 1  # message 1 is `ready`: a device that never got it has no session to resume
    while True:  # cut before every later message of the session, then past its end
        total += 1
        got, dp = _run(window, total, in_flight)
        assert got == want, (window, total)
        if dp.stats.resumes == 0:
            break
        assert dp.stats.resumes == 1
    assert total > 30


def test_resume_rotates_the_secret_and_checks_the_hello():
    gw = FakeGateway(2)
    gw.take()
    resume = m.Resume("sid", "secret-0", P - 1)
    gw.gp.check_resume(_hello(2, resume))
    with pytest.raises(ProtocolError, match="resume_failed: unknown session or wrong secret"):
        gw.gp.check_resume(_hello(2, m.Resume("sid", "secret-x", P - 1)))
    with pytest.raises(ProtocolError, match="differs"):
        gw.gp.check_resume(_hello(3, resume))
    with pytest.raises(ProtocolError, match="resume_failed"):
        gw.gp.resume(P + 9, "new")  # never drafted
    gw.gp.resume(P - 1, "secret-1")
    resumed = gw.gp.data_to_send()[0]
    assert resumed["secret"] == "secret-1" and resumed["pos"] == P - 1 and "commit" not in resumed
    with pytest.raises(ProtocolError, match="wrong secret"):
        gw.gp.check_resume(_hello(2, resume))  # the old secret is void


def test_a_gateway_without_resumption_refuses_and_a_resume_needs_next():
    plain = GatewayProtocol(BACKBONE, [EOS])
    with pytest.raises(ProtocolError, match="resume_failed"):
        plain.receive(_hello(0, m.Resume("s", "x", 4)).to_dict())
    with pytest.raises(ProtocolError, match="hello.resume.next"):
        GatewayProtocol(BACKBONE, [EOS], resumable=True).receive(_hello(0, m.Resume("s", "x")).to_dict())


def test_device_checks_resumed():
    dp = DeviceProtocol(_hello(0))
    dp.receive(m.Ready("sid", "s0", BACKBONE, P, {}).to_dict())
    dp.resume_hello()
    with pytest.raises(ProtocolError, match="out_of_order"):
        dp.receive(m.Resumed("other", "s1", 0, P - 1).to_dict())
    with pytest.raises(ProtocolError, match="out_of_order"):
        dp.receive(m.Resumed("sid", "s1", 0, P + 3).to_dict())
    dp.receive(m.Resumed("sid", "s1", 1, P, (m.Commit(P - 1, 9, b"z"),)).to_dict())
    assert [(c.pos, c.token) for c in dp.committed] == [(P - 1, 9)] and dp.epoch == 1 and dp.secret == "s1"
    with pytest.raises(ProtocolError, match="out_of_order"):  # no second resumed without a resume hello
        dp.receive(m.Resumed("sid", "s2", 1, P).to_dict())
