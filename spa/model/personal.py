"""The plugin a device learned, kept atomically, and run for generation without torch's help.

A **personal plugin store** is a directory on the device:

    plugin-train.pte, plugin-train.json   the training program (copied once from the export)
    CURRENT                                names the current version: "v000003"
    v000003/plugin-train.ptd               its weights (the program's weights file)
            plugin-train.ptd.sha256        their digest (a damaged file is refused)
            plugin.safetensors, config.json the same plugin as a plugin directory (tau, the
                                           learning's record, its content hash): `load_plugin` reads it

Writing a version (`PersonalStore.write`) fills a fresh temporary directory, syncs it,
renames it to the next version name, then replaces CURRENT by an atomic rename: a crash at
any moment leaves CURRENT naming a complete version, the previous plugin. Stale
directories are removed on the next write.

`PersonalPlugin` runs a version for generation with the program's `gate`, `side` and
`side_projected` methods, which read the version's weights file: the interface of
`PtePlugin` (spa/model/pte_plugin.py), so `spa summarize`, the in-process reference and the
benchmarks take either. (The inference `.pte` files of `spa export` are XNNPACK programs with
their weights compiled in; a device cannot rewrite them without the exporter. The training
program's methods are portable kernels: slower per call than XNNPACK's.)
"""

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from spa.errors import PluginError
from spa.model.plugin import CONFIG_FILE, WEIGHTS_FILE, PluginConfig, content_hash_of
from spa.model.projection import projection_weights
from spa.model.train_program import TRAIN_JSON, TRAIN_PTD, TRAIN_PTE, ProgramInfo, load_module, patched_weights, \
    read_weights
from spa.system.quiet import quiet_native_stderr

CURRENT = "CURRENT"
DIGEST = TRAIN_PTD + ".sha256"


