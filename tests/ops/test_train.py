"""Training on a tiny seeded model: golden loss trajectories (STYLE 9), gradient accumulation
4x1 == 1x4, and the loss going down on quickstart-like data.

The golden per-step losses live in tests/golden/{lora_tiny,full_tiny}.json. After a change that
is meant to move them (and only then; say why in the commit), rewrite them with

    TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/ops/test_train.py -p no:cacheprovider
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (
    ACCUMULATION_RTOL,
    COMMON,
    GOLDEN_DIR,
    GOLDEN_RTOL,
    RUNS,
    TINY,
    UPDATE_GOLDEN,
    make,
    prepare_training,
)
from transformers import AutoModelForCausalLM

from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.tokenize import load_tokenized
from tunegraph.ops.train import train


@pytest.fixture(autouse=True, scope="module")
def cpu_one_thread():
    """Goldens are CPU fp32 numbers: hide any GPU (train() would pick it, and bf16 with it) and
    use one thread (tiny matmuls gain nothing from two; MKL may split sums by thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Any]:
    """The tiny base model and the tokenized data, built once through the stages."""
    folder = tmp_path_factory.mktemp("train")
    prepared = prepare_training(folder, make(folder))
    assert prepared["stats"]["num_truncated"] == 0 and prepared["stats"]["num_train_rows"] == 40
    return prepared


def train_run(prepared: dict[str, Any], out_dir: Path, **keys: Any) -> dict[str, Any]:
    recipe = make(prepared["folder"], **keys)
    metrics = train(recipe, prepared["base_dir"], prepared["tokenized_dir"], out_dir)
    assert [step for step, _ in metrics["losses"]] == list(range(1, recipe.max_steps + 1))
    return metrics


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> Callable[..., dict[str, Any]]:
    """`runs(name, **extra_keys)`: metrics of a golden run (or a variant), trained once."""
    done: dict[str, dict[str, Any]] = {}

    def run(name: str, **extra: Any) -> dict[str, Any]:
        label = name + "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
        if label not in done:
            out = tmp_path_factory.mktemp(label.replace("=", "_"))
            done[label] = {**train_run(prepared, out, **RUNS[name], **extra), "out": out}
        return done[label]
    return run


def losses(metrics: dict[str, Any]) -> list[float]:
    return [loss for _, loss in metrics["losses"]]


