"""The pipeline's stages, content-addressed: compute a stage's key from its inputs, return the
stored artifact if that key exists (a cache hit: no work), else do the work and store it.

Assets, the CLI and `dvc repro` all call these, so they share one cache and produce the same
artifacts. A stage's key is the hash of: its upstream artifacts' keys, the recipe keys that affect
it, and its code version — never of keys that do not change its output (`learning_rate` does not
reach the tokenized data; `output_dir` reaches nothing).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegraph import __version__
from tunegraph.config import TINY_LLAMA, Recipe
from tunegraph.config.schema import (
    AdapterConcern,
    DistributedConcern,
    EvalConcern,
    TrainingConcern,
)
from tunegraph.ops.artifacts import Artifact, ArtifactStore
from tunegraph.ops.checkpoints import Checkpoint, list_checkpoints, write_checkpoint_manifests
from tunegraph.ops.distributed import deepspeed_fingerprint
from tunegraph.ops.hashing import hash_file, hash_json, list_files, short
from tunegraph.ops.launch import Launcher

Progress = Callable[[str, int, int], None]
logger = logging.getLogger(__name__)
# Bump when the built model or its tokenizer changes for the same inputs (2: tokenizer learns
# Alpaca rows with their prompt template).
BASE_MODEL_CODE_VERSION = "2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Keys that change no stage's output: where results are exported, how often to print.
NOT_HASHED = frozenset({"output_dir", "logging_steps"})
# Which model-loading keys change training (the base model's identity is its artifact key).
MODEL_LOADING_KEYS = ("model_type", "attn_implementation", "flash_attention", "sdp_attention",
                      "trust_remote_code")
# Beside the published artifacts: stages' working folders that must outlive a failed attempt.
WORK = "_work"


@dataclass
class StageResult:
    artifact: Artifact
    cache_hit: bool
    metadata: dict[str, Any] = field(default_factory=dict)


def _resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    return {"name": recipe.name, "source": str(recipe.source_path), **recipe.model_dump(mode="json")}


def model_dir(base: Artifact) -> Path:
    """Where a base model's weights are: in the store (tiny), or the referenced hub/local folder."""
    reference = base.path / "reference.json"
    if reference.is_file():
        return Path(json.loads(reference.read_text())["model_dir"])
    return base.path


def tokenizer_files_hash(directory: Path) -> dict[str, str]:
    return {p.name: hash_file(p) for p in list_files(directory) if p.name in TOKENIZER_FILES}


def _pretrained_fingerprint(directory: Path) -> dict[str, Any]:
    # Weights can be tens of GB: hash small files fully and large ones by size and mtime. A hub
    # snapshot's folder name is already the commit hash, which the path carries.
    files = {}
    for path in list_files(directory):
        stat = path.stat()
        rel = str(path.relative_to(directory))
        files[rel] = hash_file(path) if stat.st_size < (64 << 20) else f"{stat.st_size}:{stat.st_mtime_ns}"
    return {"model_dir": str(directory), "files": files}


def base_model_stage(recipe: Recipe, store: ArtifactStore, slug: str,
                     progress: Progress | None = None) -> StageResult:
    """The base model: build the tiny model locally, or reference a hub/local model."""
    from tunegraph.ops.data import data_fingerprint, iter_texts

    if recipe.base_model == TINY_LLAMA:
        assert recipe.tiny_model is not None
        inputs = {"tiny_model": recipe.tiny_model.model_dump(), "seed": recipe.seed,
                  "data": data_fingerprint(recipe), "code": BASE_MODEL_CODE_VERSION}
    else:
        from tunegraph.ops.base_model import locate_pretrained

        inputs = {"pretrained": _pretrained_fingerprint(locate_pretrained(recipe)),
                  "config": recipe.base_model_config, "code": BASE_MODEL_CODE_VERSION}
    key = short(hash_json(inputs))
    if found := store.get("base_models", key):
        return StageResult(found, True, {"slug": slug})
    manifest = {"slug": slug, "base_model": recipe.base_model, "inputs": inputs}
    with store.write("base_models", key, manifest) as out:
        if recipe.base_model == TINY_LLAMA:
            from tunegraph.ops.base_model import build_tiny_model

            if progress:
                progress("base_model", 0, 1)
            build_tiny_model(recipe, iter_texts(recipe), out)
        else:
            (out / "reference.json").write_text(json.dumps({"model_dir":
                                                             inputs["pretrained"]["model_dir"]}))
    artifact = store.get("base_models", key)
    assert artifact is not None
    return StageResult(artifact, False, {"slug": slug})