def is_store(path) -> bool:
    return (Path(path) / CURRENT).is_file()


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and sync: on disk before the rename that publishes it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class PersonalStore:
    """A personal plugin store (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_store(self.root):
            raise PluginError(f"{self.root} is not a personal plugin store (no {CURRENT}); "
                              f"spa personalize makes one from an export")
        self.info = ProgramInfo.read(self.root / TRAIN_JSON)

    @classmethod
    def create(cls, export_dir: str | Path, root: str | Path) -> "PersonalStore":
        """A store whose first version is the exported plugin (`spa export` wrote the training program)."""
        export_dir, root = Path(export_dir), Path(root)
        missing = [n for n in (TRAIN_PTE, TRAIN_PTD, TRAIN_JSON, CONFIG_FILE, WEIGHTS_FILE)
                   if not (export_dir / n).is_file()]
        if missing:
            raise PluginError(f"{export_dir} has no {', '.join(missing)}: export the plugin again with this version's "
                              f"`spa export` (it writes the training program a device learns with)")
        if root.exists() and any(root.iterdir()):
            raise PluginError(f"{root} exists and is not a personal plugin store; choose another --out")
        root.mkdir(parents=True, exist_ok=True)
        for name in (TRAIN_PTE, TRAIN_JSON):
            shutil.copyfile(export_dir / name, root / name)
        store = object.__new__(cls)
        store.root, store.info = root, ProgramInfo.read(root / TRAIN_JSON)
        config = json.loads((export_dir / CONFIG_FILE).read_text())
        ptd = (export_dir / TRAIN_PTD).read_bytes()
        store._commit(ptd, config, (export_dir / WEIGHTS_FILE).read_bytes())
        return store

    @property
    def pte(self) -> Path:
        return self.root / TRAIN_PTE

    @property
    def current(self) -> Path:
        name = (self.root / CURRENT).read_text().strip()
        path = self.root / name
        if not name.startswith("v") or not path.is_dir():
            raise PluginError(f"{self.root}/{CURRENT} names {name!r}, which is not a version of this store")
        return path

    def config(self) -> dict:
        return json.loads((self.current / CONFIG_FILE).read_text())

    def weights_bytes(self) -> bytes:
        """The current version's weights file, checked against the digest its config records."""
        version = self.current
        data = (version / TRAIN_PTD).read_bytes()
        want = (version / DIGEST).read_text().strip() if (version / DIGEST).exists() else None
        if hashlib.sha256(data).hexdigest() != want:
            raise PluginError(f"{version / TRAIN_PTD} is corrupt (its digest is not the one its config records)")
        return data

    def weights(self) -> dict[str, np.ndarray]:
        return read_weights(self.weights_bytes(), self.info)

    def write(self, weights: dict[str, np.ndarray], tau: float, record: dict) -> Path:
        """A new current version: these weights over the current ones, this tau, the learning's record
        appended to the config's `training.personalized`. Returns the version's directory."""
        ptd = patched_weights(self.weights_bytes(), self.info, weights)
        config = self.config()
        config["tau"] = float(tau)
        config.setdefault("training", {}).setdefault("personalized", []).append(record)
        return self._commit(ptd, config)

    # -- one atomic commit ------------------------------------------------------------------------

    def _commit(self, ptd: bytes, config: dict, safetensors: bytes | None = None) -> Path:
        from safetensors.numpy import save

        state = read_weights(ptd, self.info)
        config = {k: v for k, v in config.items() if k != "content_hash"}
        PluginConfig.from_dict(config)  # a config the plugin loader accepts
        config["content_hash"] = content_hash_of(config, {k: torch.from_numpy(v) for k, v in state.items()})
        tmp = self.root / f".tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        write_file(tmp / TRAIN_PTD, ptd)
        write_file(tmp / DIGEST, (hashlib.sha256(ptd).hexdigest() + "\n").encode())
        write_file(tmp / WEIGHTS_FILE, safetensors if safetensors is not None else save(state))
        write_file(tmp / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        _sync(tmp)
        versions = sorted(p.name for p in self.root.glob("v[0-9]*"))
        name = f"v{int(versions[-1][1:]) + 1 if versions else 0:06d}"
        os.rename(tmp, self.root / name)
        _sync(self.root)
        pointer = self.root / f"{CURRENT}.tmp"
        write_file(pointer, (name + "\n").encode())
        previous = (self.root / CURRENT).read_text().strip() if (self.root / CURRENT).exists() else None
        os.replace(pointer, self.root / CURRENT)  # the one atomic step: from here on, the new plugin
        _sync(self.root)
        self._clean(keep={name, previous})  # the previous one stays for a reader that opened it
        return self.root / name

    def _clean(self, keep: set[str]) -> None:
        """Remove versions other than `keep` and temporary directories of interrupted writes."""
        for path in self.root.iterdir():
            if path.is_dir() and (path.name.startswith(".tmp-") or path.name.startswith("v")) and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


class PersonalPlugin:
    """The current version of a store, run for generation (the interface of PtePlugin)."""

    def __init__(self, store: str | Path | PersonalStore):
        self.store = store if isinstance(store, PersonalStore) else PersonalStore(store)
        self.path = self.store.root
        data = self.store.config()
        self.content_hash = data["content_hash"]
        self.config = PluginConfig.from_dict(data)
        self._weights = self.store.weights()
        self._module = load_module(self.store.pte, self.store.current / TRAIN_PTD).model
        taps, rank = len(self.config.taps), self.config.rank
        with quiet_native_stderr():  # every method loads its weights now: a later write may remove the file
            self.gate(np.zeros(self.config.gate_width, np.float32))
            self.side(np.zeros((taps, self.config.hidden_size), np.float32))
            self.side_projected(np.zeros((taps, rank), np.float32))

    @property
    def tau(self) -> float:
        return self.config.tau

    def _run(self, method: str, x: np.ndarray) -> np.ndarray:
        return self._module.run_method(method, (torch.from_numpy(np.ascontiguousarray(x, np.float32)),))[0].numpy()

    def gate(self, row) -> float:
        x = np.asarray(row, np.float32).reshape(1, -1)
        if x.shape[1] != self.config.gate_width:
            raise PluginError(f"{self.path}: the gate reads {self.config.gate_width} values, got {x.shape[1]}")
        return float(self._run("gate", x)[0, 0])

    def side(self, taps) -> np.ndarray:
        return self._run("side", np.asarray(taps, np.float32)[None])[0]

    def side_projected(self, projected) -> np.ndarray:
        return self._run("side_projected", np.asarray(projected, np.float32)[None])[0]

    supports_projection = True
    supports_push = True

    def projection_weights(self) -> tuple[np.ndarray, np.ndarray]:
        state = {k: torch.from_numpy(v) for k, v in self._weights.items()}
        return projection_weights(state, len(self.config.taps))

    def gate_weights(self) -> tuple[np.ndarray, np.ndarray]:
        return (self._weights["gate.classifier.weight"].astype(np.float32),
                self._weights["gate.classifier.bias"].astype(np.float32))


def open_plugin(path: str | Path):
    """What `spa summarize --plugin` runs: a personal plugin store, or an exported `.pte`."""
    if is_store(path):
        return PersonalPlugin(path)
    from spa.model.pte_plugin import PtePlugin

    return PtePlugin(path)


__all__ = ["PersonalPlugin", "PersonalStore", "is_store", "open_plugin"]
