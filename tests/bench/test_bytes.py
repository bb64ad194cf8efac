"""`spa bench bytes`: each way to fewer bytes gets its size and its effect on tokens (harness checks, no timings)."""

from benchmarks.bytesbench import format_bytes, run_bytes_bench, trajectory
from spa.protocol import codec
from spa.protocol.frames import FrameCodec
from spa.model.pte_plugin import PtePlugin
from spa.model.reference import reference_generate
from spa.model.token_bytes import token_pieces
from benchmarks.provision import plugin_prompts


def test_bytes_bench_rows_sizes_and_agreement(backbone, pte_path):
    # tau < 0 opens the gate on every token, so taps and side outputs travel whatever the quick plugin learned.
    result = run_bytes_bench(plugin=str(pte_path), docs=["aclsum:test:0"], max_new_tokens=3, tap_every=(),
                             levels=(1, 19), backbone=backbone, tau=-1.0, log=lambda _: None)
    (entry,) = result["plugins"]
    rows = {(r["codec"], r["outliers"], r["cloud_projection"]): r for r in entry["rows"]}
    assert set(rows) == {("f32", 0, False), ("int8", 8, False), ("int4", 8, False), ("int8", 0, False),
                         ("int4", 0, False), ("int8", 8, True), ("int4", 8, True)}
    rows = {k if k[2] else k[:2]: r for k, r in rows.items()}
    assert rows[("f32", 0)]["agreement_with_f32"] == 1.0
    for r in rows.values():
        assert 0 <= r["agreement_with_f32"] <= 1 and r["tokens"] > 0
        assert set(r["sizes"]) == {"1", "19"}
    level = "1"
    assert rows[("f32", 0)]["sizes"][level]["down_per_token"] > rows[("int8", 8)]["sizes"][level]["down_per_token"]
    assert rows[("int8", 8)]["side_usage"] == 1.0
    taps_per_token = {k: rows[k]["sizes"][level]["down_by_type_per_token"]["taps"]
                      for k in [("int8", 8), ("int8", 8, True)]}
    assert taps_per_token[("int8", 8, True)] * 5 < taps_per_token[("int8", 8)]  # r = 32 values per tap, not H = 576
    assert rows[("int8", 8, True)]["upload_bytes"] > 500_000  # 31 taps x 32 x 576 float16, once per session
    text = format_bytes(result)
    assert "int4" in text and "int8+proj" in text and "upload" in text


def test_trajectory_tokens_are_the_reference_tokens_and_its_messages_are_the_wire_messages(backbone, pte_path):
    pte = PtePlugin(pte_path)
    prompt = plugin_prompts(pte_path, ["aclsum:test:1"])[0]
    pieces = token_pieces(backbone.tokenizer)
    run = trajectory(backbone, pte, prompt, tau=pte.tau, max_new_tokens=5, scheme="int8", outliers=8, pieces=pieces)
    ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=5)
    assert run["tokens"] == ref.tokens and run["sigmas"] == ref.sigmas
    frames = FrameCodec()
    for msg in run["down"] + run["up"]:
        assert frames.unpack(frames.pack(msg))["type"] == msg["type"]
    steps = [msg for msg in run["down"] if msg["type"] == "step"]
    assert len(steps) == len(run["tokens"]) and all(codec.decode(s["f"]).shape == (1, 576) for s in steps)
    assert sum(msg["type"] == "taps" for msg in run["down"]) == sum(run["sigmas"])


def test_projected_trajectory_is_the_projected_reference(backbone, pte_path):
    pte = PtePlugin(pte_path)
    prompt = plugin_prompts(pte_path, ["aclsum:test:1"])[0]
    weights = pte.projection_weights()
    run = trajectory(backbone, pte, prompt, tau=-1.0, max_new_tokens=4, scheme="int8", outliers=8,
                     pieces=token_pieces(backbone.tokenizer), projection=weights)
    ref = reference_generate(backbone, pte, prompt, tau=-1.0, max_new_tokens=4, projection=weights)
    assert run["tokens"] == ref.tokens and sum(run["sigmas"]) == 4
    taps = [codec.decode(msg["taps"]) for msg in run["down"] if msg["type"] == "taps"]
    assert all(t.shape == (len(pte.config.taps), pte.config.rank) for t in taps)
