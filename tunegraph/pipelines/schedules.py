"""Retrains that run only what changed: a recipe's `schedule: "<cron>"` becomes a Dagster schedule
whose ticks request the recipe's STALE assets, and nothing (a SkipReason) when nothing changed.

    schedule: "0 2 * * *"          # in a recipe: 02:00 every night (schedule_timezone, default UTC)
    tunegraph dev                   # the schedule starts RUNNING; the daemon ticks it

Stale means: materializing the asset now would report another data version than its last
materialization did. tunegraph's data versions are its content keys (tunegraph.ops.stages), so a
tick computes the keys the stages would compute now (`tunegraph.ops.freshness.probe_stages`:
hashes of data files, tokenizer files, recipe keys, code versions; no tokenizing, no training) and
compares them with the `dagster/data_version` tags of the instance's latest materializations.
A changed data file or recipe key changes a key; a stage whose inputs do not exist yet is stale
because its upstream is. Dagster's own staleness (`stale_assets_only`) cannot see a data file that
no observation recorded, and the keys are exact by construction: equal key, cache hit.

What a tick requests: the stale stages up to the merged model, in one run; training registers
the new checkpoints and the checkpoint sensor (tunegraph.pipelines.checkpoint_sensor) evaluates
them. When those stages are all current, stale eval_scores partitions (an eval setting changed)
get one run per checkpoint. Blocking asset checks act within one run only, so ticks carry them
across runs: nothing after a current stage whose gate failed is requested, and a stage whose
check never ran on it, or ran with other `check_*` thresholds, runs again (a cache hit) with its
check. Assets that a queued or running run materializes wait for it.

A tick re-reads the recipe file, since it may come days after the code location loaded it; the
runs it launches load the definitions afresh and read the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DagsterInvalidDefinitionError,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
)

from tunegraph.assets.checks import THRESHOLDS, gates
from tunegraph.assets.common import BASE_MODELS_GROUP, base_model_key, recipe_key
from tunegraph.config import Recipe, base_model_slug, load_recipe
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.checkpoints import partitions_name
from tunegraph.ops.freshness import StageProbe, probe_stages
from tunegraph.resources.launcher import LauncherResource

DATA_VERSION_TAG = "dagster/data_version"
RECIPE_TAG = "tunegraph/recipe"
TRIGGER_TAG = "tunegraph/trigger"
PARTITION_TAG = "dagster/partition"
IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]
# The assets a schedule or sensor may request: the content-addressed stages. Checkpoints are
# logged by the train step; eval reports follow evals (tunegraph.pipelines.checkpoint_sensor).
STAGES = ("tokenized_dataset", "adapter", "model", "merged_model", "eval_scores")


@dataclass(frozen=True)
class Stale:
    key: AssetKey
    partition: str | None
    reason: str
    new_key: str | None  # the content key a materialization now would report, where known


def stage_keys(asset_keys: list[AssetKey]) -> list[AssetKey]:
    """The stage assets among a recipe's asset keys (its base model included)."""
    return [k for k in asset_keys if k.path[0] == BASE_MODELS_GROUP or k.path[-1] in STAGES]


def stage_asset_key(recipe: Recipe, stage: str) -> AssetKey:
    return base_model_key(recipe) if stage == "base_model" else recipe_key(recipe, stage)


def current_recipe(recipe: Recipe) -> Recipe:
    """The recipe as its file reads now (a recipe built in code, with no file, as it is)."""
    if recipe.source_path is None:
        return recipe
    return load_recipe(recipe.source_path)


