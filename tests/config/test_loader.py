"""Loading recipes (tunegraph.config.loader) and the CLI around it: YAML and file errors, unknown
and Axolotl-only keys, every problem at once, overrides, and `tunegraph validate|plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunegraph.cli import main
from tunegraph.config import RecipeError, load_recipe, parse_overrides

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"
VALID = """\
base_model: tunegraph:tiny-llama
datasets:
  - path: data.jsonl
    type: alpaca
learning_rate: 0.001
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text))
    return caught.value.problems


def test_a_valid_recipe_loads_with_its_name_and_source(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID, "3-my recipe.yaml"))
    assert recipe.name == "r_3_my_recipe"  # Dagster-safe asset-key prefix
    assert recipe.source_path == (tmp_path / "3-my recipe.yaml").resolve()
    assert recipe.base_dir == tmp_path.resolve()
    assert recipe.off_keys == ()


@pytest.mark.parametrize(("text", "line"), [
    ("base_model: x\nlearning_rate: [0.001\nseed: 1\n", 3),
    ("base_model: x\nlearning_rate: 0.001\n\tdatasets: []\n", 3),
    ("base_model: x\ndatasets:\n  - path: a\n    type: alpaca\n   bad: [\n", 5),
])
def test_bad_yaml_names_the_line(tmp_path, text, line):
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(f"not valid YAML at line {line}, column ")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"),
                                            ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    assert problems(tmp_path, text) == [f"top level must be a mapping of keys, got {kind}"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_file(tmp_path, text):
    assert problems(tmp_path, text) == ["the file is empty"]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as caught:
        load_recipe(missing)
    assert caught.value.problems == [f"file not found: {missing}"]
    assert str(missing) in str(caught.value)


def test_recipe_error_is_a_value_error_listing_each_problem(tmp_path):
    path = write(tmp_path, VALID + "learning_rte: 0.1\n")
    with pytest.raises(ValueError, match=rf"recipe {path} is invalid:\n  - learning_rte: "):
        load_recipe(path)


def test_unknown_key_suggests_the_close_one(tmp_path):
    text = VALID.replace("learning_rate", "learning_rte")
    found = problems(tmp_path, text)
    assert "learning_rte: unknown key (did you mean 'learning_rate'?)" in found
    assert "learning_rate: Field required" in found


def test_unknown_key_with_nothing_close(tmp_path):
    assert problems(tmp_path, VALID + "zzz_qqq: 1\n") == ["zzz_qqq: unknown key"]


def test_unknown_key_inside_datasets(tmp_path):
    text = VALID.replace("    type: alpaca\n", "    type: alpaca\n    feild: text\n")
    assert problems(tmp_path, text) == ["datasets[0].feild: unknown key (did you mean 'field'?)"]


def test_unknown_key_inside_tiny_model(tmp_path):
    text = VALID + "tiny_model:\n  hidden_sise: 64\n"
    assert problems(tmp_path, text) == [
        "tiny_model.hidden_sise: unknown key (did you mean 'hidden_size'?)"]


def test_axolotl_only_key_with_a_value_is_not_supported_yet(tmp_path):
    (problem,) = problems(tmp_path, VALID + "load_in_4bit: true\n")
    assert problem.startswith("load_in_4bit: known to Axolotl but not supported by tunegraph yet")
    (problem,) = problems(tmp_path, VALID + "hub_model_id: me/model\n")
    assert problem == "hub_model_id: known to Axolotl but not supported by tunegraph yet"


def test_axolotl_only_dataset_key_with_a_value_is_not_supported_yet(tmp_path):
    text = VALID.replace("    type: alpaca\n", "    type: alpaca\n    preprocess_shards: 4\n")
    assert problems(tmp_path, text) == [
        "datasets[0].preprocess_shards: known to Axolotl but not supported by tunegraph yet"]


def test_axolotl_only_keys_set_to_off_are_accepted_and_listed(tmp_path):
    text = VALID + ("load_in_4bit: false\nwandb_project:\nlora_model_dir: ''\n"
                    "unfrozen_parameters: []\nmodel_config: {}\n")
    text = text.replace("    type: alpaca\n", "    type: alpaca\n    preprocess_shards:\n")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.off_keys == ("load_in_4bit", "wandb_project", "lora_model_dir",
                               "unfrozen_parameters", "model_config",
                               "datasets[0].preprocess_shards")


def test_every_problem_is_reported_at_once(tmp_path):
    text = """\
base_model: tunegraph:tiny-llama
learning_rte: 0.001
load_in_4bit: true
optimizer: adamw_8bit
micro_batch_size: two
datasets:
  - path: a.jsonl
    type: sharegpt
    pth: x
tiny_model:
  hidden_sise: 64
"""
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text))
    found = caught.value.problems
    assert len(found) == 8, found
    message = str(caught.value)
    for expected in ("learning_rte: unknown key (did you mean 'learning_rate'?)",
                     "load_in_4bit: known to Axolotl but not supported by tunegraph yet",
                     "datasets[0].pth: unknown key (did you mean 'path'?)",
                     "tiny_model.hidden_sise: unknown key (did you mean 'hidden_size'?)",
                     "micro_batch_size: Input should be a valid integer",
                     "learning_rate: Field required",
                     "optimizer: 'adamw_8bit' is an Axolotl value",
                     "'sharegpt' is an Axolotl value"):
        assert expected in message
    assert message.count("\n  - ") == 8


