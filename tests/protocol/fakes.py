"""The small fake world of the resumption tests: a counting backbone and a device whose gate and
side network depend on the position alone (spa/protocol/loopback.py drives both sides)."""

import numpy as np

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.gateway import GatewayProtocol
from spa.protocol.loopback import DeviceHost, Drafted, GatewayHost

H, TAPS, P, EOS = 8, (0, 2), 5, 0
BACKBONE = m.BackboneInfo("fake-lm", "fp-1", num_layers=2, hidden_size=H)


def hello(window, resume=None) -> m.Hello:
    return m.Hello("", m.Plugin(BACKBONE.fingerprint, TAPS, "h"), "prompt",
                   m.Options(window=window, max_new_tokens=12, codec="f32"), resume)


def f_at(pos, fed) -> np.ndarray:
    return np.random.default_rng(pos * 1000 + fed).normal(0, 1, (1, H)).astype(np.float32)


def draft_at(pos, fed) -> int:
    return (7 * pos + fed) % 50 + 1  # never EOS


class CountingModel:
    """The draft at pos is (7 pos + the token fed at pos) % 50 + 1; a side output with s[0] > 0 turns
    a draft d into d + 1 (a rollback). `fed`: position -> the token fed there (the 'KV cache')."""

    def __init__(self, fed: dict | None = None):
        self.fed = {P - 1: 3} if fed is None else fed

    def prefill(self) -> int:
        return P

    def draft(self, line, pos, feed) -> Drafted:
        if feed is not None:
            self.fed[pos] = feed
        return Drafted(f_at(pos, self.fed[pos]), draft_at(pos, self.fed[pos]), b"x", margin=1.5)  # (a margin gate's)

    def taps(self, line, pos) -> np.ndarray:
        return np.ones((len(TAPS), H), np.float32)

    def head(self, line, pos, s) -> tuple[int, bytes]:
        draft = draft_at(pos, self.fed[pos])
        return (draft + 1 if s[0] > 0 else draft), b"y"

    def fork(self, line, parent, keep): pass  # noqa: E704  (no branch lines here)

    def cut(self, line, keep): pass  # noqa: E704  (`fed` is rewritten by the next drafts)

    def drop(self, line): pass  # noqa: E704

    def forget(self, line, upto): pass  # noqa: E704


def gate(pos, f, margin) -> bool:
    return pos % 2 == 0  # sigma = 1 on even positions


def side(pos, taps, projected) -> np.ndarray:
    return np.full((1, H), 1.0 if pos % 4 == 0 else -1.0, np.float32)  # a change on positions divisible by 4


def device(window, in_flight=1) -> DeviceHost:
    return DeviceHost(DeviceProtocol(hello(window), in_flight), gate, side)


def answer(dp: DeviceProtocol) -> None:
    """The device computes what its protocol asks for."""
    DeviceHost(dp, gate, side).compute()


def drain(host: GatewayHost) -> list[dict]:
    """Run what the gateway asks for, computing every draft at once; what it sends now."""
    host.work()
    while host.busy:
        host.finish()
    return host.send()


def wanted(fresh: GatewayProtocol, resume_hello: dict):
    """A resume hello on a new connection's protocol: the ResumeWanted it yields."""
    fresh.receive(resume_hello)
    action = fresh.next_action()
    assert type(action).__name__ == "ResumeWanted", action
    return action
