"""Recipe keys → transformers TrainingArguments, collator and callbacks (tunegraph.ops.train).

Each supported training key is checked where it lands: the TrainingArguments field it maps to, the
collator's batch shape, or the callback it adds. Two tiny Trainer runs (a 1-layer Llama with 64
tokens, CPU, about a second each) check that early stopping and the loss watchdog really stop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from datasets import Dataset
from transformers import EarlyStoppingCallback, LlamaConfig, LlamaForCausalLM, Trainer

from tunegraph.config import RecipeError
from tunegraph.ops.train import (
    LossWatchdogCallback,
    LossWatchdogError,
    PadCollator,
    collator_for,
    training_arguments,
    training_callbacks,
)

DATA = [{"path": "data.jsonl", "type": "alpaca"}]


@pytest.fixture
def recipe_of(make_recipe):
    def make(**keys):
        return make_recipe(datasets=DATA, **keys)
    return make


@pytest.fixture
def args_of(recipe_of, tmp_path):
    """`args_of(**keys)`: TrainingArguments for a recipe of 100 rows with a validation split."""
    def make(has_validation: bool = True, **keys):
        return training_arguments(recipe_of(**keys), tmp_path, 100, has_validation)
    return make


def problems_of(recipe_of, **keys) -> str:
    with pytest.raises(RecipeError) as caught:
        recipe_of(**keys)
    return str(caught.value)


def test_defaults_map_to_plain_training(args_of):
    args = args_of()
    assert args.save_strategy == "no" and args.eval_strategy == "no"
    assert args.train_sampling_strategy == "random"
    assert args.torch_compile is False
    assert args.ddp_find_unused_parameters is None
    assert args.remove_unused_columns is False
    assert args.metric_for_best_model is None


def test_group_by_length_selects_the_length_grouped_sampler(args_of):
    # transformers 5 replaced TrainingArguments.group_by_length with train_sampling_strategy.
    assert "group_by_length" not in {f.name for f in dataclasses.fields(args_of())}
    assert args_of(group_by_length=True).train_sampling_strategy == "group_by_length"


def test_torch_compile_and_its_mode(args_of, recipe_of):
    args = args_of(torch_compile=True, torch_compile_mode="max-autotune")
    assert args.torch_compile is True and args.torch_compile_mode == "max-autotune"
    assert "torch_compile_mode is set but torch_compile is not true" in problems_of(
        recipe_of, torch_compile_mode="max-autotune")
    assert "torch_compile_mode" in problems_of(recipe_of, torch_compile=True,
                                               torch_compile_mode="fastest")


def test_ddp_find_unused_parameters(args_of):
    assert args_of(ddp_find_unused_parameters=True).ddp_find_unused_parameters is True
    assert args_of(ddp_find_unused_parameters=False).ddp_find_unused_parameters is False


def test_save_strategy(args_of, recipe_of):
    assert args_of(save_strategy="epoch").save_strategy == "epoch"
    assert args_of(save_strategy="no").save_strategy == "no"
    args = args_of(save_strategy="steps", save_steps=7)
    assert (args.save_strategy, args.save_steps) == ("steps", 7)
    assert args_of(save_steps=7).save_strategy == "steps"  # implied by save_steps, as before
    assert ("save_strategy is 'steps' but neither save_steps nor saves_per_epoch is set"
            in problems_of(recipe_of, save_strategy="steps"))
    assert ("save_strategy is 'epoch' but saves_per_epoch is set: remove one"
            in problems_of(recipe_of, save_strategy="epoch", saves_per_epoch=2))
    assert ("save_strategy: 'best' is an Axolotl value that tunegraph does not support yet "
            "(supported: steps, epoch, no)" in problems_of(recipe_of, save_strategy="best"))


def test_eval_strategy(args_of, recipe_of):
    assert args_of(eval_strategy="epoch", val_set_size=0.1).eval_strategy == "epoch"
    args = args_of(eval_strategy="steps", eval_steps=5, val_set_size=0.1)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 5)
    assert args_of(eval_strategy="no", val_set_size=0.1).eval_strategy == "no"
    assert ("eval_strategy needs held-out rows to evaluate on but val_set_size is 0"
            in problems_of(recipe_of, eval_strategy="epoch"))
    assert ("eval_strategy is 'no' but eval_steps is set: remove one"
            in problems_of(recipe_of, eval_strategy="no", eval_steps=5, val_set_size=0.1))
    assert "eval_strategy: unknown value 'sometimes'" in problems_of(recipe_of,
                                                                     eval_strategy="sometimes")
    # val_set_size can still split 0 rows off a tiny dataset: an explicit request fails loudly.
    with pytest.raises(ValueError, match="eval_strategy: the held-out split is empty"):
        args_of(has_validation=False, eval_strategy="epoch", val_set_size=0.1)


def test_remove_unused_columns_false_only(args_of, recipe_of):
    assert args_of(remove_unused_columns=False).remove_unused_columns is False
    assert "remove_unused_columns: true is not supported" in problems_of(
        recipe_of, remove_unused_columns=True)


def test_save_safetensors_true_only(args_of, recipe_of):
    # transformers 5 always writes safetensors checkpoints: there is no argument to map to.
    assert "save_safetensors" not in {f.name for f in dataclasses.fields(args_of())}
    assert recipe_of(save_safetensors=True).save_safetensors is True
    assert "save_safetensors: false is not supported: tunegraph always writes safetensors" in (
        problems_of(recipe_of, save_safetensors=False))


def test_pad_to_sequence_len_pads_every_batch_to_sequence_len(recipe_of):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    fixed = collator_for(recipe_of(pad_to_sequence_len=True, sequence_len=16), pad_token_id=0)
    batch = fixed(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 4
    assert batch["labels"][1].tolist() == [8] + [-100] * 15
    assert collator_for(recipe_of(sequence_len=16), pad_token_id=0)(rows)["input_ids"].shape == (2, 3)


def test_pad_collator_never_truncates():
    with pytest.raises(AssertionError):
        PadCollator(0, pad_to=2)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])


def test_early_stopping_patience(args_of, recipe_of):
    recipe = recipe_of(early_stopping_patience=2, eval_steps=5, val_set_size=0.1)
    (callback,) = training_callbacks(recipe)
    assert isinstance(callback, EarlyStoppingCallback)
    assert callback.early_stopping_patience == 2
    args = args_of(early_stopping_patience=2, eval_steps=5, val_set_size=0.1)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_loss", False)
    assert ("early_stopping_patience needs held-out rows to evaluate on but val_set_size is 0"
            in problems_of(recipe_of, early_stopping_patience=2, eval_steps=5))
    assert "early_stopping_patience needs evaluation during training" in problems_of(
        recipe_of, early_stopping_patience=2, val_set_size=0.1)
    with pytest.raises(ValueError, match="early_stopping_patience: the held-out split is empty"):
        args_of(has_validation=False, early_stopping_patience=2, eval_steps=5, val_set_size=0.1)


def test_loss_watchdog_keys(recipe_of):
    assert training_callbacks(recipe_of()) == []
    (watchdog,) = training_callbacks(recipe_of(loss_watchdog_threshold=5.0))
    assert isinstance(watchdog, LossWatchdogCallback)
    assert (watchdog.threshold, watchdog.patience) == (5.0, 3)  # Axolotl's default patience
    (watchdog,) = training_callbacks(recipe_of(loss_watchdog_threshold=5.0,
                                               loss_watchdog_patience=2))
    assert watchdog.patience == 2
    assert "loss_watchdog_patience is set but loss_watchdog_threshold is not" in problems_of(
        recipe_of, loss_watchdog_patience=2)


class _State:
    global_step = 0


class _Control:
    should_training_stop = False


def feed(watchdog: LossWatchdogCallback, losses: list[float]) -> tuple[_State, _Control]:
    state, control = _State(), _Control()
    for step, loss in enumerate(losses, start=1):
        state.global_step = step
        watchdog.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
        watchdog.on_log(None, state, control, logs={"eval_loss": 99.0})  # not a training loss
    return state, control


def test_loss_watchdog_counts_consecutive_high_losses_only():
    watchdog = LossWatchdogCallback(threshold=5.0, patience=3)
    _, control = feed(watchdog, [6.0, 7.0, 4.0, 6.0, 7.0])  # the 4.0 restarts the count
    assert not control.should_training_stop and watchdog.tripped is None
    watchdog.raise_if_tripped()  # nothing to raise
    _, control = feed(watchdog, [8.0])
    assert control.should_training_stop
    with pytest.raises(LossWatchdogError, match=r"above 5.0 for 3 logged steps in a row "
                                                r"\(step 4: 6, step 5: 7, step 1: 8\)"):
        watchdog.raise_if_tripped()


def test_loss_watchdog_counts_nan_as_high():
    watchdog = LossWatchdogCallback(threshold=5.0, patience=2)
    _, control = feed(watchdog, [math.nan, math.inf])
    assert control.should_training_stop
    assert "nan" in (watchdog.tripped or "")


def tiny_trainer(recipe, tmp_path, num_rows: int = 16):
    """A 1-layer Llama (random weights, 64 tokens) on random rows, wired as `train` wires it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(1, 64, (num_rows, 12), generator=generator).tolist()]
    args = training_arguments(recipe, tmp_path, num_rows, has_validation=True)
    args.disable_tqdm = True
    callbacks = training_callbacks(recipe)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows[:4]), data_collator=collator_for(recipe, 0),
                      callbacks=callbacks)
    return trainer, callbacks


