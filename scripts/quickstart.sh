#!/usr/bin/env bash
# The main job: install, then materialize examples/quickstart.yaml through Dagster on the embedded
# defaults (SQLite instance in .tunegraph/dagster_home, artifacts in .tunegraph/artifacts).
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tunegraph materialize examples/quickstart.yaml "$@"
echo
echo "Done. See the assets and their lineage in the Dagster UI:  .venv/bin/tunegraph dev"
