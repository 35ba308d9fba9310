#!/usr/bin/env bash
# The test suite: install, then run every test that this machine can run (gpu tests skip without
# CUDA), on two pytest-xdist workers, a test file per worker at a time (the long end-to-end tests
# mostly wait on servers and daemon ticks; ~15 min instead of ~23 on two cores). Extra
# arguments go to pytest (`-n 0` runs in one process).
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The UI test drives Debian's chromium; as root, install it if missing (the test skips without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the UI test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
