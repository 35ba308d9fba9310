"""The Definitions Dagster loads: every recipe in the recipe folder.

    dagster dev -m tunegraph.pipelines.definitions        # recipes from $TUNEGRAPH_RECIPES
    tunegraph dev --recipes examples                       # the same, on the embedded instance
"""

from tunegraph.pipelines.builder import build_definitions
from tunegraph.pipelines.recipes import discover_recipes, recipes_dir

defs = build_definitions(discover_recipes(recipes_dir()))
