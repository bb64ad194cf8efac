"""Any Hugging Face decoder as the backbone (spa/model/backbone.py): one tiny random model per family.

Llama, Qwen2, Qwen3, Mistral, Phi-3 and Gemma-3 (text), made here from
transformers' config classes (hidden 64, 3 layers, grouped-query attention;
Mistral and Gemma-3 with an 8-token sliding window, shorter than the
prompts, so the window really cuts), with SmolLM2's tokenizer. No download.

For each family: the taps and f_t are the model's own states (its hidden
states; a hook on its final norm's input), lm_head(norm(f)) is its logits,
one-token steps follow the full forward (sliding windows included, and after
a rollback), and batched prefill and decode give the solo tokens — on data
whose every choice has margin (asserted first, docs/DESIGN.md's numerics
contract), in float32 and in bfloat16.
"""

import asyncio

import pytest
import torch

from spa.model.backbone import Backbone, BackboneError, decoder_parts, default_backbone_dir, load_backbone
from spa.model.generate import decode_batch, decode_one_token, generate, prefill, prefill_batch, truncate

WINDOW = 8
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
PROMPTS = [  # different lengths: 3 to ~25 tokens, most longer than the window
    "Hello world, this is a longer test sentence to pass the window.",
    "The quick brown fox",
    "A summary of the paper: we propose a side network that runs on the phone.",
    "Why?",
    "Rome was not built in a day, and neither was this runtime.",
    "One two three four five six seven eight nine ten eleven twelve.",
]
STEPS = 8
MARGIN = 1e-3  # top-2 logit gap every compared choice must exceed (float32)
BF16_MARGIN = 0.04  # bfloat16: top-2 gap over the largest |logit| (a bfloat16 step is 2^-8 of a value)


def _config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2)  # larger than the default 0.02: logits with margins to test on
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=WINDOW)
    if family == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise ValueError(family)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_backbone_dir())


def _model(family: str, tokenizer, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family, len(tokenizer))).to(dtype)


_BACKBONES: dict = {}


def tiny(family: str, tokenizer, dtype=torch.float32) -> Backbone:
    key = (family, dtype)
    if key not in _BACKBONES:
        _BACKBONES[key] = Backbone(_model(family, tokenizer, dtype), tokenizer)
    return _BACKBONES[key]


def _ids(backbone):
    return [backbone.encode(p) for p in PROMPTS]


def _solo_greedy(backbone, prompt):
    """Greedy tokens of the solo step functions (the reference's), each choice's top-2 gap, and its logits."""
    gaps, logits_seen = [], []

    def choose(pos, states):
        logits = backbone.logits(states[0, -1])
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        logits_seen.append(logits)
        return [int(torch.argmax(logits))]

    tokens = [t for _, _, chosen in generate(backbone, prompt, choose, STEPS, eos_ids=()) for t in chosen]
    return tokens, gaps, logits_seen


def _batched_greedy(backbone, prompts):
    """The same generations with every prefill and decode step batched across the prompts."""
    caches, states = zip(*prefill_batch(backbone, prompts))
    caches, states = list(caches), torch.stack(states)
    tokens = [[] for _ in prompts]
    for _ in range(STEPS):
        chosen = torch.argmax(backbone.logits(states[:, -1]), dim=-1).tolist()
        for out, token in zip(tokens, chosen):
            out.append(token)
        states = decode_batch(backbone, caches, chosen)
    return tokens, caches


def _with_margin(backbone):
    """Prompts whose every solo choice has margin (asserted before any equality is)."""
    kept = {}
    for prompt in _ids(backbone):
        tokens, gaps, _ = _solo_greedy(backbone, prompt)
        if min(gaps) > MARGIN:
            kept[tuple(prompt)] = tokens
    assert len(kept) >= 3 and len({len(p) for p in kept}) >= 3, f"only {len(kept)} prompts with margin"
    return kept


