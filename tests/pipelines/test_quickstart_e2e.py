"""The quickstart through Dagster, end to end, on a real (temporary) SQLite instance.

Every asset materializes (eval_scores once per checkpoint partition, then the eval report);
training lowers held-out loss; the merged model equals base+adapter; manifests exist; a second
materialization with nothing changed trains nothing; one changed byte in the data file
re-tokenizes and retrains.
"""

import json
from pathlib import Path

import pytest
from dagster import DagsterInstance

import tunegraph.ops.train as train_module
from tunegraph.config import load_recipe
from tunegraph.pipelines import assets_for, embedded_instance, resources
from tunegraph.pipelines.backfill import materialize_in_order

# A tiny size of the quickstart: its real model and data, fewer steps.
TINY = {"max_steps": 40, "save_steps": 20}


def _materialize(recipe_path: Path, artifacts: Path, instance: DagsterInstance, **overrides):
    recipe = load_recipe(recipe_path, {**TINY, "output_dir": str(artifacts.parent / "out"),
                                       **overrides})
    assets = assets_for([recipe])
    outcome = materialize_in_order(assets, instance, resources(str(artifacts)),
                                   [k for a in assets for k in a.keys])
    assert outcome.success
    materialized = {}
    for result in outcome.results:
        for event in result.get_asset_materialization_events():
            mat = event.step_materialization_data.materialization
            name = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
            materialized[name] = mat.metadata
    return materialized


@pytest.fixture
def counted_training(monkeypatch):
    """Counts calls of the training op (the real one runs)."""
    calls = []
    real = train_module.train

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", counting)
    return calls


def test_quickstart_materializes_trains_and_caches(quickstart_copy: Path, tmp_path: Path,
                                                   counted_training):
    artifacts = tmp_path / "artifacts"
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        first = _materialize(quickstart_copy, artifacts, instance)
        keys = set(first)
        # 40 steps, a checkpoint every 20: step 20, and step 40 which is the final model.
        checkpoints = ["quickstart__step-000020", "quickstart__final"]
        assert keys == {"quickstart/tokenized_dataset", "quickstart/adapter",
                        "quickstart/merged_model", "quickstart/eval_report",
                        *(f"quickstart/{asset}[{p}]" for p in checkpoints
                          for asset in ("checkpoints", "eval_scores")),
                        next(k for k in keys if k.startswith("base_models/tiny_llama_"))}
        assert list(instance.get_dynamic_partitions("quickstart__checkpoints")) == checkpoints
        assert all(meta["cache_hit"].value is False for meta in first.values()
                   if "cache_hit" in meta)
        assert len(counted_training) == 1

        early = first["quickstart/eval_scores[quickstart__step-000020]"]
        scores = first["quickstart/eval_scores[quickstart__final]"]
        assert scores["trained/heldout_loss"].value < early["trained/heldout_loss"].value
        report = first["quickstart/eval_report"]["table"].value
        assert "| 20 | quickstart__step-000020 |" in report and "| 40 | quickstart__final |" in report
        base_loss = scores["base/heldout_loss"].value
        trained_loss = scores["trained/heldout_loss"].value
        assert trained_loss < base_loss - 1.0, (base_loss, trained_loss)
        assert 0.0 <= scores["trained/exact_match"].value <= 1.0

        merged = first["quickstart/merged_model"]
        assert merged["max_logit_diff_vs_unmerged"].value <= 1e-5

        for meta in (m for m in first.values() if "cache_hit" in m):
            manifest = json.loads((Path(meta["path"].value) / "manifest.json").read_text())
            assert manifest["files"] and manifest["libraries"]["torch"]
        adapter_manifest = json.loads(
            (Path(first["quickstart/adapter"]["path"].value) / "manifest.json").read_text())
        assert adapter_manifest["recipe"]["learning_rate"] == 0.003
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()

        # Nothing changed: every stage is a cache hit and training does not run.
        second = _materialize(quickstart_copy, artifacts, instance)
        assert all(meta["cache_hit"].value is True for meta in second.values()
                   if "cache_hit" in meta)
        assert {k: m["artifact_key"].value for k, m in second.items() if "artifact_key" in m} == \
            {k: m["artifact_key"].value for k, m in first.items() if "artifact_key" in m}
        assert len(counted_training) == 1

        # The materializations carry data versions equal to the content keys.
        record = instance.get_latest_materialization_event(
            next(a.key for a in assets_for([load_recipe(quickstart_copy)])
                 if a.key.to_user_string() == "quickstart/adapter"))
        assert record.asset_materialization.tags["dagster/data_version"] == \
            first["quickstart/adapter"]["artifact_key"].value

        # One byte of the data file changes: re-tokenize and retrain.
        data = quickstart_copy.parent / "data" / "quickstart.jsonl"
        data.write_bytes(data.read_bytes().replace(b'"milk"', b'"silk"', 1))
        third = _materialize(quickstart_copy, artifacts, instance)
        assert third["quickstart/tokenized_dataset"]["cache_hit"].value is False
        assert third["quickstart/adapter"]["cache_hit"].value is False
        assert len(counted_training) == 2


def test_learning_rate_change_retrains_but_keeps_tokens(quickstart_copy: Path, tmp_path: Path,
                                                        counted_training):
    artifacts = tmp_path / "artifacts"
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        first = _materialize(quickstart_copy, artifacts, instance, max_steps=4, save_steps=None)
        second = _materialize(quickstart_copy, artifacts, instance, max_steps=4, save_steps=None,
                              learning_rate=0.001)
    assert second["quickstart/tokenized_dataset"]["cache_hit"].value is True
    assert second["quickstart/tokenized_dataset"]["artifact_key"].value == \
        first["quickstart/tokenized_dataset"]["artifact_key"].value
    assert second["quickstart/adapter"]["cache_hit"].value is False
    assert len(counted_training) == 2
