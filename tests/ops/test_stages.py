"""Content-addressed stages: a second call is a cache hit that does no work, and each stage's key
moves with exactly the inputs that change its output (ARCHITECTURE.md, "Data versions")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import tunegraph.ops.base_model
import tunegraph.ops.evaluate
import tunegraph.ops.merge
import tunegraph.ops.tokenize
import tunegraph.ops.train
from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops import stages
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.base_model import build_tiny_model
from tunegraph.ops.checkpoints import list_checkpoints
from tunegraph.ops.data import iter_texts

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}
STAGES = ("base", "tokenized", "train", "merged", "evals")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_data(folder: Path) -> Path:
    words = "hot cold big small milk ink sky snow".split()
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in words]
    rows += [{"instruction": "What number comes after this one?", "input": str(n),
              "output": str(n + 1)} for n in range(8)]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "sequence_len": 64,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "val_set_size": 4,
           "adapter": "lora", "lora_r": 2, "lora_alpha": 4, "lora_target_linear": True,
           "micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "bf16": False,
           "eval_max_new_tokens": 2, "eval_generation_rows": 2, "output_dir": "out", **keys}
    if raw["base_model"] != "tunegraph:tiny-llama":
        raw.pop("tiny_model")
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


def run_all(recipe: Recipe, store: ArtifactStore) -> dict[str, stages.StageResult]:
    base = stages.base_model_stage(recipe, store, "tiny")
    tokenized = stages.tokenized_stage(recipe, store, base.artifact)
    trained = stages.train_stage(recipe, store, base.artifact, tokenized.artifact)
    merged = stages.merge_stage(recipe, store, base.artifact, trained.artifact, tokenized.artifact)
    evals = stages.eval_stage(recipe, store, base.artifact, tokenized.artifact, merged.artifact)
    return dict(zip(STAGES, (base, tokenized, trained, merged, evals), strict=True))


def keys_of(results: dict[str, stages.StageResult]) -> dict[str, str]:
    return {name: result.artifact.key for name, result in results.items()}


def test_second_call_of_every_stage_is_a_cache_hit(tmp_path, monkeypatch):
    write_data(tmp_path)
    recipe, store = make(tmp_path), ArtifactStore(tmp_path / "store")
    first = run_all(recipe, store)
    assert not any(result.cache_hit for result in first.values())
    assert first["train"].metadata["num_steps"] == 2
    assert first["merged"].metadata["max_logit_diff_vs_unmerged"] < 1e-5
    mtimes = {name: r.artifact.path.stat().st_mtime_ns for name, r in first.items()}

    calls = []

    def must_not_run(name):
        return lambda *args, **kwargs: calls.append(name)

    for module, name in ((tunegraph.ops.base_model, "build_tiny_model"),
                         (tunegraph.ops.tokenize, "tokenize_dataset"),
                         (tunegraph.ops.train, "train"), (tunegraph.ops.merge, "merge_lora"),
                         (tunegraph.ops.merge, "max_logit_difference"),
                         (tunegraph.ops.evaluate, "evaluate")):
        monkeypatch.setattr(module, name, must_not_run(name))
    second = run_all(recipe, store)
    assert calls == []
    assert all(result.cache_hit for result in second.values())
    assert keys_of(second) == keys_of(first)
    assert {name: r.artifact.path.stat().st_mtime_ns for name, r in second.items()} == mtimes
    # A hit reports what the run that made the artifact reported (assets attach it as metadata).
    for name in STAGES:
        assert second[name].metadata == json.loads(json.dumps(first[name].metadata)), name


@pytest.fixture
def fake_work(monkeypatch):
    """Training, merging and evaluation replaced by stubs: these tests look at keys only."""
    def train(recipe, base_dir, tokenized_dir, out_dir, progress=None):
        (out_dir / "adapter").mkdir()
        (out_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
        metrics = {"num_steps": 2}
        (out_dir / "log.json").write_text(json.dumps({"metrics": metrics, "history": history}))
        return metrics

    def merge_lora(recipe, base_dir, adapter_dir, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(tunegraph.ops.train, "train", train)
    monkeypatch.setattr(tunegraph.ops.merge, "merge_lora", merge_lora)
    monkeypatch.setattr(tunegraph.ops.merge, "max_logit_difference", lambda *args: 0.0)
    monkeypatch.setattr(tunegraph.ops.evaluate, "evaluate", lambda *args: {"exact_match": 0.0})


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in STAGES if before[name] != after[name]}


@pytest.mark.usefixtures("fake_work")
def test_training_key_moves_only_training_and_after(tmp_path):
    write_data(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    reference = keys_of(run_all(make(tmp_path), store))
    after = keys_of(run_all(make(tmp_path, learning_rate=2e-2), store))
    assert changed(reference, after) == {"train", "merged", "evals"}


@pytest.mark.usefixtures("fake_work")
@pytest.mark.parametrize("keys", [{"output_dir": "elsewhere"}, {"logging_steps": 5}])
def test_keys_that_change_no_output_change_no_key(tmp_path, keys):
    write_data(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    reference = run_all(make(tmp_path), store)
    after = run_all(make(tmp_path, **keys), store)
    assert keys_of(after) == keys_of(reference)
    assert all(result.cache_hit for result in after.values())


@pytest.mark.usefixtures("fake_work")
def test_eval_key_moves_only_evals(tmp_path):
    write_data(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    reference = keys_of(run_all(make(tmp_path), store))
    after = keys_of(run_all(make(tmp_path, eval_max_new_tokens=3), store))
    assert changed(reference, after) == {"evals"}


@pytest.mark.usefixtures("fake_work")
@pytest.mark.parametrize("base", ["tiny", "local"])
def test_one_data_byte_moves_tokenized_and_after(tmp_path, base):
    """The tiny base model's tokenizer is trained on the data, so its key moves too; a local
    (or hub) base model's does not."""
    data = write_data(tmp_path)
    keys: dict[str, Any] = {}
    if base == "local":
        tiny = make(tmp_path)
        build_tiny_model(tiny, iter_texts(tiny), tmp_path / "local_model")
        keys["base_model"] = str(tmp_path / "local_model")
    store = ArtifactStore(tmp_path / "store")
    reference = keys_of(run_all(make(tmp_path, **keys), store))

    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert keys_of(run_all(make(tmp_path, **keys), store)) == reference

    content = data.read_bytes()
    assert content.count(b"milk") == 2
    data.write_bytes(content.replace(b"milk", b"silk"))  # one byte, in input and output
    after = keys_of(run_all(make(tmp_path, **keys), store))
    expected = {"tokenized", "train", "merged", "evals"} | ({"base"} if base == "tiny" else set())
    assert changed(reference, after) == expected


