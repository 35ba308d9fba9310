"""Build Dagster Definitions from recipes: one asset group per recipe, shared base models.

The recipe folder is `$TUNEGRAPH_RECIPES`, else `./recipes` if it exists, else `./examples`.
An invalid recipe fails the code location with the recipe's error: nothing is silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dagster import AssetsDefinition, Definitions

from tunegraph.assets import base_model_asset, base_model_key, recipe_assets
from tunegraph.config import Recipe, load_recipe
from tunegraph.resources import ArtifactIOManager, ArtifactStoreResource

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


def assets_for(recipes: Iterable[Recipe]) -> list[AssetsDefinition]:
    """Each recipe's assets, plus one base-model asset per distinct base model."""
    assets: list[AssetsDefinition] = []
    base_models: dict = {}
    for recipe in recipes:
        key = base_model_key(recipe)
        if key not in base_models:
            base_models[key] = base_model_asset(recipe)
        assets.extend(recipe_assets(recipe))
    return list(base_models.values()) + assets


def resources(artifacts_root: str = "") -> dict:
    """The artifact store and IO manager; both default to `.tunegraph/artifacts`."""
    return {"artifact_store": ArtifactStoreResource(root=artifacts_root),
            "io_manager": ArtifactIOManager(root=artifacts_root)}


def build_definitions(recipes: Iterable[Recipe]) -> Definitions:
    return Definitions(assets=assets_for(recipes), resources=resources())

