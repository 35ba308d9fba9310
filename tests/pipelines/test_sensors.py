"""The data-folder sensor (tunegraph/pipelines/sensors.py), evaluated with build_sensor_context
against a real instance after a real materialization. The recipe reads a folder and starts from a
local base model folder (not built from the data), so a data edit makes exactly the tokenized
dataset and what follows it stale."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dagster import DefaultSensorStatus, build_sensor_context
from recipes_support import materialize_with_checks, write_tiny_recipe

from tunegraph.config import load_recipe
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.stages import base_model_stage, model_dir
from tunegraph.pipelines import build_definitions, embedded_instance
from tunegraph.resources import ArtifactStoreResource

# The evals of the retrained checkpoints follow from the checkpoint sensor once training ran.
RETRAIN = {"tiny/tokenized_dataset", "tiny/adapter", "tiny/merged_model"}


def _local_base_model(folder: Path) -> None:
    """A model folder as a user would have one: the tiny model, built once, copied to base/."""
    built = load_recipe(write_tiny_recipe(folder / "prep"))
    artifact = base_model_stage(built, ArtifactStore(folder / "prep" / "store"), "prep").artifact
    shutil.copytree(model_dir(artifact), folder / "base")


def test_data_sensor_requests_a_retrain_when_a_file_changes(tmp_path: Path):
    _local_base_model(tmp_path)
    recipe_path = write_tiny_recipe(tmp_path, base_model="base", tiny_model=None,
                                    datasets=[{"path": "data", "type": "alpaca"}])
    artifacts = tmp_path / "artifacts"
    data = tmp_path / "data" / "rows.jsonl"
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        assert materialize_with_checks(recipe_path, instance, artifacts).success
        sensor = build_definitions([load_recipe(recipe_path)]).resolve_sensor_def(
            "tiny_data_sensor")
        assert sensor.default_status == DefaultSensorStatus.STOPPED
        assert sensor.minimum_interval_seconds == 60

        def tick(cursor: str | None):
            with build_sensor_context(instance=instance, cursor=cursor, resources={
                    "artifact_store": ArtifactStoreResource(root=str(artifacts))}) as context:
                return sensor.evaluate_tick(context)

        first = tick(None)
        assert first.run_requests == [] and "watching 1 data file" in first.skip_message
        same = tick(first.cursor)
        assert same.run_requests == [] and "no data file changed" in same.skip_message

        # Touched with the same bytes, and a file the recipe does not read: no change.
        os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
        (tmp_path / "data" / "NOTES.md").write_text("not data\n")
        touched = tick(same.cursor)
        assert touched.run_requests == [] and "no data file changed" in touched.skip_message

        original = data.read_bytes()
        data.write_bytes(original.replace(b'"cold"', b'"cool"', 1))
        edited = tick(touched.cursor)
        [request] = edited.run_requests
        assert {k.to_user_string() for k in request.asset_selection} == RETRAIN
        assert request.tags["tunegraph/changed_files"] == str(data)
        assert request.tags["tunegraph/trigger"] == "data_sensor"
        # The run key is the data's state: evaluating the same tick again asks for the same run.
        assert tick(touched.cursor).run_requests[0].run_key == request.run_key

        # A new file in the watched folder is new data too.
        (tmp_path / "data" / "more.jsonl").write_text(
            '{"instruction": "Give the opposite word.", "input": "dry", "output": "wet"}\n')
        [added] = tick(edited.cursor).run_requests
        assert {k.to_user_string() for k in added.asset_selection} == RETRAIN
        assert added.run_key != request.run_key

        # Back to the materialized bytes: the files changed, yet every stage is current.
        (tmp_path / "data" / "more.jsonl").unlink()
        data.write_bytes(original)
        back = tick(edited.cursor)
        assert back.run_requests == [] and "every asset is current" in back.skip_message


def test_recipes_on_hub_data_get_no_data_sensor(tmp_path: Path):
    local = load_recipe(write_tiny_recipe(tmp_path, name="local"))
    hub = load_recipe(write_tiny_recipe(tmp_path, name="hub", base_model="org/some-model",
                                        tiny_model=None,
                                        datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}]))
    names = {s.name for s in build_definitions([local, hub]).sensors}
    assert {n for n in names if n.endswith("_data_sensor")} == {"local_data_sensor"}