@pytest.mark.parametrize("family", FAMILIES)
def test_taps_and_f_are_the_models_own_states(family, tokenizer):
    bb = tiny(family, tokenizer)
    ids = torch.tensor([bb.encode(PROMPTS[0])])
    states = bb.forward(ids, bb.new_cache())[0]
    assert states.shape == (ids.shape[1], 4, 64) and states.dtype == torch.float32
    # The model's own forward, with its own hidden states and a hook on its final norm's input.
    norm_input = []
    handle = decoder_parts(bb.model).norm.register_forward_pre_hook(lambda m, args: norm_input.append(args[0]))
    try:
        with torch.no_grad():
            out = bb.model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    for layer in range(3):  # embedding output, then layers 1 and 2
        assert torch.equal(states[:, layer], out.hidden_states[layer][0]), layer
    assert torch.equal(states[:, -1], norm_input[0][0])  # f_t: the final norm's input
    assert torch.equal(bb.norm(states[:, -1]), out.hidden_states[-1][0])  # transformers' last state is normed
    assert torch.equal(bb.logits(states[:, -1]), out.logits[0])  # lm_head(norm(f)) is the model's logits


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_steps_follow_the_full_forward_and_survive_a_rollback(family, tokenizer):
    bb = tiny(family, tokenizer)
    seq = bb.encode(PROMPTS[2])  # longer than the sliding window
    full = bb.forward(torch.tensor([seq]), bb.new_cache())[0]
    cache, first = prefill(bb, seq[:5])
    steps = [first] + [decode_one_token(bb, cache, t) for t in seq[5:]]
    rel = ((torch.stack(steps) - full[4:]).abs().amax(-1) / full[4:].abs().amax(-1)).max().item()
    assert rel < 1e-4, rel  # the same states, up to one-token-step rounding
    # Roll back past the window and decode again: the same states exactly.
    truncate(cache, 7)
    again = [decode_one_token(bb, cache, t) for t in seq[7:]]
    assert all(torch.equal(a, b) for a, b in zip(again, steps[3:]))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prefill_and_decode_give_the_solo_tokens(family, tokenizer):
    bb = tiny(family, tokenizer)
    assert bb.supports_batching
    refs = _with_margin(bb)
    prompts = [list(p) for p in refs]
    tokens, caches = _batched_greedy(bb, prompts)
    assert tokens == list(refs.values())
    assert [c.get_seq_length() for c in caches] == [len(p) + STEPS for p in prompts]
    # The batched states are the solo states up to the rounding of B-row products.
    solo = torch.stack([prefill(bb, p)[1] for p in prompts])
    batched = torch.stack([s for _, s in prefill_batch(bb, prompts)])
    assert ((batched - solo).abs().amax(-1) / solo.abs().amax(-1)).max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_batched_equals_solo(family, tokenizer):
    """In bfloat16 a batched row differs from the solo row by the rounding of a differently shaped
    product (a batched prefill row equals the solo forward of the same row padded to the batch's
    length exactly; unpadded it differs by ~1 % of the state's scale): so the margin is bfloat16's,
    BF16_MARGIN of the logits' scale (about 10 bfloat16 steps), and the batched steps are fed the solo
    tokens (teacher forcing) so that every choice with margin is compared, not only those before a
    first flip."""
    bb = tiny(family, tokenizer, torch.bfloat16)
    assert bb.dtype == torch.bfloat16 and bb.supports_batching
    prompts = _ids(bb)
    solo = [_solo_greedy(bb, p) for p in prompts]  # (tokens, gaps, logits) per prompt
    caches, states = zip(*prefill_batch(bb, prompts))
    caches, states = list(caches), torch.stack(states)
    compared = 0
    for step in range(STEPS):
        batched = torch.argmax(bb.logits(states[:, -1]), dim=-1).tolist()
        for row, (tokens, gaps, logits) in enumerate(solo):
            if gaps[step] > BF16_MARGIN * float(logits[step].abs().max()):  # margin first
                compared += 1
                assert batched[row] == tokens[step], (row, step)
        states = decode_batch(bb, caches, [tokens[step] for tokens, _, _ in solo])  # the solo tokens
    assert compared >= len(prompts) * STEPS // 4, compared  # enough choices had margin to mean something


