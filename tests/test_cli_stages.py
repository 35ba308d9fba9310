"""`tunegraph stage ...`: stages without Dagster, their `--out` copies, and the errors a user can
cause (wrong folder, wrong kind, mismatched lineage, a folder that is not an artifact)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunegraph.cli import main
from tunegraph.cli_stages import numeric_scores, publish
from tunegraph.config import base_model_slug, load_recipe
from tunegraph.ops.artifacts import Artifact, ArtifactStore
from tunegraph.ops.stages import base_model_stage, tokenized_stage


def _run(*args: str):
    return CliRunner().invoke(main, ["stage", *args], catch_exceptions=False)


def _fake_artifact(folder: Path, kind: str, key: str, **inputs: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"kind": kind, "key": key,
                                                      "inputs": inputs, "files": {}}))
    return folder


def test_preprocess_without_dagster_copies_the_stores_artifact(quickstart_copy: Path, home: Path,
                                                               tmp_path: Path):
    result = _run("preprocess", str(quickstart_copy), "--out", "out/tokenized")
    assert result.exit_code == 0, result.output
    assert "quickstart/tokenized_dataset" in result.output and "cached False" in result.output
    # The base model was left out: its stage ran in the store, as the Dagster asset's does.
    recipe = load_recipe(quickstart_copy)
    store = ArtifactStore(home / "artifacts")
    base = base_model_stage(recipe, store, base_model_slug(recipe))
    tokenized = tokenized_stage(recipe, store, base.artifact)
    assert base.cache_hit and tokenized.cache_hit
    out = tmp_path / "out" / "tokenized"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["kind"], manifest["key"]) == ("tokenized", tokenized.artifact.key)
    assert manifest == json.loads((tokenized.artifact.path / "manifest.json").read_text())
    assert (out / "train.parquet").read_bytes() == \
        (tokenized.artifact.path / "train.parquet").read_bytes()

    (out / "stale-file").write_text("x")  # a previous copy is replaced, not merged into
    result = _run("preprocess", str(quickstart_copy), "--out", "out/tokenized")
    assert result.exit_code == 0 and "cached True" in result.output
    assert not (out / "stale-file").exists() and (out / "train.parquet").is_file()


def test_upstream_folders_are_checked(quickstart_copy: Path, home: Path, tmp_path: Path):
    recipe = str(quickstart_copy)
    base = _fake_artifact(tmp_path / "base", "base_models", "b1")
    result = _run("train", recipe, "--base-model", str(base), "--tokenized", str(tmp_path))
    assert result.exit_code == 1
    assert f"--tokenized {tmp_path}: not a tunegraph artifact folder" in result.output

    result = _run("train", recipe, "--base-model", str(base), "--tokenized", str(base))
    assert result.exit_code == 1
    assert "holds a 'base_models' artifact, expected 'tokenized'" in result.output

    other = _fake_artifact(tmp_path / "tok", "tokenized", "t1", base_model="b0")
    result = _run("train", recipe, "--base-model", str(base), "--tokenized", str(other))
    assert result.exit_code == 1
    assert "was made from base_model b0, but this run's base_model is b1" in result.output


def test_user_mistakes_are_one_line_errors(quickstart_copy: Path, home: Path, tmp_path: Path):
    result = _run("preprocess", str(quickstart_copy), "--learning-rte", "1")
    assert result.exit_code == 1 and "learning_rte: unknown key" in result.output

    (tmp_path / "full.yaml").write_text("base_model: tunegraph:tiny-llama\nlearning_rate: 0.001\n"
                                        "datasets:\n  - path: data/quickstart.jsonl\n"
                                        "    type: alpaca\n")
    result = _run("merge", str(tmp_path / "full.yaml"))
    assert result.exit_code == 1 and "recipe full is a full fine-tune" in result.output

    artifact_dir = _fake_artifact(tmp_path / "a", "tokenized", "k")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--out .*mine: exists and is not a tunegraph artifact"):
        publish(Artifact("tokenized", "k", artifact_dir), keep)
    assert (keep / "notes.txt").read_text() == "mine"


def test_numeric_scores_keep_the_numbers_for_dvc_metrics():
    scores = {"base": {"heldout_loss": 2.5, "samples": [{"a": 1}], "exact_match": 0.0},
              "trained": {"heldout_loss": 1.5, "tasks": {"qa": {"accuracy": 1.0, "name": "qa"}}},
              "heldout_loss_delta": -1.0, "ok": True}
    assert numeric_scores(scores) == {"base": {"heldout_loss": 2.5, "exact_match": 0.0},
                                      "trained": {"heldout_loss": 1.5,
                                                  "tasks": {"qa": {"accuracy": 1.0}}},
                                      "heldout_loss_delta": -1.0}
