"""Run an exported plugin (`.pte`) with the ExecuTorch runtime.

Used by everything that executes a plugin on the device side: the device
runtime, export verification, the in-process reference and the benchmarks.
Eager torch never stands in for the device.
"""

import json
from pathlib import Path

import numpy as np
import torch

from spa.errors import PluginError
from spa.model.plugin import PluginConfig
from spa.system.quiet import quiet_native_stderr

REQUIRED_METHODS = ("gate", "side", "plugin_hash", "plugin_config")


def executorch_runtime():
    """The ExecuTorch runtime (imported and initialized quietly)."""
    with quiet_native_stderr():
        from executorch.runtime import Runtime

        return Runtime.get()


def set_threads(n: int | None) -> None:
    """Size the ExecuTorch threadpool of this process (None or 0: leave it as it is)."""
    if not n:
        return
    try:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(n)
    except (ImportError, AttributeError):
        pass


class PtePlugin:
    """A loaded `.pte` plugin: `gate(f) -> p`, `side(taps) -> s`, plus its config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PluginError(f"{self.path} does not exist")
        runtime = executorch_runtime()
        try:
            with quiet_native_stderr():
                self._program = runtime.load_program(self.path)
        except Exception as exc:  # the runtime raises RuntimeError/ValueError variants
            raise PluginError(f"{self.path} is not a valid ExecuTorch program: {exc}") from exc
        missing = [m for m in REQUIRED_METHODS if m not in self._program.method_names]
        if missing:
            raise PluginError(f"{self.path} is not an SPA plugin (missing methods: {', '.join(missing)})")
        self.content_hash = "".join(chr(c) for c in self._call("plugin_hash", [])[0].tolist())
        data = json.loads(bytes(self._call("plugin_config", [])[0].tolist()).decode())
        self.config = PluginConfig.from_dict(data)
        with quiet_native_stderr():  # XNNPACK initializes (and talks) on first use
            self._gate = self._program.load_method("gate")
            self._side = self._program.load_method("side")
            # exports before the cloud-side projection option lack this method
            self._side_projected = (self._program.load_method("side_projected")
                                    if "side_projected" in self._program.method_names else None)
            self.gate(np.zeros(self.config.gate_width, np.float32))

    def _call(self, method: str, inputs: list):
        return self._program.load_method(method).execute(inputs)

    @property
    def tau(self) -> float:
        return self.config.tau

    def gate(self, row) -> float:
        """p_t for one position's gate row: its final state f [H], then the backbone's
        logit margin for a margin gate (`config.gate_width` values; spa.model.spa_rule.gate_input)."""
        x = torch.as_tensor(np.asarray(row, dtype=np.float32)).reshape(1, -1)
        if x.shape[1] != self.config.gate_width:
            raise PluginError(f"{self.path}: the gate reads {self.config.gate_width} values "
                              f"({self.config.gate_input}), got {x.shape[1]}")
        return float(self._gate.execute([x])[0][0, 0])

    def side(self, taps) -> np.ndarray:
        """s_t [H] for one position's taps [len(taps), H]."""
        x = torch.as_tensor(np.asarray(taps, dtype=np.float32)).unsqueeze(0)
        return self._side.execute([x])[0][0].numpy()

    @property
    def supports_projection(self) -> bool:
        return self._side_projected is not None and "projection_weight" in self._program.method_names

    def projection_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight float16 [len(taps), r, H], bias float32 [len(taps), r]): what the
        device uploads for the cloud-side projection (spa/model/projection.py)."""
        if not self.supports_projection:
            raise PluginError(f"{self.path} predates the cloud-side projection option; export it again")
        weight = self._call("projection_weight", [])[0].numpy()
        bias = self._call("projection_bias", [])[0].numpy()
        return weight.astype(np.float16, copy=False), bias.astype(np.float32, copy=False)

    @property
    def supports_push(self) -> bool:
        return "gate_weight" in self._program.method_names

    def gate_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(M_c weight float32 [2, gate_width], bias float32 [2]): what the device uploads so that
        the gateway can push taps (spa/model/cloud_gate.py)."""
        if not self.supports_push:
            raise PluginError(f"{self.path} predates pushed taps; export it again")
        return (self._call("gate_weight", [])[0].numpy().astype(np.float32, copy=False),
                self._call("gate_bias", [])[0].numpy().astype(np.float32, copy=False))

    def side_projected(self, projected) -> np.ndarray:
        """s_t [H] from the cloud's per-tap projections [len(taps), r]."""
        if self._side_projected is None:
            raise PluginError(f"{self.path} predates the cloud-side projection option; export it again")
        x = torch.as_tensor(np.asarray(projected, dtype=np.float32)).unsqueeze(0)
        return self._side_projected.execute([x])[0][0].numpy()
