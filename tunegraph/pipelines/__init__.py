"""Definitions built from a folder of recipes, and the embedded Dagster instance.

The names below are imported on first use. The builder imports the assets, and with them torch and
transformers (many seconds of imports), which `tunegraph dev` does not need: it reads the recipes
and the instance, then hands over to `dagster dev`, whose code server imports the definitions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunegraph.pipelines.builder import assets_for, build_definitions, resources
    from tunegraph.pipelines.instance import embedded_instance, ensure_dagster_home
    from tunegraph.pipelines.recipes import discover_recipes, recipes_dir

# name -> the module of this package that defines it
_MODULES = {"assets_for": "builder", "build_definitions": "builder", "resources": "builder",
            "embedded_instance": "instance", "ensure_dagster_home": "instance",
            "discover_recipes": "recipes", "recipes_dir": "recipes"}

__all__ = ["assets_for", "build_definitions", "discover_recipes", "embedded_instance",
           "ensure_dagster_home", "recipes_dir", "resources"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
