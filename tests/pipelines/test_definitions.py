"""Definitions from a folder of recipes: one group per recipe, shared base models, loadable by
`dagster` and `dg` as well as by tunegraph itself."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetKey

from tests_support import EXAMPLES, REPO
from tunegraph.config import load_recipe
from tunegraph.pipelines import build_definitions, discover_recipes


def test_examples_folder_builds_one_group_per_recipe():
    recipes = discover_recipes(EXAMPLES)
    defs = build_definitions(recipes)
    graph = defs.resolve_asset_graph()
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert {r.name for r in recipes} | {"base_models", "reports"} == groups
    quickstart = AssetKey(["quickstart", "eval_scores"])
    # Evals score each checkpoint partition; the training artifact holds the checkpoints.
    assert graph.get(quickstart).parent_keys == {
        AssetKey(["quickstart", "adapter"]), AssetKey(["quickstart", "checkpoints"]),
        AssetKey(["quickstart", "tokenized_dataset"]),
        next(k for k in graph.get(AssetKey(["quickstart", "tokenized_dataset"])).parent_keys
             if k.path[0] == "base_models")}
    checkpoints = graph.get(AssetKey(["quickstart", "checkpoints"]))
    assert checkpoints.partitions_def.name == "quickstart__checkpoints"
    assert graph.get(quickstart).partitions_def == checkpoints.partitions_def
    assert not checkpoints.is_materializable  # training materializes it
    report = graph.get(AssetKey(["reports", "eval_report"]))
    assert {AssetKey([r.name, "eval_report"]) for r in recipes if r.val_set_size > 0} == \
        report.parent_keys
    assert "checkpoint_evals" in {sensor.name for sensor in defs.sensors}
    # The raw data, an observable source, feeds the tokenized dataset.
    assert AssetKey(["quickstart", "raw_data"]) in \
        graph.get(AssetKey(["quickstart", "tokenized_dataset"])).parent_keys
    # A full fine-tune has no adapter or merged model.
    assert AssetKey(["chat", "model"]) in graph.get_all_asset_keys()
    assert AssetKey(["chat", "merged_model"]) not in graph.get_all_asset_keys()


def test_recipes_with_the_same_base_model_share_one_asset(tmp_path: Path):
    for name in ("one", "two"):
        shutil.copy(EXAMPLES / "quickstart.yaml", tmp_path / f"{name}.yaml")
    (tmp_path / "data").mkdir()
    shutil.copy(EXAMPLES / "data" / "quickstart.jsonl", tmp_path / "data")
    graph = build_definitions(discover_recipes(tmp_path)).resolve_asset_graph()
    bases = [k for k in graph.get_all_asset_keys() if k.path[0] == "base_models"]
    assert len(bases) == 1
    for name in ("one", "two"):
        assert bases[0] in graph.get(AssetKey([name, "tokenized_dataset"])).parent_keys


def test_an_invalid_recipe_fails_the_folder_with_its_message(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("base_model: x\nlearning_rte: 1\n")
    with pytest.raises(ValueError, match="learning_rte: unknown key"):
        discover_recipes(tmp_path)


def test_recipe_names_must_be_distinct(tmp_path: Path):
    text = (EXAMPLES / "completion.yaml").read_text().replace("data/", str(EXAMPLES / "data") + "/")
    (tmp_path / "a-b.yaml").write_text(text)
    (tmp_path / "a_b.yml").write_text(text)
    with pytest.raises(ValueError, match="same recipe name 'a_b'"):
        discover_recipes(tmp_path)
    assert load_recipe(tmp_path / "a-b.yaml").name == "a_b"


COMMANDS = [
    [sys.executable, "-m", "dagster", "definitions", "validate", "-m",
     "tunegraph.pipelines.definitions"],
    [str(Path(sys.executable).parent / "dg"), "list", "defs", "--json"],
]


@pytest.fixture(scope="module")
def loading(tmp_path_factory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """Both commands, started together: each spends ~20 s of one core importing torch and
    transformers with the definitions, and the machine has two. {command: (process, folder
    holding its stdout and stderr)}."""
    started = {}
    for command in COMMANDS:
        folder = tmp_path_factory.mktemp("load")
        (folder / "dagster_home").mkdir()
        env = dict(os.environ, TUNEGRAPH_RECIPES=str(EXAMPLES),
                   DAGSTER_HOME=str(folder / "dagster_home"))
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            started[" ".join(command)] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                                           stderr=err), folder)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("command", COMMANDS)
def test_dagster_and_dg_load_the_definitions(command, loading):
    process, folder = loading[" ".join(command)]
    returncode = process.wait(timeout=300)
    assert returncode == 0, (folder / "stderr").read_text()[-3000:]
    if "--json" in command:
        keys = {a["asset_key"] for a in json.loads((folder / "stdout").read_text())["assets"]}
        assert {"quickstart/eval_scores", "quickstart/checkpoints", "quickstart/eval_report",
                "reports/eval_report"} <= keys
