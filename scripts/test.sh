#!/usr/bin/env bash
# The test suite: install, then run every test that this machine can run (gpu tests skip without
# CUDA). Extra arguments go to pytest.
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