def test_a_batch_of_one_is_the_solo_function(tokenizer):
    bb = tiny("gemma3", tokenizer)
    prompt = bb.encode(PROMPTS[0])
    (cache, states), = prefill_batch(bb, [prompt])
    ref_cache, ref_states = prefill(bb, prompt)
    assert torch.equal(states, ref_states)
    assert torch.equal(decode_batch(bb, [cache], [42])[0], decode_one_token(bb, ref_cache, 42))


def test_engine_prefills_sessions_that_start_together_in_one_forward(tokenizer):
    from cloud_gateway.engine import Engine

    bb = tiny("qwen3", tokenizer)
    engine = Engine(bb, max_batch=8)
    prompts = _ids(bb)[:4]

    async def start_together():
        return await asyncio.gather(*[engine.prefill(p) for p in prompts])

    try:
        results = asyncio.run(start_together())
        alone = asyncio.run(engine.prefill(prompts[0]))
    finally:
        engine.close()
    assert engine.stats["max_prefill_batch"] == 4, engine.stats
    for prompt, (cache, states) in zip(prompts, results):
        ref_cache, ref_states = prefill(bb, prompt)
        assert cache.get_seq_length() == len(prompt)
        assert ((states - ref_states).abs().amax(-1) / ref_states.abs().amax(-1)).max().item() < 1e-4
    assert torch.equal(alone[1], prefill(bb, prompts[0])[1])  # a lone session: the solo function, exactly


def test_engine_cuts_a_line_only_after_the_drafts_asked_before(tokenizer):
    """A settled token that changed its draft cuts the session's line while its next draft may
    still wait for a round (other sessions fill the batch): the cut must land after that draft,
    or the draft's stale position stays in the cache and every later token is wrong."""
    from cloud_gateway.engine import Engine

    bb = tiny("qwen3", tokenizer)
    engine = Engine(bb, max_batch=2)
    caches = [prefill(bb, p)[0] for p in _ids(bb)[:3]]
    mine, keep = caches[2], caches[2].get_seq_length()

    async def busy_then_cut():
        drafts = [asyncio.ensure_future(engine.draft(c, 1, 0.0, 0, 0)) for c in caches]  # mine: the 2nd round
        await asyncio.sleep(0)
        await engine.run(truncate, mine, keep)  # asked after the draft: runs after it
        return await asyncio.gather(*drafts)

    try:
        asyncio.run(busy_then_cut())
    finally:
        engine.close()
    assert engine.stats["decode_rounds"] == 2, engine.stats  # the draft did wait for a second round
    assert mine.get_seq_length() == keep  # cut after the draft grew it, not before


def test_directories_load_in_either_dtype_with_one_identity(tokenizer, tmp_path):
    _model("gemma3", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fp32 = load_backbone(tmp_path)
    bf16 = load_backbone(tmp_path, dtype="bfloat16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert fp32.identity == bf16.identity  # plugins record it: one checkpoint, one identity
    states = bf16.forward(torch.tensor([bf16.encode(PROMPTS[1])]), bf16.new_cache())
    assert states.dtype == torch.float32 and states.device.type == "cpu"  # what leaves the backbone
    assert bf16.logits(states[0, -1, -1]).dtype == torch.float32


def test_what_is_not_a_decoder_only_causal_lm_gets_a_one_line_error(tokenizer, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=2))
    with pytest.raises(BackboneError, match="encoder-decoder") as err:
        Backbone(t5, tokenizer)
    assert "\n" not in str(err.value)
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(BackboneError, match="encoder-decoder"):
        load_backbone(tmp_path / "t5")
    model = _model("llama", tokenizer)
    del model.model.norm
    with pytest.raises(BackboneError, match="no final norm") as err:
        Backbone(model, tokenizer)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: benchmarks/cuda_check.py covers the GPU "
                                                          "where one exists (this skip is not a pass)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batched_equals_solo(tokenizer, dtype):
    bb = Backbone(_model("gemma3", tokenizer, dtype).to("cuda"), tokenizer)
    refs = _with_margin(bb)
    tokens, _ = _batched_greedy(bb, [list(p) for p in refs])
    assert tokens == list(refs.values())
