"""Expensive fixtures, built once per test run.

The real SmolLM2 backbone (converted once into the per-user cache), one quick
plugin trained by the real `spa train --quick`, and its `.pte` export by the
real `spa export`. Tests that need them share these.
"""

import json
import subprocess
from pathlib import Path

import pytest

from cloud_gateway.process import GatewayProcess
from spa.system.children import python_command, run

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "outcome"


def run_spa(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    """Run the `spa` command as a user would, from the repository root."""
    proc = run(python_command("cli.main", *args), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"spa {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def backbone():
    from spa.model.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def quick_plugin_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / PROFILE
    run_spa("train", "--quick", "--profile", PROFILE, "--out", out)
    return out


@pytest.fixture(scope="session")
def quick_train_result(tmp_path_factory) -> dict:
    """`spa train --quick --json`, kept separately so tests can read its metrics."""
    out = tmp_path_factory.mktemp("plugin_json") / PROFILE
    proc = run_spa("train", "--quick", "--profile", PROFILE, "--out", out, "--json")
    return json.loads(proc.stdout) | {"dir": out}


@pytest.fixture(scope="session")
def exported(quick_plugin_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(export directory, manifest printed by `spa export --json`)."""
    out = tmp_path_factory.mktemp("export")
    proc = run_spa("export", quick_plugin_dir, "--out", out, "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return out, json.loads(proc.stdout)


GATEWAY_TOKEN = "test-token-7f3a"


@pytest.fixture(scope="session")
def gateway():
    """One gateway for the whole run, auth on (every client must send GATEWAY_TOKEN)."""
    with GatewayProcess("--token", GATEWAY_TOKEN, "--max-sessions", "16", "--verbose") as gw:
        yield gw


@pytest.fixture(scope="session")
def pte_path(exported) -> Path:
    out, manifest = exported
    return out / manifest["variants"]["fp32"]["file"]


@pytest.fixture(scope="session")
def java_ready():
    """Debian's JDK and Java libraries, android.jar and the ExecuTorch classes (idempotent, fast when done)."""
    proc = subprocess.run([str(ROOT / "scripts" / "setup_java.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
