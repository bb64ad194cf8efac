"""The side plugin: side network + gate (docs/DESIGN.md §1.2, paper eqs. 1-2).

    side network g (per token, no attention):
        x_l = rms(h_t^l)                      for every tap l (taps[0] = 0, the embedding)
        z   = W_in x_0
        z   = Down_l(x_l) + Adapter_l(act(z)) for each further tap l
        s_t = scale * W_out act(z)            in R^H
    gate:        p_t = softmax(M_c rms(f_t))[1],  sigma_t = [p_t > tau]
                 or, with gate_input "rms_normalized_f+log_margin" (MARGIN_GATE),
                 p_t = softmax(M_c [rms(f_t); log(1 + m_t)])[1]
    combination: logits_t = lm_head(norm(f_t + sigma_t * s_t))

m_t is the backbone's own top-1 minus top-2 logit at that position (the
gateway computes it from the logits its draft comes from and sends it with
the step: docs/PROTOCOL.md, `options.gate_margin`). The side changes the
greedy token only where it overcomes that margin, which a linear gate on
rms(f_t) alone cannot compute: with the margin the flip-label gate finds 70 %
of the side's token changes at 35 % usage instead of 63 % (approach profile,
validation). The gate's input row is then [f_t, m_t] (`gate_row`), H + 1
values; the `.pte`'s `gate` method takes that row.

The paper's replacement settings (S2: the gate picks f_t or s_t; S3 = LST:
s_t on every token) are plugins with `combination = "replace"`: the state is
s_t instead of f_t + s_t where sigma_t = 1. They exist for the evaluation's
rows only; the split runs additive plugins (docs/DESIGN.md §1.2).

`rms(x) = x / sqrt(mean(x^2) + eps)` without weights. The taps are RMS-
normalized because raw decoder states have a few channels near 2,500 and
single values near 25,000; the gate's input likewise (a default-initialized
gate on raw `f_t` starts saturated). `scale` is fixed at initialization to the
typical RMS of `f_t`, so W_out learns in units of the backbone's own state.

A plugin is saved as a directory: `config.json` + `plugin.safetensors`. The
config records the backbone's identity, and a content hash over config and
weights that `load_plugin` checks, so a corrupt or mismatched plugin is
refused with a one-line error.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from spa.errors import PluginError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "plugin.safetensors"
FORMAT_VERSION = 1
_EPS = 1e-6


@dataclass
class PluginConfig:
    backbone: dict  # BackboneIdentity.to_dict() of the backbone it was trained on
    taps: list[int]  # layers read by the side network; taps[0] == 0 (embedding output)
    rank: int = 32  # side network width r
    side_scale: float = 1.0  # fixed output scale (typical RMS of f_t)
    tau: float = 0.5  # default gate threshold, chosen on the validation split
    gate_input: str = "rms_normalized_f"  # PLAIN_GATE or MARGIN_GATE (see GATE_INPUTS)
    tap_norm: str = "rms"
    activation: str = "gelu"
    profile: str | None = None  # reader profile it was trained for
    prompt_template: str = "{document}\n\n{instruction}"
    instruction: str = ""
    max_doc_tokens: int = 384
    combination: str = "add"  # "add": f + sigma * s (SPA, S1); "replace": s where sigma = 1 (S2, S3)
    training: dict = field(default_factory=dict)  # hyper-parameters and metrics, for the record
    format_version: int = FORMAT_VERSION

    @property
    def hidden_size(self) -> int:
        return self.backbone["hidden_size"]

    @property
    def gate_margin(self) -> bool:
        """Whether the gate reads the backbone's top-2 logit margin beside f_t."""
        return self.gate_input == MARGIN_GATE

    @property
    def gate_width(self) -> int:
        """Values in the gate's input row: f_t [H], then m_t where the gate reads it."""
        return self.hidden_size + self.gate_margin

    def validate(self) -> None:
        layers = self.backbone.get("num_layers", 0)
        if not self.taps or self.taps[0] != 0:
            raise PluginError(f"taps must start with 0 (the embedding), got {self.taps}")
        if sorted(set(self.taps)) != self.taps or self.taps[-1] > layers:
            raise PluginError(f"taps must be increasing layer indices in 0..{layers}, got {self.taps}")
        if self.rank < 1:
            raise PluginError(f"rank must be positive, got {self.rank}")
        if self.activation != "gelu" or self.gate_input not in GATE_INPUTS or self.tap_norm != "rms":
            raise PluginError("unsupported plugin variant (activation/gate_input/tap_norm)")
        if self.combination not in COMBINATIONS:
            raise PluginError(f"combination must be one of {', '.join(COMBINATIONS)}, got {self.combination!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "PluginConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"content_hash"}
        if unknown:
            raise PluginError(f"unknown plugin config fields: {', '.join(sorted(unknown))}")
        try:
            config = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise PluginError(f"plugin config is incomplete: {exc}") from exc
        if config.format_version != FORMAT_VERSION:
            raise PluginError(f"plugin format version {config.format_version} is not supported (expected {FORMAT_VERSION})")
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


