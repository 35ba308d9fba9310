"""The repository's dvc.yaml, run by real `dvc repro` without Dagster on a tiny quickstart in a
temporary git repository: every stage's artifact has the content key Dagster gives the same recipe
and the same file hashes; `dvc push` to a local remote leaves `dvc status -c` clean; a fresh clone
pulls the outputs and finds the pipeline up to date."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from dagster import AssetSelection, DagsterInstance, materialize
from dvc_support import dvc, git, init_repo

from tests_support import EXAMPLES, REPO
from tunegraph.config import load_recipe
from tunegraph.ops.checkpoints import partition_key
from tunegraph.pipelines import assets_for, resources

# The quickstart's model and data; few steps, few generated answers.
TINY = {"max_steps": 2, "micro_batch_size": 4, "eval_generation_rows": 4,
        "eval_max_new_tokens": 4}
OUT = "dvc_outputs/quickstart"   # params.yaml's `out`
STAGE_ASSETS = {"base_model": "base_models/", "tokenized_dataset": "quickstart/tokenized_dataset",
                "adapter": "quickstart/adapter", "merged_model": "quickstart/merged_model",
                "eval_scores": "quickstart/eval_scores"}
# Files of a training artifact whose bytes depend on the run, not on the content key: the
# Trainer's train_runtime and tokens/s (log.json, metrics.json, each checkpoint's
# trainer_state.json, whose log history counts tokens seen); the base model's absolute path, which PEFT
# writes into adapter_config.json and README.md, and the pickled TrainingArguments (output paths).
# PEFT also writes target_modules, a set, in the process's string-hash order. The weights, the
# optimizer and RNG states and the tokenizer are byte-identical.
RUN_LOCAL_FILES = {"log.json", "metrics.json", "adapter_config.json", "README.md",
                   "training_args.bin", "trainer_state.json"}


def _adapter_config(path: Path) -> dict:
    """adapter_config.json without what depends on the run: where the base model was read."""
    config = json.loads(path.read_text())
    config.pop("base_model_name_or_path")
    return {**config, "target_modules": sorted(config["target_modules"])}


def _make_repo(path: Path) -> Path:
    init_repo(path)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    shutil.copytree(REPO / "tunegraph" / "ops", path / "tunegraph" / "ops",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (path / "examples" / "data").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart.jsonl", path / "examples" / "data")
    recipe = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    (path / "examples" / "quickstart.yaml").write_text(yaml.safe_dump({**recipe, **TINY},
                                                                      sort_keys=False))
    git(path, "add", "-A")
    git(path, "commit", "-qm", "tiny quickstart")
    return path


def _dagster_keys(recipe_path: Path, artifacts: Path) -> dict[str, str]:
    """Materialize the same recipe through Dagster: {asset key: its artifact's content key}."""
    recipe = load_recipe(recipe_path, {"output_dir": str(artifacts.parent / "exported")})
    assets = assets_for([recipe])
    stages = [k for a in assets for k in a.keys
              if k.to_user_string().startswith(tuple(STAGE_ASSETS.values()))]
    eval_key = next(k for k in stages if k.path[-1] == "eval_scores")
    with DagsterInstance.ephemeral() as instance:
        first = materialize(assets, instance=instance, resources=resources(str(artifacts)),
                            selection=AssetSelection.assets(*[k for k in stages if k != eval_key]))
        evals = materialize(assets, instance=instance, resources=resources(str(artifacts)),
                            selection=AssetSelection.assets(eval_key),
                            partition_key=partition_key(recipe.name, None))
    assert first.success and evals.success
    return {event.asset_key.to_user_string():
            event.step_materialization_data.materialization.metadata["artifact_key"].value
            for result in (first, evals) for event in result.get_asset_materialization_events()
            if event.asset_key in stages}


@pytest.mark.slow
def test_dvc_repro_gives_dagsters_artifacts_and_pushes(tmp_path: Path):
    repo = _make_repo(tmp_path / "repo")
    dvc_home = str(tmp_path / "dvc_home")   # its own artifact store: nothing shared with Dagster
    dvc(repo, "repro", TUNEGRAPH_HOME=dvc_home)

    store = tmp_path / "dagster_store"
    dagster = _dagster_keys(repo / "examples" / "quickstart.yaml", store)
    for out, asset in STAGE_ASSETS.items():
        manifest = json.loads((repo / OUT / out / "manifest.json").read_text())
        (dagster_key,) = [dagster[k] for k in dagster if k.startswith(asset)]
        assert manifest["key"] == dagster_key, out
        expected = json.loads((store / manifest["kind"] / dagster_key / "manifest.json").read_text())
        files, expected_files = manifest["files"], expected["files"]
        assert files.keys() == expected_files.keys(), out
        differing = {f for f in files if files[f] != expected_files[f]}
        assert {Path(f).name for f in differing} <= RUN_LOCAL_FILES, (out, differing)
        assert not differing or out == "adapter", (out, differing)
        for name in (f for f in differing if f.endswith("adapter_config.json")):
            assert _adapter_config(repo / OUT / out / name) == \
                _adapter_config(store / manifest["kind"] / dagster_key / name)
    weights = json.loads((repo / OUT / "adapter" / "manifest.json").read_text())["files"]
    assert "adapter/adapter_model.safetensors" in weights  # compared above: equal bytes
    metrics = json.loads((repo / OUT / "metrics.json").read_text())
    scores = json.loads((repo / OUT / "eval_scores" / "scores.json").read_text())
    assert metrics["trained"]["heldout_loss"] == scores["trained"]["heldout_loss"]

    # Nothing changed: DVC runs nothing.
    assert "didn't change, skipping" in dvc(repo, "repro", TUNEGRAPH_HOME=dvc_home)
    assert json.loads(dvc(repo, "status", "--json")) == {}

    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    dvc(repo, "push")
    assert any(p.is_file() for p in remote.rglob("*"))
    assert json.loads(dvc(repo, "status", "-c", "--json")) == {}
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "dvc repro")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    dvc(clone, "pull")
    for out in STAGE_ASSETS:
        assert (clone / OUT / out / "manifest.json").read_bytes() == \
            (repo / OUT / out / "manifest.json").read_bytes()
    assert json.loads(dvc(clone, "status", "--json")) == {}