def tokenized_stage(recipe: Recipe, store: ArtifactStore, base: Artifact,
                    progress: Progress | None = None) -> StageResult:
    from tunegraph.ops.tokenize import tokenization_fingerprint, tokenize_dataset

    source = model_dir(base)
    fingerprint = tokenization_fingerprint(recipe, tokenizer_files_hash(source))
    key = short(hash_json(fingerprint))
    if found := store.get("tokenized", key):
        return StageResult(found, True, _stats(found))
    manifest = {"recipe": _resolved_recipe(recipe), "inputs": {"base_model": base.key,
                                                               "fingerprint": fingerprint}}
    with store.write("tokenized", key, manifest) as out:
        tokenize_dataset(recipe, source, out, progress)
    artifact = store.get("tokenized", key)
    assert artifact is not None
    return StageResult(artifact, False, _stats(artifact))


def _stats(artifact: Artifact) -> dict[str, Any]:
    return _read_json(artifact, "stats.json")


def _read_json(artifact: Artifact, name: str) -> dict[str, Any]:
    return json.loads((artifact.path / name).read_text())


def training_key_values(recipe: Recipe) -> dict[str, Any]:
    # Kernels as the options they resolve to (`liger_rms_norm: true` and `kernels: {rms_norm:
    # true}` are one setting), and only when one is on: recipes without kernels keep their keys.
    values = recipe.concern_values(AdapterConcern, TrainingConcern)
    if (kernels := recipe.kernel_options()).any_on:
        values["kernels"] = kernels.model_dump(mode="json")
        if not kernels.adamw_master_weights:  # a newer key: off keeps older recipes' keys
            values["kernels"].pop("adamw_master_weights")
    values.update({k: getattr(recipe, k) for k in MODEL_LOADING_KEYS})
    # Sharding keys only when set, so single-process recipes keep the keys they had.
    values.update({k: v for k, v in recipe.concern_values(DistributedConcern).items()
                   if v is not None})
    if recipe.deepspeed:
        values["deepspeed_config"] = deepspeed_fingerprint(recipe)  # the JSON's content
    if values.get("lora_target_parameters") is None:  # a newer key: unset keeps older keys
        values.pop("lora_target_parameters", None)
    from tunegraph.ops.train import lora_base_dtype

    if (dtype := lora_base_dtype(recipe)) is not None:  # the frozen base in half precision
        values["lora_base_dtype"] = str(dtype).removeprefix("torch.")
    return {k: v for k, v in values.items() if k not in NOT_HASHED}


