"""Training under Dagster's RetryPolicy resumes from the failed attempt's last checkpoint, and the
resumed run's per-step losses equal the uninterrupted golden run's (STYLE 9: resumed vs
uninterrupted), on a real Dagster instance with the real Trainer.

The failure is a TrainerCallback that raises once at step 7 (checkpoints every 3 steps): the
retry must start at step 6, not at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, RetryPolicy, materialize
from train_support import GOLDEN_DIR, GOLDEN_RTOL, RUNS, make, quickstart_like_rows
from transformers import TrainerCallback

import tunegraph.ops.train as train_module
from tunegraph.assets import base_model_asset
from tunegraph.assets.tokenized import tokenized_asset
from tunegraph.assets.train import train_asset
from tunegraph.pipelines import resources

FAIL_AT_STEP = 7
SAVE_STEPS = 3


@pytest.fixture(autouse=True)
def _golden_conditions(cpu_one_thread):
    """The golden losses are CPU fp32 on one thread (conftest.cpu_one_thread)."""


class FailOnce(TrainerCallback):
    """Raises at the end of `step` the first time training gets there (a crash mid-run)."""

    def __init__(self, step: int, error: Exception):
        self.step, self.error, self.fired = step, error, False

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 (HF signature)
        if state.global_step == self.step and not self.fired:
            self.fired = True
            raise self.error


def inject(monkeypatch, callback: TrainerCallback) -> None:
    real = train_module.training_callbacks
    monkeypatch.setattr(train_module, "training_callbacks", lambda recipe: [*real(recipe), callback])


def run_training(tmp_path: Path):
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in quickstart_like_rows(48, seed=0)))
    recipe = make(tmp_path, **RUNS["lora_tiny"], save_steps=SAVE_STEPS,
                  output_dir=str(tmp_path / "out"))
    assets = [base_model_asset(recipe), tokenized_asset(recipe),
              train_asset(recipe, retry_policy=RetryPolicy(max_retries=1))]
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        result = materialize(assets, instance=instance, raise_on_error=False,
                             resources=resources(str(tmp_path / "artifacts")))
        partitions = instance.get_dynamic_partitions("t__checkpoints")
    return result, partitions


def step_events(result, event_type: DagsterEventType) -> list:
    return [e for e in result.all_events
            if e.event_type == event_type and e.step_key == "t__adapter"]


def test_retry_resumes_from_the_last_checkpoint_and_matches_the_golden_run(tmp_path, monkeypatch):
    inject(monkeypatch, FailOnce(FAIL_AT_STEP, RuntimeError("node lost at step 7")))
    result, partitions = run_training(tmp_path)
    assert result.success
    assert len(step_events(result, DagsterEventType.STEP_UP_FOR_RETRY)) == 1
    adapter = next(e for e in result.get_asset_materialization_events()
                   if e.asset_key.to_user_string() == "t/adapter")
    metadata = adapter.step_materialization_data.materialization.metadata
    # The retry started at the failed attempt's last checkpoint, not from scratch.
    assert metadata["resumed_from_step"].value == 6
    metrics = json.loads((Path(metadata["path"].value) / "metrics.json").read_text())
    assert [step for step, _ in metrics["losses"]] == list(range(1, 13))
    golden = json.loads((GOLDEN_DIR / "lora_tiny.json").read_text())["losses"]
    resumed = [loss for _, loss in metrics["losses"]]
    assert resumed == pytest.approx(golden, rel=GOLDEN_RTOL, abs=0)
    # The working folder is gone once the artifact is published; the checkpoints moved with it.
    assert not any((tmp_path / "artifacts" / "_work").rglob("checkpoint-*"))
    assert partitions == ["t__step-000003", "t__step-000006", "t__step-000009", "t__final"]


def test_a_recipe_mistake_is_not_retried(tmp_path, monkeypatch):
    inject(monkeypatch, FailOnce(2, ValueError("datasets[0]: row 3 has no 'output'")))
    result, partitions = run_training(tmp_path)
    assert not result.success
    assert step_events(result, DagsterEventType.STEP_UP_FOR_RETRY) == []
    failure = step_events(result, DagsterEventType.STEP_FAILURE)[0]
    assert "row 3 has no 'output'" in failure.step_failure_data.error.message
    assert partitions == []
