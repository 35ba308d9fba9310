"""Dagster asset factories, one module per asset kind; each asset loads inputs, calls one stage in
`tunegraph.ops.stages` and attaches metadata. `recipe_assets(recipe)` builds a recipe's graph."""

from __future__ import annotations

from dagster import AssetsDefinition

from tunegraph.assets.base_model import base_model_asset
from tunegraph.assets.checkpoints import checkpoints_asset
from tunegraph.assets.checks import recipe_checks
from tunegraph.assets.common import base_model_key, recipe_key, trained_key
from tunegraph.assets.evals import eval_asset
from tunegraph.assets.merged import merged_asset
from tunegraph.assets.report import combined_report_asset, eval_report_asset
from tunegraph.assets.tokenized import tokenized_asset
from tunegraph.assets.train import train_asset
from tunegraph.config import Recipe


def recipe_assets(recipe: Recipe) -> list[AssetsDefinition]:
    """The recipe's own assets (its base model asset is separate: it may be shared)."""
    assets = [tokenized_asset(recipe), train_asset(recipe), checkpoints_asset(recipe)]
    if recipe.is_lora:
        assets.append(merged_asset(recipe))
    if recipe.val_set_size > 0:  # without held-out rows there is nothing to score
        assets += [eval_asset(recipe), eval_report_asset(recipe)]
    return assets


def report_assets(recipes: list[Recipe]) -> list[AssetsDefinition]:
    """`reports/eval_report` over the recipes that have evals (none if no recipe has)."""
    evaluated = [r for r in recipes if r.val_set_size > 0]
    return [combined_report_asset(evaluated)] if evaluated else []


__all__ = ["base_model_asset", "base_model_key", "recipe_assets", "recipe_checks", "recipe_key",
           "report_assets", "trained_key"]
