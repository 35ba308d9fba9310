"""Supervised fine-tuning (LoRA or full) with transformers' Trainer on a tokenized dataset.

    python -m tunegraph.cli train RECIPE      # through Dagster, with caching
    train(recipe, base_dir, tokenized_dir, out_dir)   # plain Python

setup (model, adapter, data, arguments) → train → save. The trained adapter (or full model) is
written to `out_dir/adapter` (or `out_dir/model`), with the per-step log in `out_dir/log.json`.
Checkpoints go to `out_dir/checkpoints/checkpoint-<step>`; when `out_dir` already holds one (left
by a failed attempt), training resumes from the last instead of starting over.
Recipe keys reach transformers through `training_arguments` (one key, one argument) and
`training_callbacks` (early stopping, the loss watchdog).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from tunegraph.config import Recipe
from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.compiled_attention import causal_sdpa_under_compile
from tunegraph.ops.distributed import sharding_arguments
from tunegraph.ops.packed_attention import PackedCollator, token_tensor
from tunegraph.ops.stream import PretrainingStream, is_stream
from tunegraph.ops.tokenize import load_tokenized

# 2: checkpoints carry the tokenizer and a manifest each, and the artifact a checkpoints.json.
TRAIN_CODE_VERSION = "2"
Progress = Callable[[str, int, int], None]


def mixed_precision(recipe: Recipe) -> dict[str, bool]:
    """bf16/fp16 flags for TrainingArguments; `bf16: auto` means bf16 where the GPU supports it."""
    on_cuda = torch.cuda.is_available()
    bf16 = recipe.bf16 if recipe.bf16 != "auto" else on_cuda and torch.cuda.is_bf16_supported()
    if (bf16 or recipe.fp16) and not on_cuda:
        raise ValueError("bf16/fp16: mixed precision needs a GPU; set bf16: auto or false on CPU")
    return {"bf16": bool(bf16), "fp16": bool(recipe.fp16)}


def lora_base_dtype(recipe: Recipe) -> torch.dtype | None:
    """The frozen base's dtype when a LoRA recipe trains in mixed precision, else None (fp32).

    Autocast casts every weight to bf16/fp16 for its matmul anyway, so a half-precision base
    changes only what norms and embeddings read, halves the base's memory and drops the casts
    (the 8B shape of benchmarks/s_sft_step.py: 16 GB less). The adapters stay fp32 (PEFT upcasts
    them; modules_to_save are upcast in prepare_model). Not with fsdp/deepspeed: they shard
    flat groups of one dtype, and mixed groups have not been run here. Never raises (the
    training key calls it): a bf16 recipe on a CPU fails in mixed_precision at training."""
    if not recipe.is_lora or recipe.fsdp or recipe.deepspeed:
        return None
    if recipe.fp16:
        return torch.float16
    if recipe.bf16 is True or (recipe.bf16 == "auto" and torch.cuda.is_available()
                               and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def add_lora(recipe: Recipe, model: PreTrainedModel) -> PreTrainedModel:
    """Wrap `model` with a PEFT LoRA adapter as the recipe's lora_* keys say."""
    if recipe.lora_target_linear:
        targets: list[str] | str | None = "all-linear"
    else:
        targets = recipe.lora_target_modules
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout, target_modules=targets,
                        fan_in_fan_out=recipe.lora_fan_in_fan_out,
                        modules_to_save=recipe.lora_modules_to_save,
                        target_parameters=recipe.lora_target_parameters, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # PEFT says which target modules matched nothing
        raise ValueError(f"lora_target_modules: {exc}") from exc


