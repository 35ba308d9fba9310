"""Definitions built from a folder of recipes, and the embedded Dagster instance."""

from tunegraph.pipelines.builder import (
                                         assets_for,
                                         build_definitions,
                                         discover_recipes,
                                         recipes_dir,
                                         resources,
)
from tunegraph.pipelines.instance import embedded_instance, ensure_dagster_home

__all__ = ["assets_for", "build_definitions", "discover_recipes", "embedded_instance",
           "ensure_dagster_home", "recipes_dir", "resources"]
