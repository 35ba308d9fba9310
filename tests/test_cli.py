"""The CLI's materializing verbs, on the embedded instance in a temporary TUNEGRAPH_HOME."""

from pathlib import Path

from click.testing import CliRunner
from dagster import AssetKey

from tunegraph.cli import main
from tunegraph.pipelines import embedded_instance

SMALL = ["--max-steps", "4", "--save-steps", "null", "--eval-generation-rows", "4"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_verbs_materialize_their_asset_and_what_it_needs(quickstart_copy: Path, home: Path):
    recipe = str(quickstart_copy)
    result = _run("preprocess", recipe, *SMALL)
    assert result.exit_code == 0, result.output
    assert "quickstart/tokenized_dataset" in result.output
    assert "quickstart/adapter" not in result.output

    # eval_scores alone cannot run before training has registered checkpoints to score.
    result = _run("materialize", recipe, "--select", "eval_scores", *SMALL)
    assert result.exit_code == 1
    assert "no partition of quickstart__checkpoints exists yet" in result.output

    result = _run("evaluate", recipe, *SMALL)
    assert result.exit_code == 0, result.output
    assert "| heldout_loss |" in result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines()
             if line.startswith(("quickstart/", "base_models/"))}
    assert lines["quickstart/tokenized_dataset"] == "True"   # cached by preprocess
    assert lines["quickstart/adapter"] == "False"

    # The runs are in the embedded instance that `tunegraph dev` shows: preprocess; then
    # training, the final checkpoint's eval, and the report.
    with embedded_instance(home) as instance:
        assert len(instance.get_runs()) == 4
    assert (home / "dagster_home" / "dagster.yaml").is_file()
    assert (home / "artifacts" / "evals").is_dir()

    result = _run("materialize", recipe, "--select", "eval_scores", *SMALL)
    assert result.exit_code == 0, result.output


def test_unknown_selection_lists_the_assets(quickstart_copy: Path, home: Path):
    result = _run("materialize", str(quickstart_copy), "--select", "adaptor")
    assert result.exit_code == 1
    assert "no asset quickstart/adaptor in recipe quickstart" in result.output
    assert "quickstart/adapter" in result.output


def test_merge_lora_on_a_full_fine_tune_is_a_clear_error(home: Path, tmp_path: Path):
    recipe = tmp_path / "full.yaml"
    recipe.write_text("base_model: tunegraph:tiny-llama\nlearning_rate: 0.001\n"
                      "datasets:\n  - path: data.jsonl\n    type: completion\n")
    (tmp_path / "data.jsonl").write_text('{"text": "hello world"}\n' * 8)
    result = _run("merge-lora", str(recipe))
    assert result.exit_code == 1
    assert "recipe full is a full fine-tune (adapter is not lora)" in result.output


def test_backfill_evals_scores_every_checkpoint_without_training_again(quickstart_copy: Path,
                                                                       home: Path):
    recipe = str(quickstart_copy)
    small = ["--max-steps", "4", "--save-steps", "2", "--eval-generation-rows", "2"]
    result = _run("backfill-evals", recipe, *small)
    assert result.exit_code == 1
    assert "recipe quickstart has no checkpoints registered on this instance" in result.output

    assert _run("train", recipe, *small).exit_code == 0
    result = _run("backfill-evals", recipe, "--checkpoints", "final", *small)
    assert result.exit_code == 0, result.output
    assert "quickstart/eval_scores[quickstart__final]" in result.output
    assert "quickstart/adapter" not in result.output  # training is not re-run

    result = _run("backfill-evals", recipe, *small)
    assert result.exit_code == 0, result.output
    cached = {line.split()[0]: line.split()[1] for line in result.output.splitlines()
              if line.startswith("quickstart/eval_scores[")}
    assert cached == {"quickstart/eval_scores[quickstart__step-000002]": "False",
                      "quickstart/eval_scores[quickstart__final]": "True"}
    assert "| 2 | quickstart__step-000002 |" in result.output  # the report's table
    assert "| 4 | quickstart__final |" in result.output

    result = _run("backfill-evals", recipe, "--checkpoints", "7", *small)
    assert result.exit_code == 1
    assert "no checkpoint quickstart__step-000007; registered: quickstart__step-000002, " \
           "quickstart__final" in result.output

    result = _run("backfill-evals", recipe, "--submit", *small)
    assert result.exit_code == 0, result.output
    with embedded_instance(home) as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 1
        assert backfills[0].backfill_id in result.output
        assert {k.to_user_string() for k in backfills[0].asset_selection} == {
            "quickstart/eval_scores", "quickstart/eval_report"}
        targeted = backfills[0].asset_backfill_data.target_subset
        assert set(targeted.get_partitions_subset(AssetKey(["quickstart", "eval_scores"]))
                   .get_partition_keys()) == {"quickstart__step-000002", "quickstart__final"}
        # The in-process backfills' runs carry one tag per backfill, for the Runs page filter.
        tagged = {run.tags.get("tunegraph/backfill") for run in instance.get_runs()
                  if run.tags.get("dagster/partition")}
        assert len(tagged) == 2 and None not in tagged