def golden(name: str, actual: list[float]) -> list[float]:
    path = GOLDEN_DIR / f"{name}.json"
    if UPDATE_GOLDEN:
        libraries = {lib: metadata.version(lib) for lib in ("torch", "transformers", "peft",
                                                            "tokenizers", "accelerate")}
        path.write_text(json.dumps({
            "about": f"Per-step training loss of tests/ops/test_train.py's '{name}' run (CPU, "
                     f"fp32, one thread). Regenerate: TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python "
                     f"-m pytest tests/ops/test_train.py; say why in the commit.",
            "recipe": {**COMMON, **RUNS[name], "tiny_model": TINY},
            "libraries": libraries, "rtol": GOLDEN_RTOL, "losses": actual}, indent=2) + "\n")
    stored = json.loads(path.read_text())
    assert stored["recipe"] == {**COMMON, **RUNS[name], "tiny_model": TINY}, (
        f"{path.name} was made with other recipe keys: regenerate it (see this module's docstring)")
    return stored["losses"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_matches_golden_trajectory(runs, name):
    actual = losses(runs(name))
    assert actual == pytest.approx(golden(name, actual), rel=GOLDEN_RTOL, abs=0)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_loss_decreases(runs, name):
    actual = losses(runs(name))
    assert sum(actual[-3:]) / 3 < sum(actual[:3]) / 3 - 0.2


@pytest.mark.parametrize("name", sorted(RUNS))
def test_grad_accumulation_1x4_equals_4x1(runs, prepared, name):
    """micro_batch_size 1 x 4 accumulation steps vs 4 x 1: equal because transformers' Trainer
    counts the trained tokens of the whole accumulation window (num_items_in_batch) and the
    model divides its summed loss by that count, for PEFT models too. A mean per micro-batch
    would differ, since the rows train different numbers of tokens (checked here)."""
    train_rows = load_tokenized(prepared["tokenized_dir"], "train")
    trained_per_row = {sum(label != IGNORE_INDEX for label in row) for row in train_rows["labels"]}
    assert len(trained_per_row) > 1, "equal row weights would make this test vacuous"
    accumulated = losses(runs(name, micro_batch_size=1, gradient_accumulation_steps=4))
    assert accumulated == pytest.approx(losses(runs(name)), rel=ACCUMULATION_RTOL, abs=0)
    assert accumulated == pytest.approx(golden(name, losses(runs(name))), rel=GOLDEN_RTOL, abs=0)


def test_outputs_of_a_run(runs):
    lora, full = runs("lora_tiny"), runs("full_tiny")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (lora["out"] / "adapter").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (full["out"] / "model").iterdir()}
    # r=4 LoRA on the 7 linear layers of 2 blocks (2 x 2048 weights), plus the lm_head copy that
    # lora_modules_to_save trains in full (400 x 32); everything for the full fine-tune.
    assert lora["trainable_parameters"] == 2 * 2048 + 400 * 32
    assert full["trainable_parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(full["out"] / "model").parameters())
    for metrics in (lora, full):
        log = json.loads((metrics["out"] / "log.json").read_text())
        assert log["metrics"]["losses"] == [list(pair) for pair in metrics["losses"]]
        assert metrics["num_steps"] == 12
        assert (metrics["first_loss"], metrics["last_loss"]) == (losses(metrics)[0],
                                                                  losses(metrics)[-1])


def test_lora_init_follows_the_recipe_seed(prepared, tmp_path):
    """The LoRA A matrices are drawn from the global RNG when the adapter is added: train() must
    seed it from the recipe first, or a run depends on what ran before it in the process."""
    trajectories = []
    for unrelated_seed in (0, 1, 1):
        torch.manual_seed(unrelated_seed)  # whatever ran before in this process
        keys = {**RUNS["lora_tiny"], "max_steps": 3, "warmup_steps": 0}
        if len(trajectories) == 2:
            keys["seed"] = 8  # ... while the recipe's seed does change the run
        trajectories.append(losses(train_run(prepared, tmp_path / str(len(trajectories)), **keys)))
    assert trajectories[0] == trajectories[1]
    assert trajectories[2][1:] != trajectories[0][1:]


def test_lora_in_mixed_precision_freezes_a_half_precision_base(prepared):
    """bf16/fp16 LoRA loads the frozen base in that dtype (autocast casts it for every matmul
    anyway) and trains fp32 adapters and modules_to_save; full fine-tunes, fp32 LoRA and sharded
    LoRA keep an fp32 base. The dtype is in the training key only when it is not fp32."""
    from tunegraph.ops.stages import training_key_values
    from tunegraph.ops.train import lora_base_dtype, prepare_model

    folder = prepared["folder"]
    lora = {**RUNS["lora_tiny"], "lora_modules_to_save": ["lm_head"]}
    bf16 = make(folder, **lora, bf16=True)
    model, _ = prepare_model(bf16, prepared["base_dir"])
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and set(trainable.values()) == {torch.float32}
    assert any("lm_head" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert lora_base_dtype(make(folder, **lora, fp16=True, bf16=False)) == torch.float16
    assert training_key_values(bf16)["lora_base_dtype"] == "bfloat16"
    for recipe in (make(folder, **lora), make(folder, bf16=True),
                   make(folder, **lora, bf16=True, fsdp=["full_shard"])):
        assert lora_base_dtype(recipe) is None
        assert "lora_base_dtype" not in training_key_values(recipe)