COMBINATIONS = ("add", "replace")
PLAIN_GATE = "rms_normalized_f"  # p_t from f_t alone (the paper's gate)
MARGIN_GATE = "rms_normalized_f+log_margin"  # p_t from f_t and the backbone's top-2 logit margin m_t
GATE_INPUTS = (PLAIN_GATE, MARGIN_GATE)


def combine(f: torch.Tensor, s: torch.Tensor, combination: str = "add") -> torch.Tensor:
    """The state lm_head(norm(.)) reads where sigma = 1: f + s (eq. 1), or s alone (replacement)."""
    return f + s if combination == "add" else s


def every_kth_layer(num_layers: int, k: int) -> list[int]:
    """Taps 0, k, 2k, ... and always the last layer (f_t itself)."""
    taps = list(range(0, num_layers + 1, k))
    return taps if taps[-1] == num_layers else taps + [num_layers]


def rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _EPS)


class SideNetwork(nn.Module):
    """Maps the taps of one position [..., len(taps), H] to a side state s_t [..., H]."""

    def __init__(self, config: PluginConfig):
        super().__init__()
        hidden, rank = config.hidden_size, config.rank
        self.w_in = nn.Linear(hidden, rank)
        self.down = nn.ModuleList(nn.Linear(hidden, rank) for _ in config.taps[1:])
        self.adapter = nn.ModuleList(nn.Linear(rank, rank) for _ in config.taps[1:])
        self.w_out = nn.Linear(rank, hidden)
        # Zero output: an untrained plugin adds nothing, and training starts
        # from the backbone's own behaviour.
        nn.init.zeros_(self.w_out.weight)
        nn.init.zeros_(self.w_out.bias)
        self.register_buffer("scale", torch.tensor(float(config.side_scale)))
        self.act = nn.GELU()

    def project(self, taps: torch.Tensor) -> torch.Tensor:
        """Per-tap projections [..., len(taps), r]: W_in rms(h^0), then Down_l rms(h^l).

        This part reads each tap on its own, so it can run in the cloud when
        the user allows it (cloud-side projection): r values per tap cross the
        wire instead of H.
        """
        x = rms(taps)
        rows = [self.w_in(x[..., 0, :])] + [down(x[..., i + 1, :]) for i, down in enumerate(self.down)]
        return torch.stack(rows, dim=-2)

    def mix(self, projected: torch.Tensor) -> torch.Tensor:
        """s_t from the per-tap projections: z = d_0; z = d_l + Adapter_l(act(z)); s = scale W_out act(z)."""
        z = projected[..., 0, :]
        for i, adapter in enumerate(self.adapter):
            z = projected[..., i + 1, :] + adapter(self.act(z))
        return self.scale * self.w_out(self.act(z))

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        return self.mix(self.project(taps))


