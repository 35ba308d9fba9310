#!/usr/bin/env bash
# The test suite: install, then run every test that this machine can run (gpu tests skip without
# CUDA). Extra arguments go to pytest (`-n 2` spreads it over two pytest-xdist workers: ~17 min
# instead of ~23 on two cores, but timing-sensitive tests then share the CPU; not the default).
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The UI test drives Debian's chromium; as root, install it if missing (the test skips without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the UI test will be skipped" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
