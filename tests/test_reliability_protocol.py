"""Resumption in the sans-I/O state machines (docs/PROTOCOL.md §6, "Resumption"):
both sides driven against each other in memory with a fake backbone, the
connection "lost" at every point of a session, and the resumed session's
commits compared with an uninterrupted one."""

import numpy as np
import pytest

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol, RunGate, RunSide
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway import Accepted, GatewayProtocol, ResumeWanted, SideReceived, Start, TapsWanted

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
        assert isinstance(self.gp.receive(_hello(window).to_dict()), Start)
        self.out = [self.gp.ready("sid", "secret-0", P)]
        self.fed = {P - 1: 3}  # position -> the token fed there

    def take(self) -> list[dict]:
        """What the gateway sends now: answers, then drafts while allowed."""
        while self.gp.can_draft():
            pos = self.gp.next_draft_pos
            token = (7 * pos + self.fed[pos]) % 50 + 1
            self.out.append(self.gp.step(self.gp.epoch, pos, _f(pos, self.fed[pos]), token, b"x"))
            self.fed[pos + 1] = token
        out, self.out = self.out, []
        return out

    def receive(self, d: dict) -> None:
        ev = self.gp.receive(d)
        if isinstance(ev, TapsWanted):
            self.out.append(self.gp.taps(ev.pos, np.ones((len(TAPS), H), np.float32)))
        elif isinstance(ev, SideReceived):
            draft = dict(self.gp.drafted)[ev.pos]
            token = draft + 1 if ev.s[0, 0] > 0 else draft
            self.out.append(self.gp.verdict(ev.pos, token, b"y"))
            self.fed[ev.pos + 1] = token
        if self.gp.finish_reason and self.gp.phase == "generating":
            self.out.append(self.gp.end())

    def resume(self, hello: dict) -> list[dict]:
        """A new connection: the resume hello checked as the I/O layer does."""
        ev = GatewayProtocol(BACKBONE, [EOS], resumable=True).receive(hello)
        assert isinstance(ev, ResumeWanted)
        self.gp.check_resume(ev.hello)
        out = [self.gp.resume(ev.hello.resume.next, f"secret-{ev.hello.resume.next}")]
        if self.gp.end_msg is not None:
            out.append(self.gp.end_msg)
        elif self.gp.finish_reason:
            out.append(self.gp.end())
        else:
            out += [self.gp.restep(pos, _f(pos, self.fed[pos]), b"x") for pos, _ in self.gp.drafted]
        return out


def _device_step(dp):
    """Gate: sigma = 1 on even positions; side output positive on positions divisible by 4."""
    while (action := dp.next_action()) is not None:
        if isinstance(action, RunGate):
            dp.gated(action.pos, action.pos % 2 == 0)
        elif isinstance(action, RunSide):
            dp.side_output(action.pos, np.full((1, H), 1.0 if action.pos % 4 == 0 else -1.0, np.float32))


def _run(window, cut=None):
    """A session; when message number `cut` (either direction) is about to be
    delivered, the connection dies: it and everything in flight are lost, and
    the device resumes. Returns the device's commits and its protocol."""
    from collections import deque

    gw, dp = FakeGateway(window), DeviceProtocol(_hello(window))
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


@pytest.mark.parametrize("window", [0, 2])
def test_resume_at_every_point_commits_the_same_tokens(window):
    want, plain = _run(window)
    assert len(want) == 12 and plain.rollbacks > 0 and plain.resumes == 0
    total = 1  # message 1 is `ready`: a device that never got it has no session to resume
    while True:  # cut before every later message of the session, then past its end
        total += 1
        got, dp = _run(window, total)
        assert got == want, (window, total)
        if dp.resumes == 0:
            break
        assert dp.resumes == 1
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
    resumed = gw.gp.resume(P - 1, "secret-1")
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
    dp.receive(m.Resumed("sid", "s1", 1, P, m.Commit(P - 1, 9, b"z")).to_dict())
    assert [(c.pos, c.token) for c in dp.committed] == [(P - 1, 9)] and dp.epoch == 1 and dp.secret == "s1"
    with pytest.raises(ProtocolError, match="out_of_order"):  # no second resumed without a resume hello
        dp.receive(m.Resumed("sid", "s2", 1, P).to_dict())