def test_loss_watchdog_stops_a_real_trainer(recipe_of, tmp_path):
    # A random 64-token model starts near ln(64) = 4.16: every logged loss is above 1.0.
    recipe = recipe_of(loss_watchdog_threshold=1.0, loss_watchdog_patience=2, max_steps=20,
                       micro_batch_size=2)
    trainer, (watchdog,) = tiny_trainer(recipe, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(LossWatchdogError, match="training stopped at step 2"):
        watchdog.raise_if_tripped()


def test_early_stopping_stops_a_real_trainer(recipe_of, tmp_path):
    # SGD at lr 1e-12 moves no float32 weight (updates are far below one ulp of ~0.02 weights), so
    # the held-out loss never improves: evals at steps 1, 2, 3 give best, worse x1, worse x2 → stop.
    recipe = recipe_of(early_stopping_patience=2, eval_steps=1, val_set_size=0.25, max_steps=20,
                       micro_batch_size=2, optimizer="sgd", learning_rate=1e-12,
                       lr_scheduler="constant", group_by_length=True, pad_to_sequence_len=True,
                       sequence_len=16, save_steps=2)
    trainer, _ = tiny_trainer(recipe, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [1, 2, 3]
    # save_safetensors: the checkpoint the Trainer wrote holds safetensors, no pickled weights.
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    # training_args.bin is the pickled TrainingArguments that transformers always writes.
    assert [p.name for p in checkpoint.glob("*.bin")] == ["training_args.bin"]
