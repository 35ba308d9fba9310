"""Recipes: the pydantic schema (Axolotl key names), YAML loading, CLI overrides, key checks.

No Dagster and no torch here: `tunegraph validate RECIPE` runs on this package alone.
"""

from tunegraph.config.loader import (
                                     RecipeError,
                                     load_recipe,
                                     parse_overrides,
                                     recipe_from_mapping,
                                     recipe_name_for,
)
from tunegraph.config.naming import base_model_slug
from tunegraph.config.schema import TINY_LLAMA, DatasetConfig, Recipe, TinyModelConfig

__all__ = ["TINY_LLAMA", "base_model_slug", "DatasetConfig", "Recipe", "RecipeError", "TinyModelConfig", "load_recipe",
           "parse_overrides", "recipe_from_mapping", "recipe_name_for"]
