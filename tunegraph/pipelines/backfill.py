"""Runs over checkpoint partitions: what `tunegraph materialize`, `evaluate` and `backfill-evals`
launch on the embedded instance.

    materialize_in_order(assets, instance, resources, keys)   # unpartitioned, per partition, after
    backfill_evals(recipe, instance, resources, partitions)   # eval_scores per checkpoint + report
    submit_backfill(recipe, instance, partitions)             # a Dagster backfill for the daemon

Dagster runs one partition per run (a run of a partitioned asset carries one partition key), so
"everything" is: one run of the unpartitioned assets up to training, one run per checkpoint of
`eval_scores`, then one run of the reports that read them all. The in-process runs are tagged
`tunegraph/backfill=<id>`, so the UI's Runs page filters one backfill's runs; `submit_backfill`
instead creates a real Dagster asset backfill (the UI's Backfills page), which the daemon of
`tunegraph dev` executes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSelection,
    DagsterInstance,
    ExecuteInProcessResult,
    materialize,
)

from tunegraph.assets.common import recipe_key
from tunegraph.config import Recipe
from tunegraph.ops.checkpoints import FINAL, partition_key, partitions_name

BACKFILL_TAG = "tunegraph/backfill"


@dataclass
class RunsOutcome:
    """The runs launched, in order, and whether all of them succeeded."""

    results: list[ExecuteInProcessResult] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return bool(self.results) and all(r.success for r in self.results)


def asset_graph(assets: Sequence[AssetsDefinition]):
    """The graph of `assets`, without binding resources (Definitions would demand them)."""
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph

    return AssetGraph.from_assets(list(assets))


def plan_runs(assets: Sequence[AssetsDefinition], keys: Iterable[AssetKey]
              ) -> tuple[set[AssetKey], dict[str, set[AssetKey]], set[AssetKey]]:
    """Split materializable `keys` into (unpartitioned before, {partitions name: keys},
    unpartitioned after): the last group reads partitioned assets (reports)."""
    graph = asset_graph(assets)
    wanted = {k for k in keys if graph.get(k).is_materializable}
    partitioned: dict[str, set[AssetKey]] = {}
    for key in wanted:
        partitions_def = graph.get(key).partitions_def
        if partitions_def is not None:
            partitioned.setdefault(partitions_def.name, set()).add(key)
    flat = set().union(*partitioned.values()) if partitioned else set()
    downstream = AssetSelection.assets(*flat).downstream().resolve(graph) if flat else set()
    after = {k for k in wanted - flat if k in downstream}
    return wanted - flat - after, partitioned, after


def materialize_in_order(assets: Sequence[AssetsDefinition], instance: DagsterInstance,
                         resources: dict[str, Any], keys: Iterable[AssetKey],
                         run_config: dict | None = None,
                         partitions: Sequence[str] | Callable[[], Sequence[str]] | None = None
                         ) -> RunsOutcome:
    """Materialize `keys`: the unpartitioned ones first, then each partitioned group for each
    of its partitions (all registered ones, or `partitions`: a callable is asked after the first
    run, which may be the training that registers them), then what reads them."""
    before, partitioned, after = plan_runs(assets, keys)
    outcome = RunsOutcome()
    tags = {BACKFILL_TAG: uuid.uuid4().hex[:8]}

    def run(selection: set[AssetKey], partition: str | None = None) -> bool:
        result = materialize(assets, instance=instance, resources=resources,
                             selection=sorted(selection, key=lambda k: k.path),
                             partition_key=partition, raise_on_error=False,
                             run_config=run_config, tags=tags if partition else None)
        outcome.results.append(result)
        return result.success

    if before and not run(before):
        return outcome
    evaluated = False
    for name, group in sorted(partitioned.items()):
        chosen = partitions() if callable(partitions) else partitions
        keys_of_group = chosen or instance.get_dynamic_partitions(name)
        if not keys_of_group:
            raise ValueError(f"{', '.join(sorted(k.to_user_string() for k in group))}: no "
                             f"partition of {name} exists yet: materialize the training asset "
                             f"first (it registers the checkpoints)")
        for partition in keys_of_group:
            evaluated = run(group, partition) or evaluated
    if after and (evaluated or not partitioned):
        run(after)
    return outcome


def resolve_checkpoints(recipe: Recipe, instance: DagsterInstance,
                        names: Sequence[str]) -> list[str]:
    """Partition keys for `--checkpoints`: full keys, `final`, `step-000050` or `50`; all
    registered checkpoints when `names` is empty."""
    registered = list(instance.get_dynamic_partitions(partitions_name(recipe.name)))
    if not registered:
        raise ValueError(f"recipe {recipe.name} has no checkpoints registered on this instance: "
                         f"train it first (tunegraph train {recipe.source_path or recipe.name})")
    if not names:
        return registered
    chosen = []
    for name in names:
        short = name.removeprefix(f"{recipe.name}__")
        if short == FINAL:
            key = partition_key(recipe.name, None)
        elif short.removeprefix("step-").isdigit():
            key = partition_key(recipe.name, int(short.removeprefix("step-")))
        else:
            key = name
        if key not in registered:
            raise ValueError(f"--checkpoints {name}: recipe {recipe.name} has no checkpoint "
                             f"{key}; registered: {', '.join(registered)}")
        chosen.append(key)
    return chosen


def eval_keys(recipe: Recipe) -> list[AssetKey]:
    return [recipe_key(recipe, "eval_scores"), recipe_key(recipe, "eval_report")]


def backfill_evals(recipe: Recipe, assets: Sequence[AssetsDefinition], instance: DagsterInstance,
                   resources: dict[str, Any], partitions: Sequence[str],
                   run_config: dict | None = None) -> RunsOutcome:
    """eval_scores for each of `partitions` (one run each), then the recipe's eval_report."""
    return materialize_in_order(assets, instance, resources, eval_keys(recipe), run_config,
                                partitions)


def submit_backfill(recipe: Recipe, assets: Sequence[AssetsDefinition],
                    instance: DagsterInstance, partitions: Sequence[str]) -> str:
    """Create a Dagster asset backfill of eval_scores over `partitions` and the eval report
    after them; the daemon (`tunegraph dev`) launches its runs. Returns the backfill id."""
    # Dagster has no public call for this yet: the UI's GraphQL mutation and `dagster job
    # backfill` build a PartitionBackfill the same way.
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill_id = make_new_backfill_id()
    graph = asset_graph(assets)
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id, asset_graph=graph, partition_names=list(partitions),
        asset_selection=eval_keys(recipe), backfill_timestamp=time.time(),
        tags={BACKFILL_TAG: backfill_id}, dynamic_partitions_store=instance,
        all_partitions=False, title=f"{recipe.name}: evals over {len(partitions)} checkpoints",
        description="tunegraph backfill-evals --submit", run_config=None)
    instance.add_backfill(backfill)
    return backfill_id
