"""Retrain when the data changes: one sensor per recipe watches the local files its datasets read.

    <recipe>_data_sensor          # in the UI (Automation); starts STOPPED: switch it on there

The cursor is the files' content hashes (`{path: [size, mtime_ns, sha256]}`; a file is hashed
again only when its size or mtime moves, so a tick over gigabytes costs a `stat` per file). The
first tick records the files and requests nothing. A later tick that finds a file added, removed or
with other bytes requests a run of the recipe's stale assets (the same rule as the schedule,
tunegraph.pipelines.schedules: what the edit changed, and everything downstream of it); bytes that
change back to a version already materialized request nothing.

The evals of the retrained checkpoints follow from the checkpoint sensor
(tunegraph.pipelines.checkpoint_sensor) once training registered them.
"""

from __future__ import annotations

import json

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from tunegraph.config import Recipe
from tunegraph.ops.data import resolve_data_path
from tunegraph.ops.freshness import changed_files, data_snapshot
from tunegraph.ops.hashing import hash_json, short
from tunegraph.pipelines.schedules import current_recipe, request_stale, stage_keys

# Seconds between ticks: a stat per data file each time, and a retrain is never urgent to the
# second. Dagster's default is 30.
MINIMUM_INTERVAL_S = 60


def data_sensor(recipe: Recipe, asset_keys: list[AssetKey]) -> SensorDefinition | None:
    """The recipe's data-folder sensor, or None when it reads no local file (hub datasets only).
    A missing file is the tick's error, not the code location's: data may arrive later."""
    if all(resolve_data_path(recipe, d) is None for d in recipe.datasets):
        return None
    keys = stage_keys(asset_keys)
    target = set(keys)

    @sensor(name=f"{recipe.name}_data_sensor", target=AssetSelection.assets(*keys),
            minimum_interval_seconds=MINIMUM_INTERVAL_S, default_status=DefaultSensorStatus.STOPPED,
            required_resource_keys={"artifact_store"},
            description=f"Requests {recipe.name}'s stale assets when a file its datasets read "
                        f"changes (content hashes, checked every {MINIMUM_INTERVAL_S} s).")
    def _data_sensor(context: SensorEvaluationContext):
        current = current_recipe(recipe)
        before = json.loads(context.cursor) if context.cursor else None
        snapshot = data_snapshot(current, before)
        context.update_cursor(json.dumps(snapshot, sort_keys=True))
        if before is None:
            return SkipReason(f"{recipe.name}: watching {len(snapshot)} data file(s) from now on")
        changed = changed_files(before, snapshot)
        if not changed:
            return SkipReason(f"{recipe.name}: no data file changed")
        store = context.resources.artifact_store.store()
        # The run key is the data's state: a re-evaluated tick never launches the same run twice.
        result = request_stale(current, context.instance, store, target, "data_sensor",
                               run_key=short(hash_json(snapshot)))
        if isinstance(result, SkipReason):
            return SkipReason(f"{', '.join(changed)} changed, but {result.skip_message}")
        files = ", ".join(changed)[:4000]
        return [r.with_replaced_attrs(tags={**r.tags, "tunegraph/changed_files": files})
                for r in result]

    return _data_sensor
