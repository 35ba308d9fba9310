"""Build Dagster Definitions from recipes: one asset group per recipe, shared base models.

The recipes come from tunegraph.pipelines.recipes (`$TUNEGRAPH_RECIPES`, else `./recipes` if it
exists, else `./examples`). An invalid recipe fails the code location with the recipe's error:
nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import AssetChecksDefinition, AssetsDefinition, Definitions

from tunegraph.assets import (
    base_model_asset,
    base_model_key,
    recipe_assets,
    recipe_checks,
    report_assets,
)
from tunegraph.assets.raw_data import raw_data_asset
from tunegraph.config import Recipe
from tunegraph.resources import ArtifactIOManager, ArtifactStoreResource, LauncherResource


def assets_for(recipes: Iterable[Recipe]) -> list[AssetsDefinition]:
    """Each recipe's assets, plus one base-model asset per distinct base model, plus each
    recipe's `raw_data` observable source (last, so the stages keep their order in plans)."""
    assets: list[AssetsDefinition] = []
    base_models: dict = {}
    sources: list[AssetsDefinition] = []
    for recipe in recipes:
        key = base_model_key(recipe)
        if key not in base_models:
            base_models[key] = base_model_asset(recipe)
        assets.extend(recipe_assets(recipe))
        sources.append(raw_data_asset(recipe))
    return list(base_models.values()) + assets + sources


def resources(artifacts_root: str = "", launcher: LauncherResource | None = None) -> dict:
    """The artifact store and IO manager (both default to `.tunegraph/artifacts`), and the
    training launcher (in-process unless $TUNEGRAPH_LAUNCHER / $TUNEGRAPH_NUM_PROCESSES say)."""
    return {"artifact_store": ArtifactStoreResource(root=artifacts_root),
            "io_manager": ArtifactIOManager(root=artifacts_root),
            "launcher": launcher or LauncherResource()}


def checks_for(recipes: Iterable[Recipe]) -> list[AssetChecksDefinition]:
    """Each recipe's asset checks (tunegraph.assets.checks)."""
    return [check for recipe in recipes for check in recipe_checks(recipe, recipe_assets(recipe))]


def automation_for(recipes: Iterable[Recipe]) -> tuple[list, list]:
    """(schedules, sensors): a schedule per recipe with `schedule:`, a data sensor per recipe
    that reads local files."""
    from tunegraph.pipelines.schedules import recipe_schedule
    from tunegraph.pipelines.sensors import data_sensor

    schedules, sensors = [], []
    for recipe in recipes:
        keys = [base_model_key(recipe), *(k for a in recipe_assets(recipe) for k in a.keys)]
        schedules.append(recipe_schedule(recipe, keys))
        sensors.append(data_sensor(recipe, keys))
    return [s for s in schedules if s], [s for s in sensors if s]


def build_definitions(recipes: Iterable[Recipe]) -> Definitions:
    from tunegraph.pipelines.checkpoint_sensor import checkpoint_eval_sensor

    recipes = list(recipes)
    schedules, sensors = automation_for(recipes)
    # The report across recipes and the new-checkpoint sensor belong to a folder of recipes.
    sensors += [s for s in [checkpoint_eval_sensor(recipes)] if s]
    return Definitions(assets=assets_for(recipes) + report_assets(recipes),
                       asset_checks=checks_for(recipes), schedules=schedules, sensors=sensors,
                       resources=resources())

