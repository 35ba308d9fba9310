"""The `checkpoint_evals` sensor: evaluates new checkpoints, then refreshes the eval reports.

Each tick, for every recipe with evals:
1. each partition of `<recipe>__checkpoints` whose latest checkpoint (its `checkpoint_key`) has no
   eval yet gets a run of `<recipe>/eval_scores` for that partition (run key: partition and
   checkpoint key, so a checkpoint is requested once, and a retrain's new checkpoint again);
2. once every checkpoint is evaluated, `<recipe>/eval_report` gets a run if an eval is newer than
   the report; and `reports/eval_report` once every recipe's report is there and one is newer.

Training registers checkpoints at its end (tunegraph.assets.checkpoints), so with `tunegraph dev`
running a retrain from the UI is followed by its evals and reports without anyone asking. Stale
evals of unchanged checkpoints (a new eval setting) are the schedules' work, not this sensor's.
"""

from __future__ import annotations

from collections.abc import Iterator

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from tunegraph.assets.checkpoints import checkpoints_key
from tunegraph.assets.common import recipe_key
from tunegraph.assets.report import COMBINED_REPORT_KEY
from tunegraph.config import Recipe
from tunegraph.ops.checkpoints import partitions_name

SENSOR_NAME = "checkpoint_evals"
# Training takes minutes to hours; half a minute between looks costs nothing and feels immediate.
MINIMUM_INTERVAL_S = 30


def _latest(instance: DagsterInstance, key: AssetKey, partition: str | None = None):
    """The latest materialization record of an asset (partition), or None."""
    records_filter = AssetRecordsFilter(asset_key=key,
                                        asset_partitions=[partition] if partition else None)
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def _checkpoint_key(record) -> str | None:
    value = record.asset_materialization.metadata.get("checkpoint_key") if record else None
    return value.value if value is not None else None


def recipe_requests(instance: DagsterInstance, recipe: Recipe) -> list[RunRequest]:
    """Eval runs for the recipe's unevaluated checkpoints; else a report run if it is behind."""
    eval_key, report_key = recipe_key(recipe, "eval_scores"), recipe_key(recipe, "eval_report")
    requests, latest_eval_id = [], None
    for partition in instance.get_dynamic_partitions(partitions_name(recipe.name)):
        wanted = _checkpoint_key(_latest(instance, checkpoints_key(recipe), partition))
        evaluated = _latest(instance, eval_key, partition)
        if wanted is None:
            continue  # registered, not materialized yet: the train step is still logging
        if _checkpoint_key(evaluated) != wanted:
            requests.append(RunRequest(run_key=f"{partition}:{wanted}", partition_key=partition,
                                       asset_selection=[eval_key],
                                       tags={"tunegraph/checkpoint_key": wanted}))
        elif latest_eval_id is None or evaluated.storage_id > latest_eval_id:
            latest_eval_id = evaluated.storage_id
    if requests or latest_eval_id is None:
        return requests
    report = _latest(instance, report_key)
    if report is None or report.storage_id < latest_eval_id:
        return [RunRequest(run_key=f"{recipe.name}/eval_report:{latest_eval_id}",
                           asset_selection=[report_key])]
    return []


def combined_request(instance: DagsterInstance, recipes: list[Recipe]) -> list[RunRequest]:
    reports = [_latest(instance, recipe_key(r, "eval_report")) for r in recipes]
    if not reports or any(r is None for r in reports):
        return []
    newest = max(r.storage_id for r in reports)
    combined = _latest(instance, COMBINED_REPORT_KEY)
    if combined is not None and combined.storage_id > newest:
        return []
    return [RunRequest(run_key=f"reports/eval_report:{newest}",
                       asset_selection=[COMBINED_REPORT_KEY])]


def checkpoint_eval_sensor(recipes: list[Recipe]) -> SensorDefinition | None:
    """The sensor over the recipes that have evals (None if none has)."""
    evaluated = [r for r in recipes if r.val_set_size > 0]
    if not evaluated:
        return None
    keys = [recipe_key(r, name) for r in evaluated for name in ("eval_scores", "eval_report")]

    @sensor(name=SENSOR_NAME, minimum_interval_seconds=MINIMUM_INTERVAL_S,
            default_status=DefaultSensorStatus.RUNNING,
            asset_selection=AssetSelection.assets(*keys, COMBINED_REPORT_KEY),
            description="Evaluates each new checkpoint (one eval_scores run per partition), "
                        "then refreshes the eval reports.")
    def _checkpoint_evals(context: SensorEvaluationContext) -> Iterator[RunRequest | SkipReason]:
        pending = [q for recipe in evaluated for q in recipe_requests(context.instance, recipe)]
        if not pending:
            pending = combined_request(context.instance, evaluated)
        if not pending:
            yield SkipReason("every checkpoint is evaluated and every report is current")
        yield from pending

    return _checkpoint_evals
