"""The artifact store as a Dagster resource, and an IO manager that passes artifact handles.

Large things never go through the IO manager: an asset's output is an `Artifact` handle (kind,
content key, path); the IO manager stores that handle as a small JSON pointer per asset key, so a
later run that materializes only a downstream asset finds its inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    Failure,
    InputContext,
    OutputContext,
)

from tunegraph.ops.artifacts import Artifact, ArtifactStore


def default_home() -> Path:
    """`$TUNEGRAPH_HOME`, else `.tunegraph` in the working directory (never a temp dir)."""
    return Path(os.environ.get("TUNEGRAPH_HOME", ".tunegraph")).expanduser().resolve()


def default_artifacts_root() -> str:
    return str(default_home() / "artifacts")


class ArtifactStoreResource(ConfigurableResource):
    """Where artifacts live; defaults to `.tunegraph/artifacts`."""

    root: str = ""

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root or default_artifacts_root())


class NotMaterializedError(Failure, ValueError):
    """An input that was never materialized: a user's ordering mistake, the same on every retry
    (so it bypasses a step's RetryPolicy), and a ValueError like every user mistake."""


class ArtifactIOManager(ConfigurableIOManager):
    """Stores each asset's `Artifact` handle as `<root>/_pointers/<asset key>.json`, and each
    partition's as `<root>/_pointers/<asset key>/<partition>.json`.

    A partitioned input read by an asset of the same partitions is one Artifact; read by an
    unpartitioned asset (a report over all checkpoints) it is `{partition: Artifact}` holding
    the partitions materialized so far."""

    root: str = ""

    def _pointer(self, asset_path: list[str], partition: str | None = None) -> Path:
        base = Path(self.root or default_artifacts_root()) / "_pointers" / "/".join(asset_path)
        return base / f"{partition}.json" if partition is not None else base.with_suffix(".json")

    def handle_output(self, context: OutputContext, obj: Artifact) -> None:
        assert isinstance(obj, Artifact), f"expected an Artifact, got {type(obj).__name__}"
        partition = context.partition_key if context.has_asset_partitions else None
        pointer = self._pointer(list(context.asset_key.path), partition)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj.to_json()))
        os.replace(tmp, pointer)

    def load_input(self, context: InputContext) -> Artifact | dict[str, Artifact]:
        key = list(context.asset_key.path)
        if not context.has_asset_partitions:
            return self._load(key, None)
        partitions = context.asset_partition_keys
        if context.has_partition_key and len(partitions) == 1:
            return self._load(key, partitions[0])
        return {p: Artifact.from_json(json.loads(self._pointer(key, p).read_text()))
                for p in partitions if self._pointer(key, p).is_file()}

    def _load(self, key: list[str], partition: str | None) -> Artifact:
        pointer = self._pointer(key, partition)
        if not pointer.is_file():
            what = "/".join(key) + (f" partition {partition}" if partition else "")
            raise NotMaterializedError(f"{what} has not been materialized yet: materialize it "
                                       f"(or select it with its downstream assets) first",
                                       allow_retries=False)
        return Artifact.from_json(json.loads(pointer.read_text()))
