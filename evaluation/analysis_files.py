"""What the validation analyses (`evaluation.flips`, `evaluation.generated_labels`) share at their edges:
reading the trained plugins they are pointed at, and writing their table beside its numbers."""

import json
from pathlib import Path

from spa.data.aclsum import check_profile
from spa.errors import PluginError
from spa.model.plugin import load_plugin


class NotAPlugin(Exception):
    """A directory given as a trained plugin is not one; the message names it."""


def plugins_and_backbone(directories: list[Path], backbone_name: str | None) -> tuple[list, object]:
    """The trained torch plugins (eval mode, each with a known reader profile), then the backbone they were
    trained on; a bad directory fails before the backbone loads. Raises NotAPlugin naming the directory that
    is not a plugin, or not one for this backbone."""
    from spa.model.backbone import load_backbone

    plugins = []
    for directory in directories:
        try:
            plugin = load_plugin(directory).eval()
            check_profile(plugin.config.profile)
        except Exception as exc:  # name the directory that is not a plugin
            raise NotAPlugin(f"{directory} is not a trained plugin directory: {exc}") from exc
        plugins.append(plugin)
    backbone = load_backbone(backbone_name)
    for directory, plugin in zip(directories, plugins):
        try:
            plugin.check_backbone(backbone.identity)
        except PluginError as exc:
            raise NotAPlugin(f"{directory}: {exc}; pass its backbone with --backbone") from exc
    return plugins, backbone


def publish(table: str, reports: list[dict], out: Path | None) -> None:
    """Print the markdown table; with `out`, write it there and the unrounded numbers to OUT.json."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(reports, indent=2) + "\n")
