"""`<recipe>/checkpoints`: every checkpoint a training run saved, and its final adapter/model, as
partitions (`<recipe>__step-000050`, ..., `<recipe>__final`) of the dynamic partitions
`<recipe>__checkpoints`.

Checkpoints are made by training, never computed on their own, so the asset is declared from an
AssetSpec (no function: nothing to launch) and the train step materializes it: it adds the
partition keys to the instance and logs one AssetMaterialization per partition, with the
checkpoint's manifest as metadata and its identity (train key, step) as data version. A retrain
re-materializes every partition with new data versions, which makes each checkpoint's eval
stale; partitions of an earlier run that the new run did not save are deleted.
"""

from __future__ import annotations

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    AssetSpec,
    DynamicPartitionsDefinition,
    MetadataValue,
)

from tunegraph.assets.common import recipe_key, trained_key
from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.checkpoints import Checkpoint, list_checkpoints, partitions_name

# Dagster's data-version tag (dagster._core.definitions.data_version.DATA_VERSION_TAG): an
# AssetMaterialization logged for another asset than the step's output carries it as a tag.
DATA_VERSION_TAG = "dagster/data_version"


def checkpoint_partitions(recipe: Recipe) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=partitions_name(recipe.name))


def checkpoints_key(recipe: Recipe) -> AssetKey:
    return recipe_key(recipe, "checkpoints")


def checkpoints_asset(recipe: Recipe) -> AssetsDefinition:
    what = "adapter" if recipe.is_lora else "model"
    spec = AssetSpec(key=checkpoints_key(recipe), group_name=recipe.name,
                     partitions_def=checkpoint_partitions(recipe), deps=[trained_key(recipe)],
                     kinds={"pytorch"},
                     description=f"Every checkpoint training saved and the final {what}, one "
                                 f"partition each; materialized by the training step.")
    return AssetsDefinition(specs=[spec])


def _metadata(checkpoint: Checkpoint) -> dict:
    return {"step": checkpoint.step, "final": checkpoint.final,
            "train_loss": checkpoint.loss, "train_key": checkpoint.train_key,
            "checkpoint_key": checkpoint.key, "path": MetadataValue.path(str(checkpoint.path))}


def register_checkpoints(context: AssetExecutionContext, recipe: Recipe,
                         trained: Artifact) -> list[Checkpoint]:
    """Make the training artifact's checkpoints the recipe's partitions and materialize each."""
    checkpoints = list_checkpoints(trained, recipe.name)
    name = partitions_name(recipe.name)
    keys = [c.partition for c in checkpoints]
    instance = context.instance
    for gone in sorted(set(instance.get_dynamic_partitions(name)) - set(keys)):
        instance.delete_dynamic_partition(name, gone)
    instance.add_dynamic_partitions(name, keys)
    for checkpoint in checkpoints:
        context.log_event(AssetMaterialization(
            asset_key=checkpoints_key(recipe), partition=checkpoint.partition,
            description=f"step {checkpoint.step}" + (" (final)" if checkpoint.final else ""),
            metadata=_metadata(checkpoint), tags={DATA_VERSION_TAG: checkpoint.key}))
    return checkpoints
