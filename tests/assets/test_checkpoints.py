"""Checkpoints as dynamic partitions, evals per checkpoint, reports and the checkpoint sensor, on
real (temporary SQLite) Dagster instances with a tiny model that trains 3 steps, saving each.

Artifacts are content-addressed, so each test starts from a fresh instance but the shared store:
what an earlier test computed is a cache hit here, and only Dagster's bookkeeping is redone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DagsterInstance, Definitions, build_sensor_context
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._utils.test.data_versions import get_stale_status_resolver

import tunegraph.ops.evaluate
import tunegraph.ops.train
from tunegraph.assets import base_model_asset, recipe_assets, report_assets
from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.checkpoints import MANIFEST
from tunegraph.pipelines import resources
from tunegraph.pipelines.backfill import materialize_in_order
from tunegraph.pipelines.checkpoint_sensor import checkpoint_eval_sensor

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}
PARTITIONS = ["t__step-000001", "t__step-000002", "t__final"]
EVAL, CHECKPOINTS = AssetKey(["t", "eval_scores"]), AssetKey(["t", "checkpoints"])
UPSTREAM = [AssetKey(["t", "tokenized_dataset"]), AssetKey(["t", "adapter"]),
            AssetKey(["t", "merged_model"])]



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    words = "hot cold big small milk ink sky snow".split()
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in words]
    rows += [{"instruction": "What number comes after this one?", "input": str(n),
              "output": str(n + 1)} for n in range(8)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def make(folder: Path, **keys) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "sequence_len": 64,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "val_set_size": 4,
           "adapter": "lora", "lora_r": 2, "lora_alpha": 4, "lora_target_linear": True,
           "micro_batch_size": 4, "max_steps": 3, "save_steps": 1, "learning_rate": 1e-2,
           "bf16": False, "eval_max_new_tokens": 2, "eval_generation_rows": 2,
           "output_dir": str(folder / "out"), **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


def training(recipe: Recipe) -> list[AssetKey]:
    """The training asset and what it needs."""
    return [base_model_asset(recipe).key, *UPSTREAM[:2]]


def assets_of(recipe: Recipe) -> list:
    return [base_model_asset(recipe), *recipe_assets(recipe), *report_assets([recipe])]


def run(folder: Path, instance: DagsterInstance, recipe: Recipe, keys=None,
        partitions=None) -> dict:
    """Materialize (all, or `keys`) in order; {(asset, partition): metadata}."""
    assets = assets_of(recipe)
    keys = keys or [k for a in assets for k in a.keys]
    outcome = materialize_in_order(assets, instance, resources(str(folder / "artifacts")), keys,
                                   partitions=partitions)
    assert outcome.success
    return {(e.asset_key.to_user_string(), e.step_materialization_data.materialization.partition):
            e.step_materialization_data.materialization.metadata
            for r in outcome.results for e in r.get_asset_materialization_events()}


@pytest.fixture
def instance(tmp_path: Path):
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        yield instance


def test_checkpoints_become_partitions_with_manifests_and_evals(folder, instance, monkeypatch):
    done = run(folder, instance, make(folder))
    assert list(instance.get_dynamic_partitions("t__checkpoints")) == PARTITIONS
    steps = {}
    for partition in PARTITIONS:
        checkpoint = done[("t/checkpoints", partition)]
        steps[partition] = checkpoint["step"].value
        manifest = json.loads((Path(checkpoint["path"].value) / MANIFEST).read_text())
        assert manifest["step"] == checkpoint["step"].value
        assert manifest["loss"] == pytest.approx(checkpoint["train_loss"].value)
        assert manifest["train_key"] == done[("t/adapter", None)]["artifact_key"].value
        record = instance.fetch_materializations(CHECKPOINTS, limit=5).records
        tags = {r.partition_key: r.asset_materialization.tags for r in record}
        assert tags[partition]["dagster/data_version"] == checkpoint["checkpoint_key"].value

        scores = done[("t/eval_scores", partition)]
        assert scores["step"].value == steps[partition]
        assert scores["checkpoint_key"].value == checkpoint["checkpoint_key"].value
        assert scores["trained/heldout_loss"].value > 0
    assert steps == dict(zip(PARTITIONS, [1, 2, 3], strict=True))
    eval_keys = {done[("t/eval_scores", p)]["artifact_key"].value for p in PARTITIONS}
    assert len(eval_keys) == 3  # the checkpoint's identity is in each eval's key

    report = done[("t/eval_report", None)]
    table = report["table"].value.splitlines()
    assert table[0].startswith("| step | checkpoint | train_loss | heldout_loss |")
    assert [row.split(" | ")[1] for row in table[2:]] == ["base model", *PARTITIONS]
    assert report["plot"].value.startswith("![t scores vs step](data:image/png;base64,")
    assert Path(report["plot_file"].value).read_bytes()[:4] == b"\x89PNG"
    assert report["num_checkpoints_evaluated"].value == 3
    assert done[("reports/eval_report", None)]["recipes"].value == "t"

    # Each checkpoint's eval is cached on its own: scoring again evaluates nothing.
    calls = []
    monkeypatch.setattr(tunegraph.ops.evaluate, "evaluate", lambda *a, **k: calls.append(a))
    again = run(folder, instance, make(folder), keys=[EVAL])
    assert calls == []
    assert all(again[("t/eval_scores", p)]["cache_hit"].value for p in PARTITIONS)


def stale(instance: DagsterInstance, recipe: Recipe) -> dict[str, StaleStatus]:
    resolver = get_stale_status_resolver(instance, assets_of(recipe))
    status = {key.to_user_string(): resolver.get_status(key) for key in UPSTREAM}
    status.update({p: resolver.get_status(EVAL, p) for p in PARTITIONS
                   if p in instance.get_dynamic_partitions("t__checkpoints")})
    return status


def test_a_new_eval_setting_makes_evals_stale_and_nothing_upstream(folder, instance, monkeypatch):
    run(folder, instance, make(folder))
    assert set(stale(instance, make(folder)).values()) == {StaleStatus.FRESH}

    changed = make(folder, eval_max_new_tokens=3)
    status = stale(instance, changed)
    assert {k: status[k.to_user_string()] for k in UPSTREAM} == {k: StaleStatus.FRESH
                                                                 for k in UPSTREAM}
    assert {p: status[p] for p in PARTITIONS} == {p: StaleStatus.STALE for p in PARTITIONS}

    trainings = []
    monkeypatch.setattr(tunegraph.ops.train, "train", lambda *a, **k: trainings.append(a))
    done = run(folder, instance, changed)
    assert trainings == []
    assert done[("t/adapter", None)]["cache_hit"].value is True
    assert not any(done[("t/eval_scores", p)]["cache_hit"].value for p in PARTITIONS)
    assert set(stale(instance, changed).values()) == {StaleStatus.FRESH}


def test_a_retrain_replaces_the_partitions_and_makes_their_evals_stale(folder, instance):
    run(folder, instance, make(folder))
    retrained = make(folder, learning_rate=2e-2, save_steps=2)
    run(folder, instance, retrained, keys=training(retrained))
    # step 1 was not saved by the new run: its partition is gone; the others are re-registered.
    assert list(instance.get_dynamic_partitions("t__checkpoints")) == ["t__step-000002", "t__final"]
    status = stale(instance, retrained)
    assert status["t__step-000002"] == status["t__final"] == StaleStatus.STALE

    # The report leaves out evals of the previous training's checkpoints.
    run(folder, instance, retrained, keys=[EVAL], partitions=["t__final"])
    report = run(folder, instance, retrained, keys=[AssetKey(["t", "eval_report"])])
    report = report[("t/eval_report", None)]
    assert report["num_checkpoints_evaluated"].value == 1
    assert report["not_evaluated"].value == "`t__step-000002`"


def sensor_tick(instance: DagsterInstance, recipe: Recipe):
    """One evaluation of the sensor against the instance, in Definitions as the daemon sees."""
    sensor = checkpoint_eval_sensor([recipe])
    definitions = Definitions(assets=assets_of(recipe), sensors=[sensor], resources=resources())
    # The daemon resolves dynamic partition keys against the instance; so does this test.
    with partition_loading_context(dynamic_partitions_store=instance):
        return sensor.evaluate_tick(build_sensor_context(instance=instance,
                                                         definitions=definitions))


def test_the_sensor_requests_evals_of_new_checkpoints_then_the_reports(folder, instance):
    recipe = make(folder)
    run(folder, instance, recipe, keys=training(recipe))
    first = sensor_tick(instance, recipe).run_requests
    assert [(r.partition_key, r.asset_selection) for r in first] == [(p, [EVAL])
                                                                     for p in PARTITIONS]
    assert len({r.run_key for r in first}) == 3

    run(folder, instance, recipe, keys=[EVAL])  # what the daemon would launch
    requests = sensor_tick(instance, recipe).run_requests
    assert [r.asset_selection for r in requests] == [[AssetKey(["t", "eval_report"])]]

    run(folder, instance, recipe, keys=[AssetKey(["t", "eval_report"])])
    requests = sensor_tick(instance, recipe).run_requests
    assert [r.asset_selection for r in requests] == [[AssetKey(["reports", "eval_report"])]]

    run(folder, instance, recipe, keys=[AssetKey(["reports", "eval_report"])])
    tick = sensor_tick(instance, recipe)
    assert tick.run_requests == [] and "every checkpoint is evaluated" in tick.skip_message

    # A retrain registers new checkpoints: their evals are requested again, under new run keys.
    retrained = make(folder, learning_rate=2e-2)
    run(folder, instance, retrained, keys=training(retrained))
    again = sensor_tick(instance, recipe).run_requests
    assert [r.partition_key for r in again] == PARTITIONS
    assert not {r.run_key for r in again} & {r.run_key for r in first}