class PadCollator:
    """Right-pads input_ids with the pad token and labels with -100, and builds attention masks.

    Batches are as wide as their longest row, or exactly `pad_to` tokens when it is given
    (`pad_to_sequence_len`: one shape for every batch). `mask_only_padded`: a batch in which no
    row is padded has no attention_mask (all ones means none), so transformers' SDPA path runs
    `is_causal` flash attention without first reading the mask on the host (a sync per
    forward), also under torch.compile (tunegraph.ops.compiled_attention)."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None,
                 mask_only_padded: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.mask_only_padded = mask_only_padded

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        # Tokenization truncates rows to sequence_len, which is what pad_to is.
        assert self.pad_to is None or longest <= self.pad_to, (longest, self.pad_to)
        width = self.pad_to or longest
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = token_tensor(row["input_ids"])
            labels[i, :n] = token_tensor(row["labels"])
            mask[i, :n] = 1
        if self.mask_only_padded and all(len(r["input_ids"]) == width for r in rows):
            return {"input_ids": ids, "labels": labels}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collator_for(recipe: Recipe, pad_token_id: int, attn_implementation: str | None = None
                 ) -> PadCollator | PackedCollator:
    """PadCollator, or with sample_packing (or a pretraining stream) the PackedCollator, whose
    batches keep attention inside each document for `attn_implementation`."""
    pad_to = recipe.sequence_len if recipe.pad_to_sequence_len else None
    if recipe.sample_packing or recipe.packs_eval or recipe.pretraining_dataset:
        return PackedCollator(pad_token_id, attn_implementation, pad_to)
    return PadCollator(pad_token_id, pad_to, mask_only_padded=True)


def training_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, tokenized_dir: Path
                  ) -> tuple[Any, Any, int]:
    """(training rows, held-out rows to evaluate on or None, training rows per epoch).

    A stream's rows (pretraining_dataset, or datasets with streaming: true) are tokenized as
    training reads them, and its "epoch" is max_steps; held-out rows are the packed ones with
    eval_sample_packing."""
    if is_stream(tokenized_dir):
        train_rows: Any = PretrainingStream(recipe, tokenizer, tokenized_dir)
        assert recipe.max_steps is not None, "the schema requires max_steps for streams"
        num_rows = recipe.max_steps * recipe.micro_batch_size * recipe.gradient_accumulation_steps
    else:
        train_rows = load_tokenized(tokenized_dir, "train")
        num_rows = len(train_rows)
        if num_rows == 0:
            raise ValueError("datasets: the tokenized training split is empty")
    val_rows = load_tokenized(tokenized_dir, "validation").remove_columns(["reference"])
    if recipe.packs_eval and len(val_rows):
        val_rows = load_tokenized(tokenized_dir, "validation_packed")
    return train_rows, val_rows if len(val_rows) else None, num_rows


class ProgressCallback(TrainerCallback):
    """Reports each logged step to `progress`, keeps the loss trajectory, and times optimizer
    steps (forward, backward and update; checkpoint saving and evaluation happen outside them).

    On a GPU the step times come from CUDA events recorded at each step's start and end, read
    when the Trainer next waits for the GPU anyway (its logging) or at the end: a host sync at
    every step boundary would leave the GPU idle while the host prepares the next step (the S1
    profile, benchmarks/NOTES.md)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self._seconds: list[float] = []
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_start: float | torch.cuda.Event = 0.0

    @staticmethod
    def _mark() -> float | torch.cuda.Event:
        if not torch.cuda.is_available():
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (HF signature)
        self._step_start = self._mark()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 (HF signature)
        end = self._mark()
        if isinstance(end, float):
            self._seconds.append(end - self._step_start)
        else:
            self._pending.append((self._step_start, end))

    def _read_events(self) -> None:
        """Turn the recorded event pairs into seconds (waits for the GPU to reach the last)."""
        for start, end in self._pending:
            end.synchronize()
            self._seconds.append(start.elapsed_time(end) / 1000)
        self._pending.clear()

    def step_seconds(self) -> list[float]:
        """Seconds of each optimizer step so far (on a GPU this waits for the last step's end
        event: call it where the host waits anyway)."""
        self._read_events()
        return list(self._seconds)

    def median_step_s(self, warmup: int = 3) -> float | None:
        """The median optimizer step time after `warmup` steps (compilation, allocator growth)."""
        seconds = self.step_seconds()
        timed = seconds[warmup:] or seconds
        return statistics.median(timed) if timed else None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (HF signature)
        self._read_events()  # the Trainer has synced for the loss: the events are done
        if logs:
            self.history.append({"step": state.global_step, **logs})
        if self.progress:
            self.progress("train", state.global_step, state.max_steps)


class LossWatchdogError(RuntimeError):
    """Training stopped because the loss stayed above `loss_watchdog_threshold`."""


