"""`tunegraph backfill-evals RECIPE --submit` creates a Dagster asset backfill; the real
`dagster-daemon` of `tunegraph dev` executes it: one eval_scores run per checkpoint partition, then
the eval report, each run tagged with the backfill's id.

    .venv/bin/python -m pytest tests/pipelines/test_backfill_daemon.py
"""

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import AssetKey, AssetRecordsFilter, DagsterRun, RunsFilter
from dagster_server import dev_server, stop_sensor, wait_for_backfill
from recipes_support import write_tiny_recipe

from tunegraph.cli import main
from tunegraph.pipelines import embedded_instance
from tunegraph.pipelines.checkpoint_sensor import SENSOR_NAME
from tunegraph.pipelines.instance import GPU_POOL, GPU_POOL_LIMIT_ENV

EVAL_SCORES = AssetKey(["tiny", "eval_scores"])
EVAL_REPORT = AssetKey(["tiny", "eval_report"])


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow  # the daemon ticks every 30 s and each run starts a process
def test_daemon_runs_a_submitted_eval_backfill(tmp_path: Path, monkeypatch):
    # 8 steps, a checkpoint at step 4: partitions tiny__step-000004 and tiny__final. The
    # smallest recipe the tests have: the time goes to the daemon's ticks and run processes.
    recipes = tmp_path / "recipes"
    recipe = str(write_tiny_recipe(recipes, save_steps=4))
    home = tmp_path / ".tunegraph"  # dev_server's instance, which the CLI here uses too
    monkeypatch.setenv("TUNEGRAPH_HOME", str(home))
    monkeypatch.delenv(GPU_POOL_LIMIT_ENV, raising=False)  # it would replace the limit below
    monkeypatch.chdir(tmp_path)
    # Two GPU slots, so the daemon launches both checkpoints' eval runs at once rather than the
    # second when the first's eval step ends (a spawned step imports torch: ~15 s each).
    with dev_server(tmp_path, recipes, ("--gpu-pool-limit", "2")) as port:
        # Off before training, so that the runs that evaluate the checkpoints are the backfill's.
        stop_sensor(port, SENSOR_NAME)
        _cli("train", recipe)
        output = _cli("backfill-evals", recipe, "--submit")
        with embedded_instance(home) as instance:
            [backfill] = instance.get_backfills()
        assert backfill.backfill_id in output
        state = wait_for_backfill(port, backfill.backfill_id)
        assert state["status"] == "COMPLETED_SUCCESS", (state, (tmp_path / "dev.log")
                                                         .read_text()[-3000:])

    with embedded_instance(home) as instance:
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit == 2
        checkpoints = instance.get_dynamic_partitions("tiny__checkpoints")
        assert checkpoints == ["tiny__step-000004", "tiny__final"]
        backfill_runs = {r.run_id: r for r in instance.get_runs(
            RunsFilter(tags=DagsterRun.tags_for_backfill_id(backfill.backfill_id)))}
        assert {r.status.value for r in backfill_runs.values()} == {"SUCCESS"}
        # One run per checkpoint, then the report's run.
        assert sorted(r.tags.get("dagster/partition", "") for r in backfill_runs.values()) == \
            sorted(["", *checkpoints])
        evals = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=EVAL_SCORES), limit=100).records
        scored = {r.partition_key: r.asset_materialization.metadata for r in evals
                  if r.run_id in backfill_runs}
        assert sorted(scored) == sorted(checkpoints)
        for partition, metadata in scored.items():
            assert math.isfinite(metadata["trained/heldout_loss"].value), partition
            assert math.isfinite(metadata["base/heldout_loss"].value), partition
            assert metadata["final"].value == partition.endswith("__final")
        [report] = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=EVAL_REPORT), limit=1).records
        assert report.run_id in backfill_runs
        assert report.asset_materialization.metadata["num_checkpoints_evaluated"].value == 2