def train_stage(recipe: Recipe, store: ArtifactStore, base: Artifact, tokenized: Artifact,
                progress: Progress | None = None, launcher: Launcher | None = None
                ) -> StageResult:
    """Train (or return the cached training of the same inputs). `launcher` runs it on several
    processes; their number is part of the key (the global batch is micro_batch_size x
    gradient_accumulation_steps x processes)."""
    from tunegraph.ops.train import TRAIN_CODE_VERSION

    launcher = launcher or Launcher()
    inputs = {"base_model": base.key, "tokenized": tokenized.key,
              "keys": training_key_values(recipe), "code": TRAIN_CODE_VERSION,
              "tunegraph": __version__}
    if launcher.spec.world_size > 1:
        inputs["world_size"] = launcher.spec.world_size
    kind = "adapters" if recipe.is_lora else "models"
    key = short(hash_json(inputs))
    if found := store.get(kind, key):
        return StageResult(found, True, _read_json(found, "metrics.json"))
    with store.write(kind, key, {"recipe": _resolved_recipe(recipe), "inputs": inputs}) as out:
        # Train in a folder named by the key, not in `out` (the store drops it on an error): a
        # failed attempt's checkpoints stay there, and the next attempt resumes from the last.
        work = work_dir(store, kind, key)
        work.mkdir(parents=True, exist_ok=True)
        from tunegraph.ops.train import discard_incomplete_checkpoints

        if removed := discard_incomplete_checkpoints(work / "checkpoints"):
            logger.warning(f"removed checkpoints a failed attempt left unfinished: {removed}")
        metrics = launcher.train(recipe, model_dir(base), tokenized.path, work, progress)
        write_checkpoint_manifests(work, key, kind)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for child in sorted(work.iterdir()):
            child.rename(out / child.name)  # same file system: moves, never copies weights
    shutil.rmtree(work)
    artifact = store.get(kind, key)
    assert artifact is not None
    # Read back, so a miss reports exactly what a later hit will (JSON turns tuples into lists).
    return StageResult(artifact, False, _read_json(artifact, "metrics.json"))


def trained_weights_dir(trained: Artifact) -> Path:
    """The folder `from_pretrained` loads: the adapter, or the fully fine-tuned model."""
    return trained.path / ("adapter" if trained.kind == "adapters" else "model")


def merge_inputs(base: Artifact, adapter_key: str) -> dict[str, Any]:
    from tunegraph.ops.merge import MERGE_CODE_VERSION

    return {"base_model": base.key, "adapter": adapter_key, "code": MERGE_CODE_VERSION}


def merge_stage(recipe: Recipe, store: ArtifactStore, base: Artifact, adapter: Artifact,
                tokenized: Artifact) -> StageResult:
    """Merge a LoRA adapter; the metadata carries the base+adapter vs merged logit difference."""
    from tunegraph.ops.merge import max_logit_difference, merge_lora
    from tunegraph.ops.tokenize import load_tokenized

    if adapter.kind != "adapters":
        raise ValueError("adapter: merge-lora needs a LoRA recipe (adapter: lora); a full "
                         "fine-tune is already a complete model")
    inputs = merge_inputs(base, adapter.key)
    key = short(hash_json(inputs))
    if found := store.get("merged", key):
        return StageResult(found, True, _read_json(found, "checks.json"))
    with store.write("merged", key, {"recipe": _resolved_recipe(recipe), "inputs": inputs}) as out:
        merge_lora(recipe, model_dir(base), trained_weights_dir(adapter), out)
        rows = load_tokenized(tokenized.path, "validation")
        rows = rows if len(rows) else load_tokenized(tokenized.path, "train")
        sample = [r["input_ids"] for r in rows.select(range(min(4, len(rows))))]
        diff = max_logit_difference(recipe, model_dir(base), trained_weights_dir(adapter), out,
                                    sample)
        checks = {"max_logit_diff_vs_unmerged": diff}
        (out / "checks.json").write_text(json.dumps(checks))
    artifact = store.get("merged", key)
    assert artifact is not None
    return StageResult(artifact, False, checks)


def work_dir(store: ArtifactStore, kind: str, key: str) -> Path:
    """A stage's working folder for one key: stable across attempts, outside the artifacts."""
    return store.root / WORK / kind / key


