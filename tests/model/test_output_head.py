"""The device's copy of the output head and its proof (spa/model/output_head.py): a proven token is
the backbone's own greedy token, a near-tie is not proven (the fallback), and the file round-trips."""

import numpy as np
import pytest
import torch

from spa.model.output_head import OutputHead, head_of


def _toy(v=6, h=8, softcap=None, offset=0.0, seed=0) -> OutputHead:
    rng = np.random.default_rng(seed)
    return OutputHead(rng.normal(0, 1, (v, h)).astype(np.float32), rng.normal(1, 0.1, h).astype(np.float32), 1e-6,
                      offset, softcap=softcap, pieces=[bytes([65 + i]) for i in range(v)], fingerprint="toy")


def test_a_proven_token_is_the_backbones_greedy_token(backbone):
    head = head_of(backbone)  # checks itself against the backbone's logits
    rng = np.random.default_rng(3)
    proven = 0
    for _ in range(20):
        f = rng.normal(0, 20, backbone.hidden_size).astype(np.float32)
        s = rng.normal(0, 5, backbone.hidden_size).astype(np.float32)
        want = int(torch.argmax(backbone.logits(torch.from_numpy(f), torch.from_numpy(s))))
        c = head.certify(f, s)
        assert c.best == want and (c.token is None or c.token == want)
        proven += c.token is not None
    assert proven >= 15  # near-ties aside, the bound is tight enough to prove


def test_a_near_tie_is_not_proven():
    head = _toy()
    w = head.weight.copy()
    w[1] = w[0] * np.float32(1 + 1e-7)  # two tokens whose logits differ by less than rounding can tell
    tie = OutputHead(w, head.norm_weight, 1e-6, 0.0, pieces=head.pieces)
    x = np.abs(np.random.default_rng(1).normal(0, 1, 8)).astype(np.float32)
    x *= np.sign(w[0] @ np.ones(8)) * np.sign(w[0])  # make tokens 0 and 1 the winners
    c = tie.certify(x, np.zeros(8, np.float32))
    assert c.best in (0, 1) and c.token is None and c.slack <= 0
    clear = head.certify(x, np.zeros(8, np.float32))
    assert clear.token == clear.best and clear.slack > 0


@pytest.mark.parametrize("softcap, offset", [(None, 0.0), (30.0, 1.0)])
def test_the_head_file_round_trips(tmp_path, softcap, offset):
    head = _toy(softcap=softcap, offset=offset)
    path = head.save(tmp_path / "head.safetensors")
    again = OutputHead.load(path)
    assert again.pieces == head.pieces and again.fingerprint == "toy" and again.softcap == softcap
    x = np.random.default_rng(2).normal(0, 3, 8).astype(np.float32)
    assert np.array_equal(again.logits(x), head.logits(x))
    assert again.certify(x, x).token == head.certify(x, x).token