class LossWatchdogCallback(TrainerCallback):
    """Stops training when the logged training loss is above `threshold` (or NaN/inf) for
    `patience` logged steps in a row; `raise_if_tripped` then turns that into an error.

    Axolotl's watchdog re-reads the last log entry at every step end, so with logging_steps > 1
    one high loss counts several times; this one counts each logged loss once."""

    def __init__(self, threshold: float, patience: int):
        self.threshold = threshold
        self.patience = patience
        self.high: list[tuple[int, float]] = []  # (step, loss) of the current run of high losses
        self.tripped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (HF signature)
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if math.isfinite(loss) and loss <= self.threshold:
            self.high = []
            return
        self.high.append((state.global_step, loss))
        if len(self.high) >= self.patience and self.tripped is None:
            seen = ", ".join(f"step {step}: {value:.4g}" for step, value in self.high)
            self.tripped = (f"loss_watchdog_threshold: the training loss was above "
                            f"{self.threshold} for {len(self.high)} logged steps in a row "
                            f"({seen}); training stopped at step {state.global_step} and the model "
                            f"was not saved. Lower learning_rate, or raise "
                            f"loss_watchdog_threshold / loss_watchdog_patience")
            control.should_training_stop = True

    def raise_if_tripped(self) -> None:
        if self.tripped:
            raise LossWatchdogError(self.tripped)