def _latest(instance: DagsterInstance, key: AssetKey, partition: str | None):
    """The latest materialization record of an asset (partition), or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=1).records
    return records[0] if records else None


def _why(probe: StageProbe, version: str | None) -> str | None:
    if version is None:
        return "never materialized"
    if probe.key is None:
        return "an upstream stage changed"
    if probe.key != version:
        return f"inputs changed (key {version} -> {probe.key})"
    if not probe.stored:
        return f"artifact {probe.key} is missing from the store"
    return None


def _gate(instance: DagsterInstance, gate: tuple[AssetCheckKey, str], materialized_at: float
          ) -> tuple[str | None, str | None]:
    """(why the current stage must run again, why what follows it is blocked) by its blocking
    check: a check that never completed on this materialization, or ran with other thresholds,
    runs again (the stage is a cache hit); a failed one holds back everything after it."""
    check_key, thresholds_now = gate
    record = instance.get_latest_asset_check_evaluation_record(check_key)
    evaluation = record.evaluation if record and record.status.value != "PLANNED" else None
    # The evaluation event comes after the materialization it checked (the planned row before).
    if evaluation is None or record.event.timestamp < materialized_at:
        return f"check {check_key.name} has not run on it", None
    ran_with = evaluation.metadata.get(THRESHOLDS)
    if ran_with is None or ran_with.value != thresholds_now:
        return f"check {check_key.name} thresholds changed", None
    if not evaluation.passed:
        return None, f"{check_key.to_user_string()} failed: {evaluation.description}"
    return None, None


@dataclass
class Staleness:
    stale: list[Stale]
    blocked_by: str | None  # a failed gate: the stale stages after it are left out


def stale_assets(recipe: Recipe, instance: DagsterInstance, store: ArtifactStore) -> Staleness:
    """The recipe's stages (eval_scores: per checkpoint partition) whose materialization now
    would report another data version than the latest one did, in dependency order; none after
    a current stage whose blocking check failed (asset checks do not span runs)."""
    # The launcher the runs will use (the same $TUNEGRAPH_LAUNCHER/_NUM_PROCESSES as the daemon's).
    probes = probe_stages(recipe, store, base_model_slug(recipe), LauncherResource().spec())
    registered = set(instance.get_dynamic_partitions(partitions_name(recipe.name))) if any(
        p.partition for p in probes) else set()
    gated = gates(recipe)
    result = Staleness([], None)
    for probe in probes:
        if probe.partition is not None and probe.partition not in registered:
            continue  # trained outside Dagster: training registers partitions when it runs
        key = stage_asset_key(recipe, probe.stage)
        latest = _latest(instance, key, probe.partition)
        version = latest.asset_materialization.tags.get(DATA_VERSION_TAG) if latest else None
        why = _why(probe, version)
        if why is None and key in gated and result.blocked_by is None:
            why, result.blocked_by = _gate(instance, gated[key], latest.timestamp)
        elif why and result.blocked_by is not None:
            continue
        if why:
            result.stale.append(Stale(key, probe.partition, why, probe.key))
    return result


def runs_in_flight(instance: DagsterInstance) -> dict[tuple[AssetKey, str | None], str]:
    """{(asset key, partition): run id} of the assets that queued or running runs materialize."""
    records = instance.get_run_records(RunsFilter(statuses=IN_FLIGHT))
    return {(key, record.dagster_run.tags.get(PARTITION_TAG)): record.dagster_run.run_id
            for record in records for key in record.dagster_run.asset_selection or ()}


def request_stale(recipe: Recipe, instance: DagsterInstance, store: ArtifactStore,
                  target: set[AssetKey], trigger: str, run_key: str | None = None
                  ) -> list[RunRequest] | SkipReason:
    """Runs of the recipe's stale assets, or a SkipReason saying why there are none.

    Stale unpartitioned stages go in one run; their checkpoints' evals follow from the
    checkpoint sensor once training registered them. Only when those are all current does a
    stale eval partition (a new eval setting) get a run, one per checkpoint."""
    staleness = stale_assets(recipe, instance, store)
    stale = staleness.stale
    if not stale and staleness.blocked_by:
        return SkipReason(f"{recipe.name}: {staleness.blocked_by}; nothing after it runs until "
                          f"its inputs or check thresholds change")
    if not stale:
        return SkipReason(f"{recipe.name}: every asset is current (data files, recipe and code "
                          f"give the keys of the latest materializations)")
    unknown = sorted({s.key.to_user_string() for s in stale if s.key not in target})
    if unknown:
        raise ValueError(f"recipe {recipe.source_path}: it now defines assets the loaded "
                         f"definitions do not have ({', '.join(unknown)}): reload the code "
                         f"location so the {trigger} sees them")
    tags = {RECIPE_TAG: recipe.name, TRIGGER_TAG: trigger}
    busy = runs_in_flight(instance)
    stages = [s for s in stale if s.partition is None]
    if waiting := sorted({busy[(s.key, None)] for s in stages if (s.key, None) in busy}):
        # A stage being materialized looks stale until its run ends; a second run would do
        # the same work (or read the inputs the first is replacing).
        return SkipReason(f"{recipe.name}: run(s) {', '.join(waiting)} are materializing its "
                          f"stale stages; the next tick looks again")
    if stages:
        reasons = "; ".join(f"{s.key.to_user_string()}: {s.reason}" for s in stages)
        return [RunRequest(run_key=run_key, asset_selection=[s.key for s in stages],
                           tags={**tags, "tunegraph/stale": reasons[:4000]})]
    stale = [s for s in stale if (s.key, s.partition) not in busy]
    if not stale:
        return SkipReason(f"{recipe.name}: runs in flight are materializing its stale evals")
    # A schedule's runs in one tick need distinct run keys: the partition and its new key.
    return [RunRequest(run_key=":".join(filter(None, [run_key, s.partition, s.new_key])),
                       partition_key=s.partition, asset_selection=[s.key],
                       tags={**tags, "tunegraph/stale": f"{s.key.to_user_string()}[{s.partition}]"
                                                        f": {s.reason}"})
            for s in stale]


def recipe_schedule(recipe: Recipe, asset_keys: list[AssetKey]) -> ScheduleDefinition | None:
    """The schedule of a recipe with a `schedule:` key (None without one); it starts RUNNING,
    since setting the key is the request for it."""
    if recipe.schedule is None:
        return None
    keys = stage_keys(asset_keys)

    def evaluate(context: ScheduleEvaluationContext) -> Iterator[RunRequest | SkipReason]:
        current = current_recipe(recipe)
        store = context.resources.artifact_store.store()
        result = request_stale(current, context.instance, store, set(keys), "schedule")
        yield from [result] if isinstance(result, SkipReason) else result

    try:
        return ScheduleDefinition(
            name=f"{recipe.name}_schedule", cron_schedule=recipe.schedule,
            execution_timezone=recipe.schedule_timezone or "UTC", execution_fn=evaluate,
            target=AssetSelection.assets(*keys), required_resource_keys={"artifact_store"},
            default_status=DefaultScheduleStatus.RUNNING,
            description=f"Materializes {recipe.name}'s stale assets at '{recipe.schedule}' "
                        f"({recipe.schedule_timezone or 'UTC'}); skips when nothing changed.")
    except DagsterInvalidDefinitionError as exc:
        raise ValueError(f"recipe {recipe.source_path}: schedule: '{recipe.schedule}' is not a "
                         f"cron string Dagster accepts ({exc})") from None
