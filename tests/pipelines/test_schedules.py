"""A recipe's `schedule:` (tunegraph/pipelines/schedules.py), evaluated against a real instance
after real materializations: with nothing changed a tick launches nothing; after a recipe edit it
requests exactly the stages the edited key reaches; after a one-byte data edit, everything from
the (data-built) base model down; materializing what it requested makes the next tick skip."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterRun, DagsterRunStatus, DefaultScheduleStatus
from recipes_support import (
    edit_recipe,
    materialize_with_checks,
    materialized_keys,
    schedule_tick,
    write_tiny_recipe,
)

from tunegraph.config import load_recipe
from tunegraph.pipelines import build_definitions, embedded_instance


def _keys(request) -> set[str]:
    return {key.to_user_string() for key in request.asset_selection}


def test_schedule_requests_only_stale_assets(tmp_path: Path):
    # save_steps 4 of 8: two checkpoint partitions of eval_scores, tiny__step-000004 and tiny__final.
    recipe_path = write_tiny_recipe(tmp_path, schedule="0 2 * * *", save_steps=4)
    artifacts = tmp_path / "artifacts"
    data = tmp_path / "data" / "rows.jsonl"
    evals = {"tiny__step-000004", "tiny__final"}
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        first = materialize_with_checks(recipe_path, instance, artifacts)
        assert first.success and "tiny/eval_scores" in materialized_keys(first)
        schedule = build_definitions([load_recipe(recipe_path)]).resolve_schedule_def(
            "tiny_schedule")
        assert schedule.cron_schedule == "0 2 * * *"
        assert schedule.execution_timezone == "UTC"
        assert schedule.default_status == DefaultScheduleStatus.RUNNING

        def tick():
            return schedule_tick(recipe_path, instance, artifacts)

        nothing = tick()
        assert nothing.run_requests == [] and "every asset is current" in nothing.skip_message

        # A training key: retrain and re-merge, in one run; tokens and base model stand.
        edit_recipe(recipe_path, learning_rate=0.02)
        [request] = tick().run_requests
        assert _keys(request) == {"tiny/adapter", "tiny/merged_model"}
        assert request.partition_key is None
        assert request.tags["tunegraph/trigger"] == "schedule"
        assert "inputs changed" in request.tags["tunegraph/stale"]
        # While a run that materializes them is in flight (the last tick's, say), ticks wait.
        running = instance.add_run(DagsterRun(
            job_name="__ASSET_JOB", status=DagsterRunStatus.STARTED,
            asset_selection=frozenset(request.asset_selection)))
        waiting = tick()
        assert waiting.run_requests == [] and running.run_id in waiting.skip_message
        instance.delete_run(running.run_id)
        retrain = materialize_with_checks(recipe_path, instance, artifacts,
                                          selection=request.asset_selection)
        # (The train step also logs the checkpoints' partitions.)
        assert retrain.success
        assert materialized_keys(retrain) == _keys(request) | {"tiny/checkpoints"}
        # The retrained checkpoints' evals are stale now, one run per checkpoint (what the
        # checkpoint sensor requests right after training, when it runs).
        requests = tick().run_requests
        assert {r.partition_key for r in requests} == evals
        assert all(_keys(r) == {"tiny/eval_scores"} for r in requests)
        assert materialize_with_checks(recipe_path, instance, artifacts,
                                       selection=requests[0].asset_selection).success
        assert tick().run_requests == []

        # An eval key reaches the scores only.
        edit_recipe(recipe_path, eval_max_new_tokens=3)
        requests = tick().run_requests
        assert {r.partition_key for r in requests} == evals
        assert all(_keys(r) == {"tiny/eval_scores"} for r in requests)

        # One byte of data: the tiny base model's tokenizer is trained on the data, so the
        # base model and every stage after it are stale.
        data.write_bytes(data.read_bytes().replace(b'"cold"', b'"cool"', 1))
        [request] = tick().run_requests
        base = next(k for k in _keys(request) if k.startswith("base_models/tiny_llama_"))
        assert _keys(request) == {base, "tiny/tokenized_dataset", "tiny/adapter",
                                  "tiny/merged_model"}


def test_only_recipes_with_a_schedule_get_one(tmp_path: Path):
    plain = load_recipe(write_tiny_recipe(tmp_path, name="plain"))
    timed = load_recipe(write_tiny_recipe(tmp_path, name="timed", schedule="30 1 * * MON",
                                          schedule_timezone="Europe/Paris"))
    defs = build_definitions([plain, timed])
    assert [s.name for s in defs.schedules] == ["timed_schedule"]
    assert defs.resolve_schedule_def("timed_schedule").execution_timezone == "Europe/Paris"


def test_a_cron_string_dagster_rejects_names_the_recipe_and_key(tmp_path: Path):
    recipe = load_recipe(write_tiny_recipe(tmp_path, schedule="0 25 * * *"))
    with pytest.raises(ValueError, match=r"tiny.yaml: schedule: '0 25 \* \* \*' is not a cron"):
        build_definitions([recipe])
