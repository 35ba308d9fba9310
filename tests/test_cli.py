"""The CLI's materializing verbs, on the embedded instance in a temporary TUNEGRAPH_HOME."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from tunegraph.cli import main
from tunegraph.pipelines import embedded_instance

SMALL = ["--max-steps", "4", "--save-steps", "null", "--eval-generation-rows", "4"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEGRAPH_HOME", str(tmp_path / ".tunegraph"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / ".tunegraph"


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_verbs_materialize_their_asset_and_what_it_needs(quickstart_copy: Path, home: Path):
    recipe = str(quickstart_copy)
    result = _run("preprocess", recipe, *SMALL)
    assert result.exit_code == 0, result.output
    assert "quickstart/tokenized_dataset" in result.output
    assert "quickstart/adapter" not in result.output

    # eval_scores alone cannot run before the adapter and merged model exist.
    result = _run("materialize", recipe, "--select", "eval_scores", *SMALL)
    assert result.exit_code == 1
    assert "quickstart/merged_model has not been materialized yet" in result.output

    result = _run("evaluate", recipe, *SMALL)
    assert result.exit_code == 0, result.output
    assert "| heldout_loss |" in result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines()
             if line.startswith(("quickstart/", "base_models/"))}
    assert lines["quickstart/tokenized_dataset"] == "True"   # cached by preprocess
    assert lines["quickstart/adapter"] == "False"

    # The runs are in the embedded instance that `tunegraph dev` shows.
    with embedded_instance(home) as instance:
        assert len(instance.get_runs()) == 3
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