def test_parse_overrides():
    assert parse_overrides(["--learning-rate", "1e-4", "--max-steps=5",
                            "--lora-target-modules", "[q_proj, v_proj]"]) == {
        "learning_rate": 1e-4, "max_steps": 5, "lora_target_modules": ["q_proj", "v_proj"]}
    # Values are YAML: booleans, null, strings stay what they say.
    assert parse_overrides(["--adapter=lora", "--bf16", "false", "--save-steps", "null"]) == {
        "adapter": "lora", "bf16": False, "save_steps": None}


@pytest.mark.parametrize(("args", "message"), [
    (["learning-rate", "1e-4"], "override 'learning-rate' must look like --key value"),
    (["--max-steps"], "override --max-steps has no value"),
    (["--"], "override '--' must look like --key value"),
])
def test_parse_overrides_rejects_malformed_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(args)


def test_overrides_replace_recipe_keys():
    recipe = load_recipe(QUICKSTART, parse_overrides(["--learning-rate", "1e-4",
                                                      "--max-steps=5"]))
    assert (recipe.learning_rate, recipe.max_steps) == (1e-4, 5)


def test_unknown_override_key_suggests_the_close_one():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, parse_overrides(["--learning-rte", "1e-4"]))
    assert caught.value.problems == ["learning_rte: unknown key (did you mean 'learning_rate'?)"]


def test_override_values_are_validated():
    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, parse_overrides(["--micro-batch-size", "0"]))
    assert caught.value.problems == ["micro_batch_size: Input should be greater than or equal to 1"]


def test_cli_validate_with_an_override():
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART), "--learning-rate", "1e-4"])
    assert result.exit_code == 0, result.output
    assert f"ok: {QUICKSTART} is valid (recipe 'quickstart', 8 assets)" in result.output


def test_cli_validate_reports_an_unknown_override_without_a_traceback():
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART), "--learning-rte", "1e-4"])
    assert result.exit_code == 1
    assert "learning_rte: unknown key (did you mean 'learning_rate'?)" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # click's clean exit, not a crash


def test_cli_validate_reports_a_bad_file(tmp_path):
    path = write(tmp_path, "base_model: x\nlearning_rate: [0.001\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"recipe {path} is invalid" in result.output and "not valid YAML at line" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_lists_off_keys(tmp_path):
    path = write(tmp_path, VALID + "load_in_8bit: false\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "Axolotl keys set to off, accepted: load_in_8bit" in result.output


def test_cli_plan_json():
    result = CliRunner().invoke(main, ["plan", str(QUICKSTART), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["recipe"] == "quickstart"
    deps = {asset["key"]: asset["deps"] for asset in plan["assets"]}
    (base,) = [key for key in deps if key.startswith("base_models/")]
    assert deps["quickstart/tokenized_dataset"] == sorted([base, "quickstart/raw_data"])
    assert deps["quickstart/adapter"] == sorted([base, "quickstart/tokenized_dataset"])
    assert "quickstart/merged_model" in deps and "quickstart/eval_scores" in deps


def test_cli_plan_text():
    result = CliRunner().invoke(main, ["plan", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 8  # 7 assets and the raw_data source
    assert any(line.startswith("quickstart/adapter") and " <- base_models/" in line
               for line in lines)


def test_cli_plan_of_a_bad_recipe_fails_cleanly():
    result = CliRunner().invoke(main, ["plan", str(QUICKSTART), "--optimizer", "adamw_8bit"])
    assert result.exit_code == 1
    assert "optimizer: 'adamw_8bit' is an Axolotl value that tunegraph does not support yet" in (
        result.output)
    assert "Traceback" not in result.output