@contextmanager
def _scorable_weights(recipe: Recipe, store: ArtifactStore, base: Artifact,
                      checkpoint: Checkpoint) -> Iterator[Path]:
    """A folder `from_pretrained` loads as the checkpoint's model: a full fine-tune's checkpoint
    as it is; a LoRA checkpoint merged into the base weights in a scratch folder (PEFT
    merge_and_unload; logits equal base+adapter within 1e-5), removed afterwards."""
    if not checkpoint.is_adapter:
        yield checkpoint.path
        return
    if checkpoint.final and (merged := store.get("merged", short(hash_json(
            merge_inputs(base, checkpoint.train_key))))):
        yield merged.path  # the merged_model asset's artifact: the same merge, done already
        return
    from tunegraph.ops.merge import merge_lora

    scratch_root = store.root / WORK / "evals"
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"merge-{checkpoint.key}-", dir=scratch_root))
    try:
        merge_lora(recipe, model_dir(base), checkpoint.path, scratch)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def eval_inputs(recipe: Recipe, base: Artifact, tokenized: Artifact,
                checkpoint: Checkpoint) -> dict[str, Any]:
    """What an eval's key hashes: the models (base, and the checkpoint by its identity), the
    held-out rows, and every eval setting; the eval_scores asset's code version hashes the
    last two of these, so a new eval setting re-runs evals and nothing upstream."""
    from tunegraph.ops.eval_tasks import suite_fingerprint
    from tunegraph.ops.evaluate import EVAL_CODE_VERSION

    return {"base_model": base.key, "tokenized": tokenized.key, "checkpoint": checkpoint.identity,
            "keys": recipe.concern_values(EvalConcern),
            # Content hashes of eval_tasks files and lm-eval task folders/data: editing one
            # re-runs evals.
            "suite_files": suite_fingerprint(recipe),
            "eval_batch_size": recipe.eval_batch_size or recipe.micro_batch_size,
            "code": EVAL_CODE_VERSION}


def final_checkpoint(recipe: Recipe, store: ArtifactStore, model: Artifact) -> Checkpoint:
    """The final checkpoint of a training artifact, or of the adapter a merged model holds."""
    if model.kind != "merged":
        return list_checkpoints(model, recipe.name)[-1]
    adapter_key = model.manifest["inputs"]["adapter"]
    adapter = store.get("adapters", adapter_key)
    if adapter is None:
        raise ValueError(f"{model.path}: merged from adapter {adapter_key}, which is not in the "
                         f"artifact store {store.root}; train it first")
    return list_checkpoints(adapter, recipe.name)[-1]


def eval_stage(recipe: Recipe, store: ArtifactStore, base: Artifact, tokenized: Artifact,
               checkpoint: Checkpoint | Artifact, progress: Progress | None = None
               ) -> StageResult:
    """Score the base model and one checkpoint (a saved step, or the final adapter/model).

    An artifact (trained, or merged) stands for its final checkpoint: the key is the one the
    eval_scores asset's `<recipe>__final` partition gets."""
    from tunegraph.ops.evaluate import evaluate

    if isinstance(checkpoint, Artifact):
        checkpoint = final_checkpoint(recipe, store, checkpoint)
    inputs = eval_inputs(recipe, base, tokenized, checkpoint)
    key = short(hash_json(inputs))
    if found := store.get("evals", key):
        return StageResult(found, True, json.loads((found.path / "scores.json").read_text()))
    manifest = {"recipe": _resolved_recipe(recipe), "inputs": inputs,
                "checkpoint": {k: v for k, v in checkpoint.manifest().items()
                               if k not in ("recipe", "partition")}}
    with store.write("evals", key, manifest) as out:
        with _scorable_weights(recipe, store, base, checkpoint) as weights:
            scores = evaluate(recipe, model_dir(base), weights, tokenized.path, progress)
        (out / "scores.json").write_text(json.dumps(scores, indent=2))
    artifact = store.get("evals", key)
    assert artifact is not None
    return StageResult(artifact, False, scores)


def export(recipe: Recipe, artifact: Artifact, subdir: str = "") -> Path:
    """Copy an artifact's model files to the recipe's `output_dir` (Axolotl's output layout)."""
    target = Path(recipe.output_dir)
    if not target.is_absolute():
        target = Path.cwd() / target
    target = target / subdir if subdir else target
    source = trained_weights_dir(artifact) if artifact.kind in ("adapters", "models") else artifact.path
    # Copy into the folder, never clear it: output_dir may be a folder the user keeps other things in.
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target
