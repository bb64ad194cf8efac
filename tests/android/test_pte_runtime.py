"""`spa export`'s programs against the ExecuTorch runtime the APK carries (static; runs in CI, never skipped).

The exporter is ExecuTorch 1.5.1; the APK's libexecutorch.so is react-native-executorch 0.9.3's
fork build (between 1.1 and 1.2). android_demo/scripts/pte_runtime_check.py compares what each
exported program needs (flatbuffer identifier, operators, delegate ids, XNNPACK header and
schema identifiers, XNNPACK node types) with what the runtime binary registers. What this does
not show: that the program computes the same numbers there (no phone here; the Python runtimes
of benchmarks/pte_compat.py check that for ExecuTorch 1.1.0 and 1.2.0 when they are installed).
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "android_demo" / "scripts"))
import pte_runtime_check  # noqa: E402

APK = ROOT / "android_demo" / "build" / "apk" / "spa-demo-debug.apk"


@pytest.fixture(scope="module")
def runtime() -> dict:
    """The registry of the APK's arm64 libexecutorch.so (build_apk.sh only reports when nothing changed)."""
    proc = subprocess.run([str(ROOT / "android_demo" / "scripts" / "build_apk.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with zipfile.ZipFile(APK) as z:
        return pte_runtime_check.runtime_registry(z.read("lib/arm64-v8a/libexecutorch.so"))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_the_apks_runtime_registers_everything_the_exported_program_needs(exported, runtime, variant):
    out, manifest = exported
    needs = pte_runtime_check.program_needs((out / manifest["variants"][variant]["file"]).read_bytes())
    assert needs["identifier"] == "ET12"
    assert needs["delegates"] == {"XnnpackBackend"}
    assert {"XNNFullyConnected", "XNNGelu"} <= needs["xnn_nodes"]  # the side network is delegated
    assert pte_runtime_check.missing(runtime, needs) == []


def test_the_check_would_see_what_a_runtime_lacks(exported, runtime):
    out, manifest = exported
    needs = pte_runtime_check.program_needs((out / manifest["variants"]["fp32"]["file"]).read_bytes())
    older = dict(runtime, kernels=runtime["kernels"] - {"aten::mean.out"},
                 xnn_handlers=runtime["xnn_handlers"] - {"Gelu"})
    assert pte_runtime_check.missing(older, needs) == ["operator aten::mean.out", "XNNPACK node XNNGelu"]
    assert pte_runtime_check.missing(runtime, dict(needs, identifier="ET13")) == ["program identifier 'ET13'"]


def test_the_apks_runtime_registers_every_operator_of_the_training_program(exported, runtime):
    """The Teach action's program (export/training_program.py: forward and backward, portable kernels)."""
    out, manifest = exported
    needs = pte_runtime_check.program_needs((out / manifest["training"]["file"]).read_bytes())
    assert needs["identifier"] == "ET12" and needs["delegates"] == set()
    assert {"aten::mm.out", "aten::_log_softmax.out", "aten::gather.out"} <= needs["operators"], needs["operators"]
    assert pte_runtime_check.missing(runtime, needs) == []
