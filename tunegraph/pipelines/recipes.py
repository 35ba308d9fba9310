"""The recipe folder Dagster loads: where it is, and every recipe in it (no Dagster, no torch).

    discover_recipes(recipes_dir())   # $TUNEGRAPH_RECIPES, else ./recipes, else ./examples

`tunegraph dev` checks the folder with these before it starts `dagster dev`; the definitions
(tunegraph.pipelines.builder) are built from the same list.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunegraph.config import Recipe, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


def recipes_dir() -> Path:
    if env := os.environ.get("TUNEGRAPH_RECIPES"):
        return Path(env)
    return Path("recipes") if Path("recipes").is_dir() else Path("examples")


def discover_recipes(folder: Path) -> list[Recipe]:
    """Every recipe file directly in `folder` (sub-folders hold data, DeepSpeed JSON, ...)."""
    if not folder.is_dir():
        raise ValueError(f"recipe folder {folder} does not exist (set TUNEGRAPH_RECIPES)")
    paths = sorted(p for p in folder.iterdir() if p.suffix in RECIPE_SUFFIXES)
    recipes = [load_recipe(p) for p in paths]
    names: dict[str, Path] = {}
    for recipe, path in zip(recipes, paths, strict=True):
        if recipe.name in names:
            raise ValueError(f"{path} and {names[recipe.name]} give the same recipe name "
                             f"'{recipe.name}': rename one")
        names[recipe.name] = path
    return recipes