def steps_per_epoch(recipe: Recipe, num_rows: int) -> int:
    batches = math.ceil(num_rows / recipe.micro_batch_size)
    return max(1, batches // recipe.gradient_accumulation_steps)


def _strategy(explicit: str | None, steps: int | None) -> str:
    """An explicit save/eval strategy wins; otherwise every N steps when N is set, else never."""
    return explicit or ("steps" if steps else "no")


def training_arguments(recipe: Recipe, out_dir: Path, num_train_rows: int,
                       has_validation: bool) -> TrainingArguments:
    """Map the recipe's training keys onto TrainingArguments, one key to one argument."""
    per_epoch = steps_per_epoch(recipe, num_train_rows)
    save_steps = recipe.save_steps or (max(1, per_epoch // recipe.saves_per_epoch)
                                       if recipe.saves_per_epoch else None)
    eval_steps = recipe.eval_steps or (max(1, per_epoch // recipe.evals_per_epoch)
                                       if recipe.evals_per_epoch else None)
    eval_strategy = _strategy(recipe.eval_strategy, eval_steps)
    if not has_validation:
        # The schema requires val_set_size for these; a tiny dataset can still split to 0 rows.
        for key in ("eval_strategy", "early_stopping_patience"):
            if getattr(recipe, key) not in (None, "no"):
                raise ValueError(f"{key}: the held-out split is empty (val_set_size "
                                 f"{recipe.val_set_size} of {num_train_rows} rows): raise "
                                 f"val_set_size")
        eval_strategy = "no"
    warmup: float = recipe.warmup_steps or 0
    if recipe.warmup_ratio is not None:
        warmup = recipe.warmup_ratio
    optional = {k: v for k, v in (("adam_beta1", recipe.adam_beta1),
                                  ("adam_beta2", recipe.adam_beta2),
                                  ("adam_epsilon", recipe.adam_epsilon),
                                  ("torch_compile_mode", recipe.torch_compile_mode)) if v is not None}
    if recipe.early_stopping_patience is not None:
        # EarlyStoppingCallback compares each evaluation against state.best_metric, which the
        # Trainer only tracks when metric_for_best_model is set.
        optional.update(metric_for_best_model="eval_loss", greater_is_better=False)
    arguments = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=recipe.micro_batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size or recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        num_train_epochs=recipe.num_epochs, max_steps=recipe.max_steps or -1,
        learning_rate=recipe.learning_rate, optim=recipe.optimizer,
        lr_scheduler_type=recipe.lr_scheduler, warmup_steps=warmup,
        weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
        seed=recipe.seed, data_seed=recipe.data_seed,
        save_strategy=_strategy(recipe.save_strategy, save_steps), save_steps=save_steps or 500,
        save_total_limit=recipe.save_total_limit,
        eval_strategy=eval_strategy, eval_steps=eval_steps,
        logging_steps=recipe.logging_steps, logging_first_step=True,
        # Log a NaN/inf loss as it is (transformers' default logs it as 0.0 and hides divergence).
        logging_nan_inf_filter=False,
        tf32=recipe.tf32, gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs=recipe.gradient_checkpointing_kwargs,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        torch_compile=recipe.torch_compile,
        ddp_find_unused_parameters=recipe.ddp_find_unused_parameters,
        report_to="none", remove_unused_columns=recipe.remove_unused_columns,
        # Counted over all processes; gives tokens/s (one small all-gather per step).
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=False,
        **mixed_precision(recipe), **optional, **sharding_arguments(recipe),
    )
    if arguments.world_size == 1 and arguments.n_gpu > 1:
        # One process trains on one GPU. With several visible, transformers would wrap the model
        # in nn.DataParallel and multiply the batch by the GPU count, changing the global batch
        # behind the content key (seen on 2xH200: 2 rows per step at 1/6 the speed of FSDP2).
        # Several GPUs are the launcher's job: --launcher torchrun --num-processes N.
        arguments._n_gpu = 1  # what transformers' Trainer itself does for model-parallel models
    return arguments


def master_weight_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters kernels.adamw_master_weights keeps in bf16: every nn.Linear's weight and
    bias that trains, except an output layer tied to the input embedding (the embedding lookup
    reads it in fp32, as autocast leaves it)."""
    tied = set()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        tied.add(id(embeddings.weight))
    return [p for module in model.modules() if isinstance(module, torch.nn.Linear)
            for p in (module.weight, module.bias)
            if p is not None and p.requires_grad and id(p) not in tied]


class MasterWeightsTrainer(Trainer):
    """transformers' Trainer with tunegraph's MasterWeightAdamW (kernels.adamw_master_weights):
    the parameter groups of Trainer.create_optimizer (weight decay off for biases and norms),
    clipping computed in fp32 and applied inside the optimizer's step. Checkpoints and the
    final model are saved with the fp32 masters as the weights (`_save`), what the fp32 path
    saves, and the masters go back in the model for good when training ends
    (`restore_masters`). Overrides `_clip_grad_norm`, `_get_grad_norm` (called at each
    optimizer step) and `_save` (under save_model, for checkpoints too) of transformers
    5.17-5.19 (tests/ops/test_train_master_weights.py)."""

    def create_optimizer(self, model=None):  # noqa: ANN001, ANN201 (HF signature)
        if self.optimizer is None:
            from tunegraph.kernels.adamw import MasterWeightAdamW

            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay],
                       "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = MasterWeightAdamW(
                [g for g in groups if g["params"]], lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                working=master_weight_parameters(opt_model),
                accumulate_fp32=self.args.gradient_accumulation_steps > 1)
        return self.optimizer

    @property
    def master_optimizer(self):  # noqa: ANN201 (tunegraph.kernels.adamw imports triton)
        """The MasterWeightAdamW itself (accelerate wraps the Trainer's optimizer)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _clip_grad_norm(self, model):  # noqa: ANN001, ANN202 (HF signature)
        return self.master_optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):  # noqa: ANN001, ANN202 (HF signature)
        return self.master_optimizer.grad_norm() if grad_norm is None else grad_norm

    def _save(self, output_dir=None, state_dict=None):  # noqa: ANN001, ANN202 (HF signature)
        if self.optimizer is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        with self.master_optimizer.masters_in_model():
            return super()._save(output_dir, state_dict)


def training_callbacks(recipe: Recipe) -> list[TrainerCallback]:
    """The callbacks that recipe keys ask for, beside progress reporting."""
    callbacks: list[TrainerCallback] = []
    if recipe.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    if recipe.loss_watchdog_threshold is not None:
        callbacks.append(LossWatchdogCallback(recipe.loss_watchdog_threshold,
                                              recipe.loss_watchdog_patience))
    return callbacks


def prepare_model(recipe: Recipe, base_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Seed before the adapter's random init, so LoRA weights follow the recipe's seed and not
    # whatever ran earlier in the process (Trainer seeds only later, at construction).
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe, base_dir)
    model = load_model(recipe, base_dir, dtype=lora_base_dtype(recipe) or torch.float32)
    if (kernels := recipe.kernel_options()).any_on:  # before LoRA: the patches see HF's modules
        from tunegraph.kernels import apply_kernels  # triton is imported only when asked for

        apply_kernels(model, kernels)
    if recipe.gradient_checkpointing:
        model.config.use_cache = False
    if recipe.is_lora:
        model = add_lora(recipe, model)
        for param in model.parameters():  # fp32 master weights for whatever trains
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if recipe.kernel_options().lora_on:  # after LoRA: these patches replace PEFT's layers
            from tunegraph.kernels.lora_patch import apply_lora_kernels

            apply_lora_kernels(model, recipe.kernel_options())
    return model, tokenizer


# The Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG states: a
# checkpoint folder without it was cut short (a killed process, a full disk).
CHECKPOINT_COMPLETE = "trainer_state.json"


def last_complete_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest `checkpoint-<step>` that was saved to the end, or None."""
    if not checkpoints_dir.is_dir():
        return None
    complete = [p for p in checkpoints_dir.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / CHECKPOINT_COMPLETE).is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def discard_incomplete_checkpoints(checkpoints_dir: Path) -> list[str]:
    """Remove checkpoint folders a killed attempt left half-written (before any rank starts:
    training would otherwise try to resume from one, or evaluate it later); their names."""
    removed = []
    for folder in sorted(checkpoints_dir.glob("checkpoint-*")) if checkpoints_dir.is_dir() else []:
        if not (folder / CHECKPOINT_COMPLETE).is_file():
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


def _peak_memory_per_rank() -> list[float] | None:
    """Each rank's peak CUDA memory (MiB, torch's allocator), gathered to every rank; None on CPU."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [round(peak, 1)]
    gathered: list[float | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, round(peak, 1))
    return [float(p) for p in gathered if p is not None]


def train(recipe: Recipe, base_dir: Path, tokenized_dir: Path, out_dir: Path,
          progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune the base model on the tokenized data; returns the metrics written to log.json."""
    model, tokenizer = prepare_model(recipe, base_dir)
    train_rows, val_rows, num_train_rows = training_data(recipe, tokenizer, tokenized_dir)
    args = training_arguments(recipe, out_dir, num_train_rows, val_rows is not None)
    callback = ProgressCallback(progress)
    extra_callbacks = training_callbacks(recipe)
    collator = collator_for(recipe, tokenizer.pad_token_id, model.config._attn_implementation)
    master_weights = recipe.kernel_options().adamw_master_weights
    if master_weights and (not args.bf16 or args.world_size > 1):
        raise ValueError("kernels.adamw_master_weights: needs bf16 mixed precision in one process "
                         f"(here bf16 resolved to {args.bf16}, {args.world_size} processes): "
                         f"remove the key on this machine")
    # processing_class: each checkpoint gets the tokenizer too, so it loads (and evaluates) alone.
    trainer = (MasterWeightsTrainer if master_weights else Trainer)(
        model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows,
        data_collator=collator, callbacks=[callback, *extra_callbacks], processing_class=tokenizer)
    # A checkpoint left in out_dir by a failed attempt: resume from it (weights, optimizer,
    # scheduler, RNG and data position), so a retry continues instead of starting over.
    resume_from = last_complete_checkpoint(Path(args.output_dir))
    with causal_sdpa_under_compile(recipe.torch_compile):
        result = trainer.train(resume_from_checkpoint=resume_from)
    for extra in extra_callbacks:
        if isinstance(extra, LossWatchdogCallback):
            extra.raise_if_tripped()
    if isinstance(trainer, MasterWeightsTrainer):
        trainer.master_optimizer.restore_masters()

    final_dir = out_dir / ("adapter" if recipe.is_lora else "model")
    # save_model gathers FSDP/DeepSpeed shards into one state dict and writes on rank 0 only
    # (in one process it is save_pretrained with safetensors).
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final_dir)
        (final_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; log.json says it
    # The Trainer's log history, not the callback's: after a resume it holds the steps logged
    # before the checkpoint too (read back from its trainer_state.json).
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    metrics = {
        "num_steps": trainer.state.global_step,
        "train_loss": result.training_loss,  # after a resume: of the resumed steps only (HF)
        "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "eval_losses": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
        "checkpoints": sorted(p.name for p in (out_dir / "checkpoints").glob("checkpoint-*")),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "world_size": args.world_size,
        "num_input_tokens_seen": trainer.state.num_input_tokens_seen,  # all ranks, no padding
        "median_step_s": callback.median_step_s(),
        "peak_memory_mb_per_rank": _peak_memory_per_rank(),
        "train_runtime_s": result.metrics.get("train_runtime"),
    }
    if trainer.is_world_process_zero():
        (out_dir / "log.json").write_text(json.dumps({"metrics": metrics, "history": history},
                                                     indent=2))
    return metrics
