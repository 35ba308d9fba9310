"""Which of a recipe's stages would compute if materialized now, without computing anything.

    probes = probe_stages(recipe, store, slug)    # [StageProbe("tokenized_dataset", None, key, True), ...]
    snapshot = data_snapshot(recipe, previous)    # {file: [size, mtime_ns, sha256]}

`probe_stages` runs the stages of `tunegraph.ops.stages` themselves against a store that refuses
writes: a stage whose key is stored returns its artifact (a cache hit), a stage that would compute
raises before doing any work, with the key it would write. So the keys here are the stages' own,
never a copy of their hashing that could drift. The cost is what computing the keys costs:
sha256 of every data file read (about 1 GB/s) and reading the tokenizer files.

Schedules and sensors (tunegraph.pipelines) compare these keys with the data versions of the
instance's last materializations, which equal artifact keys: where they differ, the asset is stale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact, ArtifactStore
from tunegraph.ops.data import local_files, resolve_data_path
from tunegraph.ops.hashing import hash_file
from tunegraph.ops.launch import Launcher, LaunchSpec


class WouldCompute(Exception):
    """Raised by the probe store where a stage would start writing: its key is not stored."""

    def __init__(self, kind: str, key: str):
        super().__init__(f"{kind}/{key} is not stored")
        self.kind = kind
        self.key = key


class _ProbeStore(ArtifactStore):
    """Reads the real store; a write raises before the stage does any work."""

    def write(self, kind: str, key: str, manifest: dict[str, Any]):  # type: ignore[override]
        raise WouldCompute(kind, key)


@dataclass(frozen=True)
class StageProbe:
    """What materializing one stage (one partition of it) now would do.

    `stage`: its asset's last key part ("base_model" for the shared base model; "adapter" or
    "model" for training). `partition`: the checkpoint partition, for eval_scores. `key`: the
    artifact key it would report, or None where an upstream stage must compute first (its inputs
    do not exist yet, so neither does its key). `stored`: that artifact exists."""

    stage: str
    partition: str | None
    key: str | None
    stored: bool


def probe_stages(recipe: Recipe, store: ArtifactStore, slug: str,
                 launch: LaunchSpec | None = None) -> list[StageProbe]:
    """Probe the recipe's stages in dependency order. eval_scores gets one probe per checkpoint
    of the current training artifact, and none while training would compute: its checkpoints
    (the partitions) do not exist yet. `launch`: how training would run (its process count is
    part of the training key)."""
    from tunegraph.ops.checkpoints import list_checkpoints
    from tunegraph.ops.stages import (
        base_model_stage,
        eval_stage,
        merge_stage,
        tokenized_stage,
        train_stage,
    )

    probe_store = _ProbeStore(store.root)
    probes: list[StageProbe] = []

    def probe(stage_name: str, stage: Callable[..., Any], *inputs: Any,
              partition: str | None = None) -> Artifact | None:
        if any(i is None for i in inputs):
            probes.append(StageProbe(stage_name, partition, None, False))
            return None
        try:
            result = stage(recipe, probe_store, *inputs)
        except WouldCompute as would:
            probes.append(StageProbe(stage_name, partition, would.key, False))
            return None
        probes.append(StageProbe(stage_name, partition, result.artifact.key, True))
        return result.artifact

    base = probe("base_model", lambda r, s: base_model_stage(r, s, slug))
    tokenized = probe("tokenized_dataset", tokenized_stage, base)
    trained = probe("adapter" if recipe.is_lora else "model",
                    lambda r, s, b, t: train_stage(r, s, b, t, launcher=Launcher(launch or
                                                                              LaunchSpec())),
                    base, tokenized)
    if recipe.is_lora:
        probe("merged_model", merge_stage, base, trained, tokenized)
    if recipe.val_set_size > 0 and trained is not None:
        for checkpoint in list_checkpoints(trained, recipe.name):
            probe("eval_scores", eval_stage, base, tokenized, checkpoint,
                  partition=checkpoint.partition)
    return probes


def data_files(recipe: Recipe) -> list[Path]:
    """Every local file the recipe's datasets read (hub datasets have none)."""
    files: list[Path] = []
    for dataset_cfg in recipe.datasets:
        if resolve_data_path(recipe, dataset_cfg) is not None:
            files += [f for f in local_files(recipe, dataset_cfg)[1] if f not in files]
    return files


def data_snapshot(recipe: Recipe, previous: dict[str, list] | None = None) -> dict[str, list]:
    """`{path: [size, mtime_ns, sha256]}` of the recipe's data files.

    A file whose size and mtime match `previous` keeps its hash there (make's and rsync's rule),
    so watching gigabytes of data costs a `stat` per file; a touched file is hashed again, and
    one touched with the same bytes compares equal by hash."""
    previous = previous or {}
    snapshot: dict[str, list] = {}
    for path in data_files(recipe):
        stat = path.stat()
        known = previous.get(str(path))
        if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            snapshot[str(path)] = known
        else:
            snapshot[str(path)] = [stat.st_size, stat.st_mtime_ns, hash_file(path)]
    return snapshot


def changed_files(before: dict[str, list], after: dict[str, list]) -> list[str]:
    """Files added, removed, or with other content (hash) between two snapshots."""
    return sorted(path for path in before.keys() | after.keys()
                  if (before.get(path) or [None] * 3)[2] != (after.get(path) or [None] * 3)[2])
