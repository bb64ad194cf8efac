"""Resumption in the sans-I/O state machines (docs/PROTOCOL.md §6, "Resumption"):
both sides driven against each other in memory with a fake backbone, the
connection "lost" at every point of a session, and the resumed session's
commits compared with an uninterrupted one."""

import pytest

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.errors import ProtocolError
from spa.protocol.gateway import GatewayProtocol
from spa.protocol.loopback import GatewayHost, Loopback
from tests.protocol.fakes import BACKBONE, EOS, P, CountingModel, device, drain, wanted
from tests.protocol.fakes import hello as _hello


def _gateway(window) -> GatewayHost:
    host = GatewayHost(GatewayProtocol(BACKBONE, [EOS], resumable=True), CountingModel(), "sid", "secret-0")
    host.receive(_hello(window).to_dict())
    return host


def _run(window, cut=None, in_flight=1):
    """A session; when message number `cut` (either direction) is about to be
    delivered, the connection dies: it and everything in flight are lost, and
    the device resumes. Returns the device's commits and its protocol."""
    pair = Loopback(GatewayHost(GatewayProtocol(BACKBONE, [EOS], resumable=True), CountingModel(), "sid",
                                "secret-0"), device(window, in_flight), frames=None)
    pair.deliver_up()  # the hello: `ready` is message 1
    count, dp, gw = 0, pair.device.proto, pair.gateway
    while not dp.ended:
        if pair.down or pair.up:
            count += 1
            if count == cut:  # the link dies; the host reports the drafts it was computing
                pair.down.clear()
                pair.up.clear()
                gw.proto.connection_lost()
                while gw.busy:
                    gw.finish(then_work=False)
                action = wanted(GatewayProtocol(BACKBONE, [EOS], resumable=True), dp.resume_hello())
                gw.proto.check_resume(action.hello)
                gw.proto.resume(action.hello.resume.next, f"secret-{action.hello.resume.next}")
                gw.work()
                pair.gateway_sends()
                continue
        pair.step()
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
    gw = _gateway(2)
    drain(gw)
    resume = m.Resume("sid", "secret-0", P - 1)
    gw.proto.check_resume(_hello(2, resume))
    with pytest.raises(ProtocolError, match="resume_failed: unknown session or wrong secret"):
        gw.proto.check_resume(_hello(2, m.Resume("sid", "secret-x", P - 1)))
    with pytest.raises(ProtocolError, match="differs"):
        gw.proto.check_resume(_hello(3, resume))
    with pytest.raises(ProtocolError, match="resume_failed"):
        gw.proto.resume(P + 9, "new")  # never drafted
    gw.proto.resume(P - 1, "secret-1")
    resumed = gw.proto.data_to_send()[0]
    assert resumed["secret"] == "secret-1" and resumed["pos"] == P - 1 and "commit" not in resumed
    with pytest.raises(ProtocolError, match="wrong secret"):
        gw.proto.check_resume(_hello(2, resume))  # the old secret is void


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