@pytest.mark.usefixtures("fake_work")
def test_each_checkpoint_has_its_own_eval_key_and_final_is_the_merged_models(tmp_path):
    """An eval's key holds the checkpoint's identity (train key, step); the final checkpoint's
    key is the one an eval of the merged model gets (what `tunegraph stage evaluate` runs)."""
    write_data(tmp_path)
    recipe, store = make(tmp_path), ArtifactStore(tmp_path / "store")
    results = run_all(recipe, store)
    checkpoints = list_checkpoints(results["train"].artifact, recipe.name)
    assert [(c.partition, c.step, c.loss) for c in checkpoints] == [("t__step-000001", 1, 2.0),
                                                                    ("t__final", 2, 1.0)]
    base, tokenized = results["base"].artifact, results["tokenized"].artifact
    keys = [stages.eval_stage(recipe, store, base, tokenized, c).artifact.key for c in checkpoints]
    assert len(set(keys)) == 2
    assert keys[1] == results["evals"].artifact.key
    assert stages.eval_stage(recipe, store, base, tokenized, checkpoints[1]).cache_hit


def test_a_failed_training_keeps_its_checkpoints_for_the_next_attempt(tmp_path, monkeypatch):
    write_data(tmp_path)
    recipe, store = make(tmp_path), ArtifactStore(tmp_path / "store")
    base = stages.base_model_stage(recipe, store, "tiny").artifact
    tokenized = stages.tokenized_stage(recipe, store, base).artifact

    def crash(recipe, base_dir, tokenized_dir, out_dir, progress=None):
        (out_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        raise RuntimeError("killed")

    monkeypatch.setattr(tunegraph.ops.train, "train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        stages.train_stage(recipe, store, base, tokenized)
    store.clean_partial()  # what removes crashed writes' temp folders leaves the work folder
    kept = list(store.root.rglob("checkpoint-1"))
    assert [k.relative_to(store.root).parts[:2] for k in kept] == [(stages.WORK, "adapters")]
    assert not any((store.root / "adapters").glob("*/manifest.json"))  # nothing published