def gate_row(f: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """The gate's input row: f [..., H], then the margin [...] where the gate reads one."""
    return f if margin is None else torch.cat([f, margin.unsqueeze(-1).to(f.dtype)], dim=-1)


class Gate(nn.Module):
    """p_t = softmax(M_c rms(f_t))[1] (paper eq. 2), returned as [..., 1]; a margin gate
    (MARGIN_GATE) reads rows [f_t, m_t] and uses [rms(f_t); log(1 + m_t)]."""

    def __init__(self, config: PluginConfig):
        super().__init__()
        self.margin = config.gate_margin
        self.classifier = nn.Linear(config.gate_width, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.margin:
            return rms(x)
        # A margin is >= 0 (the wire refuses others), so log1p is finite.
        return torch.cat([rms(x[..., :-1]), torch.log1p(x[..., -1:])], dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)[..., 1:]


class Plugin(nn.Module):
    def __init__(self, config: PluginConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.side = SideNetwork(config)
        self.gate = Gate(config)

    def sigma(self, x: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Hard gate decision as 0./1. floats, [...], for gate rows x (`gate_row`)."""
        threshold = self.config.tau if tau is None else tau
        return (self.gate(x)[..., 0] > threshold).to(x.dtype)

    def combined_state(self, f: torch.Tensor, taps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """f_t + sigma_t * s_t: what the backbone's final norm and lm_head see (eq. 1);
        for a replacement plugin, s_t where sigma_t = 1 and f_t elsewhere."""
        s = self.side(taps)
        if self.config.combination == "add":
            return f + sigma.unsqueeze(-1) * s
        return torch.where(sigma.unsqueeze(-1) > 0, s, f)

    def content_hash(self) -> str:
        return _content_hash(self.config.to_dict(), self.state_dict())

    def check_backbone(self, identity) -> None:
        check_backbone(self.config.backbone, identity)


def check_backbone(recorded: dict, identity) -> None:
    """Refuse to pair a plugin with a backbone it was not trained on."""
    if recorded.get("fingerprint") != identity.fingerprint:
        raise PluginError(
            f"plugin was trained for backbone {recorded.get('name')!r} (fingerprint {recorded.get('fingerprint')}), "
            f"but this backbone is {identity.name!r} (fingerprint {identity.fingerprint})"
        )


# Config fields added after format version 1 with the default that older
# plugins implicitly have: hashed only when set otherwise, so the plugins
# saved before a field existed keep their hash.
_LATER_FIELDS = {"combination": "add"}


def _content_hash(config: dict, state: dict) -> str:
    h = hashlib.sha256()
    hashed = {k: v for k, v in config.items() if k != "content_hash" and _LATER_FIELDS.get(k, object()) != v}
    h.update(json.dumps(hashed, sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def content_hash_of(config: dict, state: dict) -> str:
    """The content hash of a plugin with this config and these weights (tensors by state-dict
    name): what `save_plugin` records and `load_plugin` checks. A device that writes a plugin
    it learned (spa/model/personal.py) records it too."""
    return _content_hash(config, state)


def save_plugin(plugin: Plugin, directory: str | Path) -> str:
    """Write `config.json` and `plugin.safetensors`; returns the content hash."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in plugin.state_dict().items()}
    digest = _content_hash(plugin.config.to_dict(), state)
    save_file(state, directory / WEIGHTS_FILE)
    config = plugin.config.to_dict() | {"content_hash": digest}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return digest


def read_config(directory: str | Path) -> tuple[PluginConfig, str]:
    """Parse a plugin directory's (or export directory's) `config.json`: (config, recorded hash)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise PluginError(f"{directory} is not a plugin directory")
    if not path.exists():
        raise PluginError(f"{directory} has no {CONFIG_FILE}; is it a plugin directory made by `spa train`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PluginError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "content_hash" not in data:
        raise PluginError(f"{path} is not a plugin config (no content_hash)")
    return PluginConfig.from_dict(data), data["content_hash"]


def load_plugin(directory: str | Path, backbone_identity=None) -> Plugin:
    """Load a plugin directory, checking its hash and, if given, the backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, recorded = read_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.exists():
        raise PluginError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PluginError(f"{weights} is corrupt: {exc}") from exc
    plugin = Plugin(config)
    try:
        plugin.load_state_dict(state)
    except RuntimeError as exc:
        raise PluginError(f"{weights} does not match its config: {str(exc).splitlines()[0]}") from exc
    actual = _content_hash(config.to_dict(), state)
    if actual != recorded:
        raise PluginError(f"{directory} is corrupt: content hash {actual} differs from the recorded {recorded}")
    if backbone_identity is not None:
        plugin.check_backbone(backbone_identity)
    return plugin.eval()
