"""Training checkpoints as things to evaluate: partition keys, per-checkpoint manifests, lookup.

    list_checkpoints(trained, "quickstart")   -> [Checkpoint step 50, ..., Checkpoint final]
    find_checkpoint(trained, "quickstart", "quickstart__step-000050")
    partition_key("quickstart", 50)           -> "quickstart__step-000050"

A training artifact holds the Trainer's checkpoints under `checkpoints/checkpoint-<step>/` and the
final adapter (`adapter/`) or model (`model/`). `write_checkpoint_manifests` adds a manifest to
each (step, training loss at that step, train key, folder) and an index, `checkpoints.json`, to
the artifact. A checkpoint's identity is (train key, step): the eval stage hashes it, so a retrain
invalidates exactly the evals of the checkpoints it replaced, and evals of an unchanged training
stay cached.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.hashing import hash_json, short

FINAL = "final"
INDEX = "checkpoints.json"
MANIFEST = "tunegraph_checkpoint.json"
# Zero-padded so that partition keys sort by step in the UI (six digits: a million steps).
STEP_DIGITS = 6
# Dagster partition keys may not hold commas, brackets or "...", and the key is also a folder and
# a URL part: letters, digits and underscores only (recipe names are made of these already).
SAFE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def partitions_name(recipe_name: str) -> str:
    """The recipe's DynamicPartitionsDefinition name: `<recipe>__checkpoints`."""
    _check_name(recipe_name)
    return f"{recipe_name}__checkpoints"


def partition_key(recipe_name: str, step: int | None) -> str:
    """`<recipe>__step-000500` for a saved checkpoint, `<recipe>__final` for the final model."""
    _check_name(recipe_name)
    return f"{recipe_name}__{FINAL}" if step is None else f"{recipe_name}__step-{step:0{STEP_DIGITS}d}"


def _check_name(recipe_name: str) -> None:
    if not SAFE_NAME.match(recipe_name):
        raise ValueError(f"recipe name '{recipe_name}': checkpoint partition keys need letters, "
                         f"digits and underscores only; rename the recipe file")


@dataclass(frozen=True)
class Checkpoint:
    """One evaluable state of a training run: a saved step, or the final adapter/model."""

    recipe: str
    step: int                 # optimizer steps done; the final model's is the run's last step
    final: bool
    loss: float | None        # the last logged training loss at or before `step`
    train_key: str
    train_kind: str           # "adapters" (LoRA: `path` holds an adapter) or "models"
    path: Path                # what from_pretrained (or PeftModel) loads

    @property
    def partition(self) -> str:
        return partition_key(self.recipe, None if self.final else self.step)

    @property
    def is_adapter(self) -> bool:
        return self.train_kind == "adapters"

    @property
    def identity(self) -> dict[str, Any]:
        """What makes this checkpoint this one: the eval stage hashes it into its key."""
        return {"train": self.train_key, "step": FINAL if self.final else self.step}

    @property
    def key(self) -> str:
        """A content key for the checkpoint (its Dagster data version)."""
        return short(hash_json(self.identity))

    def manifest(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "partition": self.partition, "step": self.step,
                "final": self.final, "loss": self.loss, "train_key": self.train_key,
                "train_kind": self.train_kind, "checkpoint_key": self.key, "path": str(self.path)}


def loss_at(log_history: list[dict[str, Any]], step: int) -> float | None:
    """The last logged training loss at or before `step` (logging_steps may skip steps)."""
    losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and h["step"] <= step]
    return float(max(losses)[1]) if losses else None


def write_checkpoint_manifests(train_dir: Path, train_key: str, train_kind: str
                               ) -> list[dict[str, Any]]:
    """Write a manifest into each checkpoint folder of a finished training folder and the index
    `checkpoints.json` beside them; returns the index (relative paths).

    A saved step equal to the run's last step is the final model again (same weights), so it
    is listed once, as final. Nothing here names the recipe: recipes with the same training keys
    share the artifact, and each names its partitions after itself (`list_checkpoints`)."""
    log = json.loads((train_dir / "log.json").read_text())
    history, num_steps = log["history"], log["metrics"]["num_steps"]
    weights = "adapter" if train_kind == "adapters" else "model"
    entries = []
    saved = sorted((int(m.group(1)), p) for p in (train_dir / "checkpoints").glob("checkpoint-*")
                   if (m := HF_CHECKPOINT.match(p.name)))
    for step, folder in saved:
        if step < num_steps:
            entries.append((step, False, folder.relative_to(train_dir)))
    entries.append((num_steps, True, Path(weights)))
    index = []
    for step, final, relative in entries:
        entry = {"step": step, "final": final, "loss": loss_at(history, step),
                 "train_key": train_key, "train_kind": train_kind, "path": str(relative)}
        (train_dir / relative / MANIFEST).write_text(json.dumps(entry, indent=2))
        index.append(entry)
    (train_dir / INDEX).write_text(json.dumps(index, indent=2))
    return index


def list_checkpoints(trained: Artifact, recipe_name: str) -> list[Checkpoint]:
    """The checkpoints of a training artifact, by step, the final one last.

    `recipe_name` is the recipe asking: two recipes with the same training keys share one
    artifact, and each names its partitions after itself."""
    index_file = trained.path / INDEX
    if not index_file.is_file():
        raise ValueError(f"{trained.path} has no {INDEX}: it was trained by an older tunegraph; "
                         f"train again (the train stage's code version moved)")
    return [Checkpoint(recipe=recipe_name, step=e["step"], final=e["final"], loss=e["loss"],
                       train_key=trained.key, train_kind=trained.kind,
                       path=trained.path / e["path"])
            for e in json.loads(index_file.read_text())]


def find_checkpoint(trained: Artifact, recipe_name: str, partition: str) -> Checkpoint:
    """The checkpoint that a partition key names, in the current training artifact."""
    checkpoints = list_checkpoints(trained, recipe_name)
    for checkpoint in checkpoints:
        if checkpoint.partition == partition:
            return checkpoint
    known = ", ".join(c.partition for c in checkpoints)
    raise ValueError(f"checkpoint partition '{partition}' is not a checkpoint of the current "
                     f"training of recipe {recipe_name} (train key {trained.key}); its "
                     f"checkpoints are: {known}")
