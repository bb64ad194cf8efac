"""`spa bench link --device-client java`: the SPA rows with the Android app's Java client as the device.

On loopback, a few tokens: the Java device (android_demo/scripts/bench_worker.sh) reads the
same job files as the Python worker and writes the same results, so its rows sit in the same
table, with ratios to cloud-only and to the ceiling, in link-PROFILE-java.*; its tokens are
the ceiling's (the plugin hosted in the cloud, running the .pte), also where the Java device
settles its side tokens on the output head `spa export` cached. tau 0.5: a threshold with
margin on this document (tests/android/test_java_client_live.py), since the Java client
computes the plugin in pure Java, not in ExecuTorch.
"""

import json
import re
import subprocess

from spa.system.children import python_command
from tests.conftest import ROOT


def test_bench_link_runs_the_spa_rows_with_the_java_client(pte_path, tmp_path, java_ready):
    proc = subprocess.run(python_command("cli.main", "bench", "link", "--profile", "loopback", "--plugin", pte_path,
                                         "--docs", "aclsum:test:0", "--max-new-tokens", "8", "--tau", "0.5",
                                         "--rows", "cloud_only", "cloud_plugin", "spa_inflight_push", "spa_settle",
                                         "--repeats", "1", "--device-client", "java", "--out", tmp_path),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "link-loopback-java.json").read_text())
    assert result["device_client"] == "java"
    assert (tmp_path / "link-loopback-java.txt").is_file() and not (tmp_path / "link-loopback.json").exists()
    rows = result["rows"]
    ceiling = rows["cloud_plugin"]
    # draft-ahead, 4 in flight, pushed taps; and settled on the Java device (+ the projection): two rows
    # keep the suite short
    for name in ("spa_inflight_push", "spa_settle"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["per_doc_tokens"] == ceiling["per_doc_tokens"], name  # lossless with the Java device too
        assert rows[name]["tokens_per_s_vs_cloud_only"] > 0 and rows[name]["tokens_per_s_vs_ceiling"] > 0
    assert re.search(r"SPA rows' device: the Java client", proc.stdout), proc.stdout[-3000:]
    assert rows["spa_settle"]["settled"] > 0, rows["spa_settle"]  # the Java device proved side tokens
