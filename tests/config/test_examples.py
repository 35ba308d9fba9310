"""Every shipped recipe under examples/ loads and plans, with the assets and lineage its kind of
run should have (LoRA: adapter → merged_model → eval_scores; full fine-tune: model → eval_scores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunegraph.cli import plan_of
from tunegraph.config import TINY_LLAMA, load_recipe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*.yml"))


def expected_deps(name: str, base: str, is_lora: bool) -> dict[str, list[str]]:
    """The graph of one recipe: eval_scores is partitioned by the checkpoints the training run
    registers, and scores base vs each checkpoint; eval_report reads every partition."""
    tokenized = f"{name}/tokenized_dataset"
    trained = f"{name}/adapter" if is_lora else f"{name}/model"
    checkpoints = f"{name}/checkpoints"
    scores = f"{name}/eval_scores"
    deps = {base: [], tokenized: [base], trained: sorted([base, tokenized]),
            checkpoints: [trained], scores: sorted([base, trained, checkpoints, tokenized]),
            f"{name}/eval_report": sorted([trained, scores])}
    if is_lora:
        deps[f"{name}/merged_model"] = sorted([base, trained, tokenized])
    return deps


def with_raw_data(deps: dict[str, list[str]], recipe, base: str) -> dict[str, list[str]]:
    """`<recipe>/raw_data`, an observable source, feeds the tokenized dataset, and the base model
    where it is built locally (its tokenizer learns from the data)."""
    raw = f"{recipe.name}/raw_data"
    tokenized = f"{recipe.name}/tokenized_dataset"
    deps = {**deps, raw: [], tokenized: sorted([*deps[tokenized], raw])}
    if recipe.base_model == TINY_LLAMA:
        deps[base] = [raw]
    return deps


def test_examples_exist():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "chat.yaml", "completion.yaml",
                                         "llama-3.2-1b-lora.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_loads_and_plans(path: Path):
    recipe = load_recipe(path)
    assert recipe.off_keys == ()  # shipped recipes set no Axolotl key we ignore
    plan = plan_of(recipe)
    deps = {asset["key"]: asset["deps"] for asset in plan["assets"]}
    (base,) = [key for key in deps if key.startswith("base_models/")]
    assert deps == with_raw_data(expected_deps(recipe.name, base, recipe.is_lora), recipe, base)
    pools = {asset["key"]: asset["pool"] for asset in plan["assets"]}
    assert pools[f"{recipe.name}/tokenized_dataset"] is None  # CPU work stays off the GPU pool
    # Relative data paths are found next to the recipe.
    for dataset in recipe.datasets:
        assert (recipe.base_dir / dataset.path).is_file(), dataset.path


def test_quickstart_plan():
    recipe = load_recipe(EXAMPLES / "quickstart.yaml")
    plan = plan_of(recipe)
    keys = [asset["key"] for asset in plan["assets"]]
    assert keys[0].startswith("base_models/tiny_llama_")
    assert keys[-1] == "quickstart/raw_data"  # the observable source, listed last
    assert keys[1:-1] == ["quickstart/tokenized_dataset", "quickstart/adapter",
                          "quickstart/checkpoints", "quickstart/merged_model",
                          "quickstart/eval_scores", "quickstart/eval_report"]
    assert plan["recipe"] == "quickstart" and plan["axolotl_keys_off"] == []
    assert recipe.is_lora and recipe.tiny_model is not None and recipe.tiny_model.hidden_size == 128


def test_hub_example_names_a_shared_base_model_asset():
    plan = plan_of(load_recipe(EXAMPLES / "llama-3.2-1b-lora.yaml"))
    assert plan["assets"][0]["key"] == "base_models/nousresearch__llama_3_2_1b"
