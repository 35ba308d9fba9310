"""`<recipe>/raw_data`: an observable source asset, the recipe's datasets as they are on disk.

Its data version is DVC's hash of the data where DVC tracks it, else the files' content hash
(tunegraph.ops.raw_data). The tokenized dataset (and a locally built base model, whose tokenizer
learns from the data) depend on it, so after `dvc pull` of new data, observing it ("Observe
sources" in the UI, or `report_raw_data`) shows them stale. `tunegraph materialize` records an
observation before each run, so what a run read is what its materializations remember.
"""

import warnings
from collections.abc import Iterable
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    DagsterInstance,
    DataVersion,
    MetadataValue,
    ObserveResult,
    multi_observable_source_asset,
)

from tunegraph.assets.common import recipe_key
from tunegraph.config import Recipe
from tunegraph.ops.raw_data import raw_data_version

# The tag under which Dagster keeps an observation's data version (what ObserveResult sets).
DATA_VERSION_TAG = "dagster/data_version"
# Observable source assets are marked beta in Dagster 1.13; they are the documented way to give
# external data a data version that downstream staleness follows.
warnings.filterwarnings("ignore", message="Function `multi_observable_source_asset`",
                        category=Warning)


def raw_data_key(recipe: Recipe) -> AssetKey:
    return recipe_key(recipe, "raw_data")


def observation(recipe: Recipe) -> tuple[DataVersion, dict[str, Any]]:
    """The recipe's raw-data version now, and metadata saying where each dataset's comes from."""
    version, datasets = raw_data_version(recipe)
    metadata: dict[str, Any] = {"tracked_by": ", ".join(sorted({d.tracked_by for d in datasets}))}
    for dataset in datasets:
        metadata[dataset.label] = MetadataValue.json({"version": dataset.version,
                                                      "tracked_by": dataset.tracked_by,
                                                      **dataset.details})
    return DataVersion(version), metadata


def raw_data_asset(recipe: Recipe) -> AssetsDefinition:
    key = raw_data_key(recipe)
    paths = ", ".join(d.path for d in recipe.datasets)

    @multi_observable_source_asset(
        name=f"{recipe.name}__raw_data",
        specs=[AssetSpec(key, group_name=recipe.name,
                         description=f"The datasets ({paths}); data version: DVC's hash where "
                                     f"DVC tracks them, else their content hash.")])
    def _observe(context: AssetExecutionContext):
        version, metadata = observation(recipe)
        context.log.info(f"{key.to_user_string()}: data version {version.value}")
        yield ObserveResult(asset_key=key, data_version=version, metadata=metadata)

    return _observe


def report_raw_data(instance: DagsterInstance, recipes: Iterable[Recipe]) -> None:
    """Record each recipe's raw-data version as an observation outside any run.

    Called before a materialization, so the tokenized dataset remembers the version it read:
    without it, the first observation after a run would mark a fresh asset stale."""
    for recipe in recipes:
        version, metadata = observation(recipe)
        instance.report_runless_asset_event(AssetObservation(
            asset_key=raw_data_key(recipe), tags={DATA_VERSION_TAG: version.value},
            metadata=metadata))
