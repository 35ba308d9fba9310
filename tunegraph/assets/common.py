"""What every asset factory shares: progress logging, outputs with data versions, key names."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from typing import Any

from dagster import AssetExecutionContext, AssetKey, DataVersion, MetadataValue, Output

from tunegraph.config import Recipe, base_model_slug
from tunegraph.ops.stages import StageResult

BASE_MODELS_GROUP = "base_models"
# Output(data_version=...) is marked beta in Dagster 1.13; it is the documented way to report a
# content-derived data version, which the caching design relies on.
warnings.filterwarnings("ignore", message="Parameter `data_version`", category=Warning)


def base_model_key(recipe: Recipe) -> AssetKey:
    return AssetKey([BASE_MODELS_GROUP, base_model_slug(recipe)])


def recipe_key(recipe: Recipe, name: str) -> AssetKey:
    return AssetKey([recipe.name, name])


def trained_key(recipe: Recipe) -> AssetKey:
    """`<recipe>/adapter` for LoRA, `<recipe>/model` for a full fine-tune."""
    return recipe_key(recipe, "adapter" if recipe.is_lora else "model")


def progress_logger(context: AssetExecutionContext, every_s: float = 5.0
                    ) -> Callable[[str, int, int], None]:
    """A progress callback for ops that logs to Dagster at most every `every_s` seconds."""
    last = [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every_s:
            last[0] = now
            context.log.info(f"{stage}: {done}/{total}")

    return report


def stage_output(result: StageResult, metadata: dict[str, Any]) -> Output:
    """The asset's output: the artifact handle, its content key as data version, and metadata."""
    artifact = result.artifact
    return Output(artifact, data_version=DataVersion(artifact.key), metadata={
        "cache_hit": result.cache_hit,
        "artifact_key": artifact.key,
        "path": MetadataValue.path(str(artifact.path)),
        **metadata,
    })


def json_md(value: Any) -> MetadataValue:
    return MetadataValue.md(f"```json\n{json.dumps(value, indent=2, default=str)}\n```")
