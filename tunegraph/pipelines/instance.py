"""The embedded Dagster instance: SQLite storage under `.tunegraph/dagster_home`.

`ensure_dagster_home()` writes `dagster.yaml` once (never over a user's own) and returns the folder;
`tunegraph dev`, `tunegraph materialize` and the tests all use it, so runs from the CLI show up in
the UI.

GPU steps (train, merge, evaluate) carry `pool="gpu"`. Dagster 1.13 enforces pools per op when
`concurrency.pools.granularity` is `op`: a step claims a slot in the instance's database when it
starts and waits while none is free, in daemon-launched runs and in-process `materialize` (the
CLI) alike; `run` granularity would only hold back queued runs and leave the CLI unlimited. The
limit is 1 (dagster.yaml's `default_limit`) unless the gpu pool has its own, set by
`tunegraph dev --gpu-pool-limit N`, `$TUNEGRAPH_GPU_POOL_LIMIT` or `dagster instance concurrency
set gpu N`. A run that dies holding a slot (a killed process) stays "started" until run monitoring
ends it at the max runtime; then `free_slots_after_run_end_seconds` frees its slots.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterInstance

from tunegraph.resources.artifacts import default_home

GPU_POOL = "gpu"
GPU_POOL_LIMIT_ENV = "TUNEGRAPH_GPU_POOL_LIMIT"

DAGSTER_YAML = """\
# Written by tunegraph for the embedded default instance; edit freely, tunegraph never overwrites it.
telemetry:
  enabled: false
concurrency:
  pools:
    # Steps of a pool without its own limit run this many at a time. tunegraph's GPU steps use
    # the pool `gpu`; give it the GPU count: tunegraph dev --gpu-pool-limit N.
    default_limit: 1
    # Claim slots per step, so in-process runs (tunegraph materialize) respect the limit too.
    granularity: op
run_monitoring:
  enabled: true
  # Start: the run worker imports torch and transformers (30-60 s on a 2-core laptop).
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  # Runs are canceled after a day; a run sets its own limit with the tag dagster/max_runtime
  # (seconds). This is also what ends a run whose process died without reporting.
  max_runtime_seconds: 86400
  poll_interval_seconds: 60
  # Concurrency slots still held by a finished (failed, canceled, ended) run are freed after this.
  free_slots_after_run_end_seconds: 60
"""

# Files earlier tunegraph versions wrote: replaced by the current one when nobody edited them.
PREVIOUS_DAGSTER_YAMLS = ("""\
# Written by tunegraph for the embedded default instance; edit freely, tunegraph never overwrites it.
telemetry:
  enabled: false
""",)


def ensure_dagster_home(home: Path | None = None) -> Path:
    dagster_home = (home or default_home()) / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists() or config.read_text() in PREVIOUS_DAGSTER_YAMLS:
        config.write_text(DAGSTER_YAML)
    return dagster_home


def gpu_pool_limit_from_env() -> int | None:
    text = os.environ.get(GPU_POOL_LIMIT_ENV)
    if text is None or not text.strip():
        return None
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(f"{GPU_POOL_LIMIT_ENV}: '{text}' is not a whole number (the GPU "
                         f"count)") from None
    return check_pool_limit(limit, GPU_POOL_LIMIT_ENV)


def check_pool_limit(limit: int, where: str) -> int:
    if limit < 1:
        raise ValueError(f"{where}: {limit} would let no GPU step run; use at least 1")
    return limit


def set_gpu_pool_limit(instance: DagsterInstance, limit: int, where: str = "gpu pool limit"
                       ) -> None:
    """Give the gpu pool its own limit (what `dagster instance concurrency set gpu N` does);
    `where` names the setting in the error for a limit below 1."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, check_pool_limit(limit, where))


def embedded_instance(home: Path | None = None) -> DagsterInstance:
    """The project's persistent instance, `<home>/dagster_home` (home: `.tunegraph`); with
    $TUNEGRAPH_GPU_POOL_LIMIT set, the gpu pool's limit is set to it."""
    limit = gpu_pool_limit_from_env()
    instance = DagsterInstance.from_config(str(ensure_dagster_home(home)))
    if limit is not None:
        set_gpu_pool_limit(instance, limit, GPU_POOL_LIMIT_ENV)
    return instance
