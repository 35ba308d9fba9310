"""The launcher resource through Dagster: `tunegraph train --launcher torchrun --num-processes 2`
trains on two gloo processes, rank 0 alone reports through dagster-pipes into the asset's run,
the process count is part of the training key, and a failing rank fails the asset with its error.
"""

from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import AssetKey, DagsterEventType, EventRecordsFilter

from tunegraph.cli import main
from tunegraph.config import base_model_slug, load_recipe
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.freshness import probe_stages
from tunegraph.ops.launch import LaunchSpec
from tunegraph.pipelines import embedded_instance
from tunegraph.resources import LauncherResource

TWO = ["--launcher", "torchrun", "--num-processes", "2"]
SMALL = ["--max-steps", "4", "--save-steps", "2", "--micro-batch-size", "2",
         "--eval-generation-rows", "4"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_train_on_two_processes_through_dagster(quickstart_copy: Path, home: Path):
    result = _run("train", str(quickstart_copy), *TWO, *SMALL)
    assert result.exit_code == 0, result.output
    adapter = AssetKey(["quickstart", "adapter"])
    with embedded_instance(home) as instance:
        materialization = instance.get_latest_materialization_event(adapter).asset_materialization
        assert materialization.metadata["world_size"].value == 2
        assert materialization.metadata["num_steps"].value == 4
        run_id = instance.get_latest_materialization_event(adapter).run_id
        logs = [e.user_message for e in instance.all_logs(run_id)]
        # Rank 0's pipes messages, once each: rank 1 does not report.
        assert sum("train: step 4/4 (world size 2)" in m for m in logs) == 1, logs
        assert any("training on 2 processes (torchrun)" in m for m in logs)
        partitions = instance.get_dynamic_partitions("quickstart__checkpoints")
    # The step-4 checkpoint is the final model: one partition, `final`.
    assert sorted(partitions) == ["quickstart__final", "quickstart__step-000002"]

    # The key depends on the process count: one process would train again, two would not.
    recipe = load_recipe(quickstart_copy, {"max_steps": 4, "save_steps": 2, "micro_batch_size": 2,
                                           "eval_generation_rows": 4})
    store = ArtifactStore(home / "artifacts")
    current = {p.stage: p.stored for p in probe_stages(recipe, store, base_model_slug(recipe),
                                                         LaunchSpec("torchrun", 2))}
    assert current["adapter"]
    single = {p.stage: p.stored for p in probe_stages(recipe, store, base_model_slug(recipe))}
    assert single["tokenized_dataset"] and not single["adapter"]


def test_a_failing_rank_fails_the_asset_with_its_error(quickstart_copy: Path, home: Path):
    result = _run("train", str(quickstart_copy), *TWO, *SMALL, "--bf16", "true")
    assert result.exit_code == 1
    assert "FAILED quickstart__adapter" in result.output or "FAILED" in result.output
    assert "failed (ranks 0, 1 failed): ValueError: bf16/fp16" in result.output, result.output
    with embedded_instance(home) as instance:
        failures = instance.get_event_records(EventRecordsFilter(DagsterEventType.STEP_FAILURE))
        # A recipe mistake in a rank is not retried: one failure, no retry events.
        assert len(failures) == 1
        assert not instance.get_event_records(EventRecordsFilter(DagsterEventType.STEP_UP_FOR_RETRY))


def test_launcher_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_NUM_PROCESSES", "2")
    assert LauncherResource().spec() == LaunchSpec("torchrun", 2)  # processes imply a launcher
    monkeypatch.setenv("TUNEGRAPH_LAUNCHER", "accelerate")
    assert LauncherResource().spec() == LaunchSpec("accelerate", 2)
    monkeypatch.setenv("TUNEGRAPH_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"\$TUNEGRAPH_NUM_PROCESSES: expected a whole number"):
        LauncherResource()


def test_bad_launcher_option_is_a_clear_error(quickstart_copy: Path, home: Path):
    result = _run("train", str(quickstart_copy), "--launcher", "python", "--num-processes", "0")
    assert result.exit_code == 2
    assert "--num-processes" in result.output
