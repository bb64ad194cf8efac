"""The plugin a benchmark runs when none is given: a quick one, trained and exported once into its workdir.

`spa bench link`, `device`, `bytes` and `load` all take their plugin from
`ensure_plugin`. Training and export run as `spa train` / `spa export`
children (`spa.system.children`), which make the paths given to them absolute, so a
workdir relative to the caller's directory means the same in the child.
"""

import json
from pathlib import Path

from spa.model.backbone import DEFAULT_NAME
from spa.system.children import python_command, run
from spa.errors import SpaError

DEFAULT_SKIP_COST = 0.3


def run_spa(*args) -> None:
    """Run `spa ARGS` as a child with its output captured; SpaError with the output's tail if it fails."""
    proc = run(python_command("cli.main", *args))
    if proc.returncode != 0:
        detail = (proc.stdout or "")[-2000:] + (proc.stderr or "")[-2000:]
        raise SpaError(f"spa {' '.join(map(str, args))} failed ({proc.returncode}) {detail}")


def ensure_plugin(plugin: str | None, workdir: Path, profile: str = "outcome", tap_every: int = 1,
                  skip_cost: float = DEFAULT_SKIP_COST, backbone: str | None = None, log=print) -> Path:
    """The plugin .pte to use: the one given, or a quick one trained and exported with `spa train/export`.

    `backbone`: the backbone the quick plugin is trained on (a name such as
    "gemma3-270m" or a directory; None: the default SmolLM2).

    The quick plugin is trained with skip cost (lambda) `skip_cost`: with the
    training default (0.05) the quick plugin's gate opens on ~95 % of tokens,
    which makes SPA the same as side-on-every-token; 0.3 opens it on ~60 %.
    """
    if plugin:
        path = Path(plugin)
        if not path.is_file():
            raise SpaError(f"{path} does not exist")
        return path
    workdir = Path(workdir)
    suffix = ("" if tap_every == 1 else f"-tap{tap_every}") + f"-lambda{skip_cost:g}"
    if backbone is not None and backbone != DEFAULT_NAME:
        suffix += "-" + Path(backbone).name
    plugin_dir, export_dir = workdir / f"plugin-{profile}-quick{suffix}", workdir / f"export-{profile}-quick{suffix}"
    pte = export_dir / "plugin-fp32.pte"
    if pte.exists() and (export_dir / "plugin-int8.pte").exists() and _current_export(pte):
        return pte
    if not (plugin_dir / "config.json").exists():
        on = "" if backbone is None else f", on {backbone}"
        log(f"training a quick plugin ({profile}, tap every {tap_every}, lambda {skip_cost:g}{on}) into {plugin_dir} "
            f"(spa train --quick)...")
        extra = ["--skip-cost", str(skip_cost)] + ([] if tap_every == 1 else ["--tap-every", str(tap_every)])
        extra += [] if backbone in (None, DEFAULT_NAME) else ["--backbone", backbone]
        run_spa("train", "--quick", "--profile", profile, "--out", plugin_dir, *extra)
    log(f"exporting it to {export_dir} (spa export)...")
    try:
        run_spa("export", plugin_dir, "--out", export_dir, "--no-training")  # a benchmark never learns on the device
    except SpaError:
        # `spa export` exits 1 when a variant misses its parity tolerance; the fp32 program is what
        # the link rows run, so go on if that one is good, and say which variant failed.
        manifest_file = export_dir / "manifest.json"
        if not manifest_file.exists():
            raise
        variants = json.loads(manifest_file.read_text())["variants"]
        if not variants.get("fp32", {}).get("parity", {}).get("ok"):
            raise
        failed = [v for v, info in variants.items() if not info["parity"]["ok"]]
        log(f"  note: spa export reports variant(s) {', '.join(failed)} outside their parity tolerance "
            f"(see {manifest_file}); the fp32 program is within it")
    return pte


def _current_export(pte: Path) -> bool:
    """False for an export made before the `.pte` carried the projection weights: export it again."""
    from spa.model.pte_plugin import PtePlugin

    pte = PtePlugin(pte)
    return pte.supports_projection and pte.supports_push


def plugin_prompts(pte_path: Path, docs: list[str]) -> list[str]:
    """The device's prompt for each document, built with the plugin's template and document budget."""
    from device_runtime.documents import device_prompt, load_document
    from spa.model.plugin import read_config

    config, _ = read_config(pte_path.parent)  # the export directory's config.json (same as the .pte's)
    return [device_prompt(config, load_document(doc, config.max_doc_tokens)) for doc in docs]
