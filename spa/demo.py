"""`spa demo`: the README's first command, end to end on the packaged defaults.

1. train a quick plugin for one reader profile (real SmolLM2, real ACLSum),
2. export it to ExecuTorch `.pte` files and verify them with the runtime.
"""

import sys
from pathlib import Path

from spa.cli import main as spa


def run_demo(profile: str, workdir: Path) -> int:
    plugin_dir, export_dir = workdir / f"plugin-{profile}", workdir / f"export-{profile}"
    steps = [
        ("train a quick plugin", ["train", "--quick", "--profile", profile, "--out", str(plugin_dir)]),
        ("export it to ExecuTorch and verify", ["export", str(plugin_dir), "--out", str(export_dir)]),
    ]
    for i, (what, argv) in enumerate(steps, 1):
        print(f"\n== demo step {i}/{len(steps)}: {what}: spa {' '.join(argv)}", flush=True)
        code = spa(argv)
        if code != 0:
            print(f"demo stopped: step {i} failed", file=sys.stderr)
            return code
    print(f"\ndemo done: plugin in {plugin_dir}, .pte files in {export_dir}")
    return 0
