"""Asset checks (tunegraph/assets/checks.py): a real run records every check as passed in the
instance; a recipe whose artifacts are bad fails the check and blocks what is downstream (the
tokenized data's check stops training; a diverged training stops the merge; a merge outside the
tolerance stops the eval); the rules themselves on artifacts written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetCheckSeverity, AssetKey
from recipes_support import (
    edit_recipe,
    materialize_with_checks,
    materialized_keys,
    schedule_tick,
    write_tiny_recipe,
)

from tunegraph.assets.checks import (
    logits_match_unmerged,
    loss_finite_and_decreasing,
    no_regression_vs_base,
    usable_tokens,
)
from tunegraph.config import load_recipe
from tunegraph.ops.artifacts import Artifact
from tunegraph.pipelines import embedded_instance

CHECKS = {("tokenized_dataset", "usable_tokens"), ("adapter", "loss_finite_and_decreasing"),
          ("merged_model", "logits_match_unmerged"), ("eval_scores", "no_regression_vs_base")}


def _evaluation(instance, asset: str, check: str):
    record = instance.get_latest_asset_check_evaluation_record(
        AssetCheckKey(AssetKey(["tiny", asset]), check))
    assert record is not None, (asset, check)
    return record, record.event.dagster_event.event_specific_data


def test_a_good_run_passes_every_check_and_bad_artifacts_block_downstream(tmp_path: Path):
    """Within a run, a failed gate skips what follows; across runs, the schedule holds back
    what follows a failed gate until the inputs or the thresholds change."""
    recipe_path = write_tiny_recipe(tmp_path, schedule="0 2 * * *")
    artifacts = tmp_path / "artifacts"
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        def tick():
            return schedule_tick(recipe_path, instance, artifacts)

        result = materialize_with_checks(recipe_path, instance, artifacts)
        assert result.success
        for asset, check in CHECKS:
            record, evaluation = _evaluation(instance, asset, check)
            assert record.status.value == "SUCCEEDED"
            assert evaluation.passed, (asset, check, evaluation.description)
        _, tokens = _evaluation(instance, "tokenized_dataset", "usable_tokens")
        assert 0 < tokens.metadata["trainable_share"].value < 1
        assert "every asset is current" in tick().skip_message

        # A merge tolerance no fp32 merge meets: the (cached) merged model fails its check and
        # the eval does not run. Thresholds are not hashed: no stage recomputes.
        edit_recipe(recipe_path, check_max_merge_logit_diff=1e-12)
        result = materialize_with_checks(recipe_path, instance, artifacts)
        assert not result.success
        assert "tiny/eval_scores" not in materialized_keys(result)  # no run after a failed one
        record, merge = _evaluation(instance, "merged_model", "logits_match_unmerged")
        assert record.status.value == "FAILED" and not merge.passed
        assert "check_max_merge_logit_diff 1e-12" in merge.description
        blocked = tick()
        assert blocked.run_requests == []
        assert "tiny/merged_model:logits_match_unmerged failed" in blocked.skip_message
        # Back to a tolerance the merge meets: the schedule asks for the check again (the merge
        # itself is a cache hit), and once it passed, nothing.
        edit_recipe(recipe_path, check_max_merge_logit_diff=1e-5)
        [request] = tick().run_requests
        assert [k.to_user_string() for k in request.asset_selection] == ["tiny/merged_model"]
        assert "thresholds changed" in request.tags["tunegraph/stale"]
        assert materialize_with_checks(recipe_path, instance, artifacts,
                                       selection=request.asset_selection).success
        assert "every asset is current" in tick().skip_message

        # A diverging run (learning rate 100: NaN weights by step 3) fails the training check;
        # nothing is merged or evaluated, in this run or by the schedule later.
        edit_recipe(recipe_path, learning_rate=100.0)
        result = materialize_with_checks(recipe_path, instance, artifacts)
        assert not result.success
        assert materialized_keys(result) & {"tiny/merged_model", "tiny/eval_scores"} == set()
        assert "tiny/adapter" in materialized_keys(result)
        _, training = _evaluation(instance, "adapter", "loss_finite_and_decreasing")
        assert not training.passed and "non-finite" in training.description
        blocked = tick()
        assert blocked.run_requests == []
        assert "tiny/adapter:loss_finite_and_decreasing failed" in blocked.skip_message

        # Tokens: a trainable share no Alpaca prompt reaches stops training altogether.
        edit_recipe(recipe_path, learning_rate=0.01, check_min_trainable_share=0.5)
        result = materialize_with_checks(recipe_path, instance, artifacts)
        assert not result.success
        assert "tiny/adapter" not in materialized_keys(result)
        _, tokens = _evaluation(instance, "tokenized_dataset", "usable_tokens")
        assert not tokens.passed
        assert "check_min_trainable_share 0.5" in tokens.description
        assert "usable_tokens failed" in tick().skip_message


def _artifact(tmp_path: Path, kind: str, **files: dict) -> Artifact:
    folder = tmp_path / kind
    folder.mkdir()
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return Artifact(kind, "k", folder)


@pytest.fixture
def recipe(tmp_path: Path):
    return load_recipe(write_tiny_recipe(tmp_path))


def test_tokenized_rules(recipe, tmp_path: Path):
    stats = {"num_rows": 90, "num_train_rows": 80, "num_trainable_tokens": 500,
             "num_truncated": 12, "num_dropped_no_trainable": 10, "trainable_share": 0.2}
    result = usable_tokens(recipe, _artifact(tmp_path, "a", stats=stats))
    assert not result.passed and "12.0% of rows truncated at sequence_len 64" in result.description
    assert result.metadata["truncated_share"].value == pytest.approx(0.12)
    recipe.check_max_truncated_share = 0.15
    assert usable_tokens(recipe, _artifact(tmp_path, "b", stats=stats)).passed
    empty = {**stats, "num_train_rows": 0, "num_trainable_tokens": 0, "trainable_share": 0.0}
    result = usable_tokens(recipe, _artifact(tmp_path, "c", stats=empty))
    assert "no training row" in result.description and "trainable share 0.0000" in result.description


def test_training_rules(recipe, tmp_path: Path):
    def check(losses, **keys):
        for key, value in keys.items():
            setattr(recipe, key, value)
        metrics = {"losses": [[i + 1, loss] for i, loss in enumerate(losses)]}
        return loss_finite_and_decreasing(recipe, _artifact(tmp_path, f"t{len(list(tmp_path.iterdir()))}",
                                                            metrics=metrics))

    assert check([3.0, 2.5, 2.8, 2.0]).passed
    # 20 steps: windows of 2. A last step above the first passes when the windows went down.
    assert check([5.0, 4.0] + [3.0] * 16 + [2.0, 4.5]).passed
    assert "did not go down" in check([2.0, 2.1, 2.2]).description
    assert "non-finite loss or gradient norm at step(s) 2" in check([2.0, float("nan"), 1.0]).description
    assert "one logged loss" in check([2.0]).description
    assert check([2.0], check_loss_decrease=False).passed
    assert not check([2.0, float("inf")], check_loss_decrease=False).passed


def test_merge_and_eval_rules(recipe, tmp_path: Path):
    assert logits_match_unmerged(recipe, _artifact(tmp_path, "m1", checks={
        "max_logit_diff_vs_unmerged": 3e-6})).passed
    assert not logits_match_unmerged(recipe, _artifact(tmp_path, "m2", checks={
        "max_logit_diff_vs_unmerged": 2e-5})).passed

    better = {"base": {"heldout_loss": 3.0, "exact_match": 0.0},
              "trained": {"heldout_loss": 1.0, "exact_match": 0.5}}
    assert no_regression_vs_base(recipe, _artifact(tmp_path, "e1", scores=better)).passed
    worse = {"base": {"heldout_loss": 3.0, "exact_match": 0.5},
             "trained": {"heldout_loss": 3.2, "exact_match": 0.25}}
    result = no_regression_vs_base(recipe, _artifact(tmp_path, "e2", scores=worse))
    assert not result.passed and result.severity == AssetCheckSeverity.WARN
    assert "held-out loss 3.2000 > base 3.0000" in result.description
    assert "exact-match 0.2500 < base 0.5000" in result.description
    recipe.check_max_heldout_loss_increase = 0.5
    result = no_regression_vs_base(recipe, _artifact(tmp_path, "e3", scores=worse))
    assert "held-out loss" not in result.description


def test_eval_check_is_a_warning_and_the_gates_block(recipe):
    from tunegraph.assets import recipe_assets, recipe_checks

    specs = {spec.key.name: spec for check in recipe_checks(recipe, recipe_assets(recipe))
             for spec in check.check_specs}
    assert {name: spec.blocking for name, spec in specs.items()} == {
        "usable_tokens": True, "loss_finite_and_decreasing": True,
        "logits_match_unmerged": True, "no_regression_vs_base": False}


def test_materialize_command_runs_the_checks_and_stops_at_a_failed_gate(tmp_path: Path,
                                                                        monkeypatch):
    from click.testing import CliRunner

    from tunegraph.cli import main

    monkeypatch.setenv("TUNEGRAPH_HOME", str(tmp_path / ".tunegraph"))
    recipe_path = write_tiny_recipe(tmp_path)
    result = CliRunner().invoke(main, ["materialize", str(recipe_path),
                                       "--check-min-trainable-share", "0.5"])
    assert result.exit_code == 1, result.output
    assert "check tiny/tokenized_dataset:usable_tokens: FAILED (trainable share" in result.output
    assert "tiny/adapter" not in result.output  # training never started
