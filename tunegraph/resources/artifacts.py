"""The artifact store as a Dagster resource, and an IO manager that passes artifact handles.

Large things never go through the IO manager: an asset's output is an `Artifact` handle (kind,
content key, path); the IO manager stores that handle as a small JSON pointer per asset key, so a
later run that materializes only a downstream asset finds its inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext

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


class ArtifactIOManager(ConfigurableIOManager):
    """Stores each asset's `Artifact` handle as `<root>/_pointers/<asset key>.json`."""

    root: str = ""

    def _pointer(self, asset_path: list[str]) -> Path:
        return Path(self.root or default_artifacts_root()) / "_pointers" / ("/".join(asset_path) + ".json")

    def handle_output(self, context: OutputContext, obj: Artifact) -> None:
        assert isinstance(obj, Artifact), f"expected an Artifact, got {type(obj).__name__}"
        pointer = self._pointer(list(context.asset_key.path))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj.to_json()))
        os.replace(tmp, pointer)

    def load_input(self, context: InputContext) -> Artifact:
        key = list(context.asset_key.path)
        pointer = self._pointer(key)
        if not pointer.is_file():
            raise ValueError(f"{'/'.join(key)} has not been materialized yet: materialize it "
                             f"(or select it with its downstream assets) first")
        return Artifact.from_json(json.loads(pointer.read_text()))
