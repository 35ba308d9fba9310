"""Benchmarks S1 and S2: one SFT optimizer step on packed 4096-token rows, random-init Llama.

    python3 benchmarks/s_sft_step.py s1 --out benchmarks/results/S1.json   # 1B shape, full FT
    python3 benchmarks/s_sft_step.py s2 --out benchmarks/results/S2.json   # 8B shape, LoRA r=16
    python3 benchmarks/s_sft_step.py s1 --dry-run                           # tiny, CPU, ~1 min

S1: Llama-3.2-1B shape (hidden 2048, 16 layers, GQA 32/8, vocab 128256, tied embeddings), full
fine-tune. S2: Llama-3.1-8B shape (hidden 4096, 32 layers, intermediate 14336, untied), LoRA
r=16, alpha 32, no dropout, every linear layer but lm_head. The model is built once on the GPU
(seeded, HF's init), saved in bf16 under --work, and every provider loads that folder.
Providers, each in its own subprocess (Liger patches globally; the peak memory is the process's):
- hf: transformers' Trainer with the model as from_pretrained gives it (SDPA attention, HF's
  ForCausalLMLoss over full logits): the "HF eager" baseline of S1's pass line.
- trl: TRL's SFTTrainer with its defaults except the shared settings below (TRL 1.16 computes the
  loss with its own chunked, fused LM head, which is a default, not an option).
- trl-liger: the same with use_liger_kernel=True (Liger's RMSNorm, SwiGLU, RoPE; TRL keeps its
  own fused LM head in place of Liger's FLCE).
- trl-liger-compile (S1): the same with TrainingArguments' torch_compile (a peer).
- tunegraph: tunegraph.ops.train.train(recipe, base_dir, tokenized_dir, out_dir, progress) on a
  recipe file (WORK/<bench>/tunegraph.yaml), as the training asset calls it: liger_rms_norm,
  liger_glu_activation, liger_rope, liger_fused_linear_cross_entropy on, and for S2
  lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel. Its trained model is saved after the timed
  steps, as the asset does (not timed). Diagnostic rows on request (`--providers ...,NAME`),
  neither peers nor the tunegraph row: tunegraph-compile-ro, the same recipe with
  torch_compile: true and torch_compile_mode: reduce-overhead; tunegraph-chunk1024, the fused
  loss's chunks at 1024 tokens or more (its default rule gives 512 at 4096 tokens);
  tunegraph-nolora (S2), the recipe without the lora_*_kernel keys; tunegraph-fp32-weights (S1),
  the recipe without kernels.adamw_master_weights. The full fine-tune's tunegraph recipe sets
  that key: bf16 linear weights with fp32 master weights in a fused AdamW
  (tunegraph/kernels/adamw.py), the numbers of autocast over fp32 weights without its casts.
Shared by all: the same rows (WORK/<bench>/tokenized/train.parquet: one 4096-token sequence per
row, token ids drawn from a Zipf law over the vocabulary so the loss moves, labels = input_ids,
no padding, full causal attention), micro-batch 1, no gradient accumulation, fused AdamW, lr
2e-5 (S1) / 2e-4 (S2) constant, no warm-up, weight decay 0, clipping at 1.0, seed 0 (weights of
the adapter, data order), bf16 autocast (Trainer's bf16=True) over fp32 weights for the full
fine-tune, and for LoRA over a bf16 frozen base with fp32 adapters (what tunegraph's
lora_base_dtype loads, and what TRL's defaults load too), SDPA attention, gradient checkpointing off (TRL's
default is on: set off), logging every step.
Times: the host clock at each logged step, after torch.cuda.synchronize() (a Trainer callback
for the peers, the `progress` hook for tunegraph: the same instant of the loop), so a step is
the whole loop iteration: data, forward, backward, clipping, optimizer, logging. The first
--warmup steps are dropped; median, p10, p90 of the rest. Tokens/s = 4096 / median. MFU: 6N
(S1) or 4N (S2) FLOPs per token, N = all parameters (tied embeddings once), attention left out,
against 989 TFLOP/s (datasheet dense bf16; the pass lines use this one) and against 790 TFLOP/s
(bf16 matmul measured on this workplace's H200, benchmarks/NOTES.md). Peak memory:
torch.cuda.max_memory_allocated() of the provider's process.
Pass (BENCHMARKS.md): S1 >= 1.3x hf tokens/s, >= 1.05x the best peer, memory <= the lowest
peer's, MFU >= 45%; S2 >= 1.05x the best peer at <= its memory, MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _profile import StepProfiler, format_summary  # noqa: E402
from _results import (  # noqa: E402
    compare_to_peers,
    package_version,
    timing_fields,
    write_results,
)

LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 8192, "rope_theta": 500000.0,
               "tie_word_embeddings": True}
LLAMA_31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 8192, "rope_theta": 500000.0,
               "tie_word_embeddings": False}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
        "max_position_embeddings": 512, "rope_theta": 500000.0}
LORA = {"r": 16, "alpha": 32}
BENCHES = {
    "s1": {"id": "S1", "shape": LLAMA_32_1B, "lora": False, "lr": 2e-5, "flops_per_param": 6,
           "providers": ["hf", "trl", "trl-liger", "trl-liger-compile", "tunegraph"],
           "workload": "llama-3.2-1b full fine-tune, 1x4096 packed"},
    "s2": {"id": "S2", "shape": LLAMA_31_8B, "lora": True, "lr": 2e-4, "flops_per_param": 4,
           "providers": ["trl", "trl-liger", "tunegraph"],
           "workload": "llama-3.1-8b LoRA r16 all-linear, 1x4096 packed"},
}
# trl-liger-compile: TRL + Liger with TrainingArguments' torch_compile (what a TRL user would
# switch on beside tunegraph's compiled S1 row): a peer.
PEERS = ["hf", "trl", "trl-liger", "trl-liger-compile"]
# tunegraph-nolora (S2, on request): tunegraph without the lora_*_kernel keys, to show what
# they add; neither a peer nor the tunegraph row.
# tunegraph-compile / tunegraph-compile-ro (on request): tunegraph's recipe with torch_compile:
# true, default mode / reduce-overhead (CUDA graphs): diagnostic rows, neither a peer nor the
# tunegraph row.
# tunegraph-graphs (on request): tunegraph's recipe with its decoder layers replayed as CUDA
# graphs (benchmarks/_graphed_layers.py): a diagnostic row, not a recipe key.
# tunegraph-fp32-weights (S1, on request): tunegraph's recipe without
# kernels.adamw_master_weights (fp32 weights under autocast, as the peers train): what the
# master-weights optimizer adds.
PROVIDERS = PEERS + ["tunegraph", "tunegraph-nolora", "tunegraph-chunk1024", "tunegraph-compile",
                     "tunegraph-compile-ro", "tunegraph-fp32-weights", "tunegraph-graphs"]
KERNEL_KEYS = ["liger_rms_norm", "liger_glu_activation", "liger_rope",
               "liger_fused_linear_cross_entropy"]
LORA_KERNEL_KEYS = ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"]
SEED = 0
DATASHEET_TFLOPS = 989.0
MEASURED_TFLOPS = 790.0
# Passes that BENCHMARKS.md sets: (speedup vs hf, vs best peer, memory ratio, MFU vs 989).
PASS = {"S1": (1.3, 1.05, 1.0, 0.45), "S2": (None, 1.05, 1.0, 0.40)}
NUM_LOSSES = 5  # first logged losses kept per provider
PROFILE_STEPS = 2  # --profile: steps profiled after the timed ones (not timed themselves)


def settings(bench: str, dry_run: bool, steps: int, warmup: int, profile_steps: int = 0
             ) -> dict[str, Any]:
    """`profile_steps`: steps profiled after the timed ones (0: none)."""
    spec = BENCHES[bench]
    shape = dict(spec["shape"])
    if dry_run:  # the plumbing on a CPU: tiny model, fp32, short rows
        shape = {**TINY, "tie_word_embeddings": shape["tie_word_embeddings"]}
    return {**spec, "bench": bench, "shape": shape, "dry_run": dry_run,
            "sequence_len": 128 if dry_run else 4096, "steps": steps, "warmup": warmup,
            "bf16": not dry_run, "profile_steps": profile_steps,
            # optimizer steps run (and rows made): the timed ones, then the profiled ones
            "train_steps": steps + profile_steps}


# ---------------------------------------------------------------------------------------------
# prepare: the model folder and the rows (once per work folder and settings)


def prepare(work: Path, cfg: dict[str, Any]) -> None:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from tunegraph.ops.base_model import build_tokenizer
    from tunegraph.ops.tokenize import FEATURES

    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    # The tokenizer only names the special tokens (the rows are token ids already): a small BPE
    # learned from a few synthetic words, as benchmarks/mg1_multi_gpu.py builds one.
    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(200)]
    tokenizer = build_tokenizer(words, vocab_size=400)
    config = LlamaConfig(**cfg["shape"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model_dir = work / "model"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    del model

    # Token ids from a Zipf law (p ~ 1/rank) over the ids above the special tokens, ranks
    # shuffled over the vocabulary: a random-init model learns the unigram law within a few
    # steps, so the losses move and a provider that trains differently shows.
    vocab = cfg["shape"]["vocab_size"]
    first_id = len(tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    ranks = torch.randperm(vocab - first_id, generator=generator)
    probs = 1.0 / (ranks.double() + 1.0)
    num_rows, length = cfg["train_steps"], cfg["sequence_len"]
    ids = torch.multinomial(probs, num_rows * length, replacement=True, generator=generator)
    rows = (ids + first_id).view(num_rows, length).tolist()
    tokenized = work / "tokenized"
    tokenized.mkdir(exist_ok=True)
    train_features = datasets.Features({k: v for k, v in FEATURES.items() if k != "reference"})
    datasets.Dataset.from_dict({"input_ids": rows, "labels": rows},
                               features=train_features).to_parquet(str(tokenized / "train.parquet"))
    datasets.Dataset.from_dict({"input_ids": [], "labels": [], "reference": []},
                               features=FEATURES).to_parquet(str(tokenized / "validation.parquet"))

    (work / "prepared.json").write_text(json.dumps({
        "key": prepared_key(cfg), "num_parameters": num_parameters, "shape": cfg["shape"],
        "first_token_id": first_id, "build_s": round(time.perf_counter() - started, 1)}))
    print(f"prepared {work}: {num_parameters / 1e9:.3f}B parameters, {num_rows} rows of {length} "
          f"tokens, {time.perf_counter() - started:.1f}s")


def write_recipe(work: Path, cfg: dict[str, Any], name: str, lora_kernels: bool,
                 compile_mode: str | None = None) -> Path:
    """tunegraph's recipe for this benchmark: the shared settings in its keys, kernels on."""
    import yaml

    recipe = {"base_model": str((work / "model").resolve()),
              # Not read: train() gets the tokenized rows (what the tokenized asset holds).
              "datasets": [{"path": "data.jsonl", "type": "completion"}],
              "sequence_len": cfg["sequence_len"], "micro_batch_size": 1,
              "gradient_accumulation_steps": 1, "max_steps": cfg["train_steps"],
              "learning_rate": cfg["lr"], "lr_scheduler": "constant", "warmup_steps": 0,
              "optimizer": "adamw_torch_fused", "weight_decay": 0.0, "max_grad_norm": 1.0,
              "bf16": cfg["bf16"], "attn_implementation": "sdpa", "gradient_checkpointing": False,
              "val_set_size": 0, "logging_steps": 1, "seed": SEED,
              **{key: True for key in KERNEL_KEYS}}
    if not cfg["lora"] and cfg["bf16"] and name != "tunegraph-fp32-weights":
        # bf16 working weights, fp32 masters in a fused AdamW: autocast's numbers (S1 notes).
        recipe["kernels"] = {"adamw_master_weights": True}
    if compile_mode is not None:
        recipe["torch_compile"] = True
        if compile_mode != "default":
            recipe["torch_compile_mode"] = compile_mode
    if cfg["lora"]:
        recipe.update(adapter="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                      lora_dropout=0.0, lora_target_linear=True)
        if lora_kernels:
            recipe.update({key: True for key in LORA_KERNEL_KEYS})
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepared_key(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("shape", "lora", "lr", "sequence_len", "train_steps", "bf16")}


# ---------------------------------------------------------------------------------------------
# one provider, in its own process


class StepClock:
    """The host time of each logged step, after a device sync; first mark per step wins (the
    Trainer logs once more, with the same global step, when training ends)."""

    def __init__(self, profile_after: int | None = None, profile_steps: int = 0,
                 trace_path: Path | None = None, sync_debug_step: int | None = None) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.marks: dict[int, float] = {}
        # --profile: torch.profiler from the mark of step `profile_after` to that of
        # `profile_after + profile_steps` (after the timed steps, so it times none of them).
        self.profile_after, self.profile_steps = profile_after, profile_steps
        self.profiler = StepProfiler(trace_path) if trace_path is not None else None
        self.profile: dict[str, Any] | None = None
        # --sync-debug: the host stacks of every synchronising CUDA call during one step
        self.sync_debug_step = sync_debug_step
        self.sync_stacks: dict[str, int] = {}
        self._showwarning = None

    def _record_sync(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        if "synchronizing" not in str(message):
            return self._showwarning(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings" not in f.filename]
        stack = "".join(traceback.format_list(frames[-10:]))
        self.sync_stacks[stack] = self.sync_stacks.get(stack, 0) + 1
        return None

    def _sync_debug(self, step: int) -> None:
        import warnings

        import torch

        if step == self.sync_debug_step:
            warnings.simplefilter("always")
            self._showwarning, warnings.showwarning = warnings.showwarning, self._record_sync
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.sync_debug_step + 1 and self._showwarning is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning

    def mark(self, step: int) -> None:
        if step in self.marks:
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.marks[step] = time.perf_counter()
        if self.cuda and self.sync_debug_step is not None:
            self._sync_debug(step)
        if self.profiler is not None and self.profile_after is not None:
            if step == self.profile_after:
                self.profiler.start()
            elif step == self.profile_after + self.profile_steps:
                self.profile = self.profiler.stop(self.profile_steps)

    def progress(self, stage: str, step: int, total: int) -> None:  # tunegraph's hook
        if stage == "train":
            self.mark(step)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Marks(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                clock.mark(state.global_step)

        return Marks()

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive logged steps: [step 2 - step 1, step 3 - step 2, ...]."""
        steps = sorted(self.marks)
        assert steps == list(range(1, len(steps) + 1)), f"steps logged: {steps}"
        return [self.marks[s] - self.marks[s - 1] for s in steps[1:]]


def training_arguments(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The TrainingArguments every peer gets (tunegraph's recipe says the same in its keys)."""
    import torch

    return {"output_dir": str(out_dir / "checkpoints"), "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "max_steps": cfg["train_steps"],
            "learning_rate": cfg["lr"], "lr_scheduler_type": "constant", "warmup_steps": 0,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": "adamw_torch_fused",
            "bf16": cfg["bf16"], "fp16": False, "gradient_checkpointing": False,
            "logging_steps": 1, "logging_first_step": True, "save_strategy": "no",
            "report_to": "none", "seed": SEED, "data_seed": SEED,
            "dataloader_num_workers": 0, "use_cpu": not torch.cuda.is_available(),
            "disable_tqdm": True}


def lora_config():
    from peft import LoraConfig

    # What tunegraph's add_lora builds from lora_r/lora_alpha/lora_dropout/lora_target_linear.
    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def train_rows(work: Path):
    import datasets
    import pyarrow.parquet as pq

    return datasets.Dataset(pq.read_table(work / "tokenized" / "train.parquet"))


def base_dtype(cfg: dict[str, Any]):
    """fp32 weights for the full fine-tune; a bf16 frozen base for LoRA under bf16 (PEFT keeps
    the adapters fp32): tunegraph.ops.train.lora_base_dtype's choice, given to every peer."""
    import torch

    return torch.bfloat16 if cfg["lora"] and cfg["bf16"] else torch.float32


def run_hf(cfg: dict[str, Any], work: Path, out_dir: Path, clock: StepClock) -> dict[str, Any]:
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    set_seed(SEED)  # before the adapter's init, as SFTTrainer and tunegraph do
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=base_dtype(cfg),
                                                 attn_implementation="sdpa")
    if cfg["lora"]:
        model = get_peft_model(model, lora_config())
    trainer = Trainer(model=model, args=TrainingArguments(**training_arguments(cfg, out_dir)),
                      train_dataset=train_rows(work), data_collator=default_data_collator,
                      callbacks=[clock.callback()])
    trainer.train()
    return {"history": trainer.state.log_history, "trainable_parameters": _trainable(model)}


def run_trl(cfg: dict[str, Any], work: Path, out_dir: Path, clock: StepClock,
            liger: bool, compile_model: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**training_arguments(cfg, out_dir), max_length=cfg["sequence_len"],
                     packing=False, use_liger_kernel=liger, torch_compile=compile_model,
                     model_init_kwargs={"dtype": str(base_dtype(cfg)).removeprefix("torch."),
                                        "attn_implementation": "sdpa"})
    # The model as a path: TRL's own loading (device_map auto) and PEFT wrapping.
    trainer = SFTTrainer(model=str(work / "model"), args=args, train_dataset=train_rows(work),
                         processing_class=AutoTokenizer.from_pretrained(work / "model"),
                         peft_config=lora_config() if cfg["lora"] else None,
                         callbacks=[clock.callback()])
    trainer.train()
    return {"history": trainer.state.log_history,
            "trainable_parameters": _trainable(trainer.model)}


def run_tunegraph(cfg: dict[str, Any], work: Path, out_dir: Path, clock: StepClock,
                  name: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import tunegraph.kernels as kernels
    from tunegraph.config import load_recipe
    from tunegraph.ops.train import train

    if name == "tunegraph-chunk1024":
        import tunegraph.kernels.fused_linear_cross_entropy as flce

        flce._MIN_CHUNK_TOKENS = 1024
    recipe = load_recipe(write_recipe(
        work, cfg, name, lora_kernels=name in ("tunegraph", "tunegraph-chunk1024",
                                               "tunegraph-graphs"),
        compile_mode={"tunegraph-compile": "default",
                      "tunegraph-compile-ro": "reduce-overhead"}.get(name)))
    lora_on = recipe.kernel_options().lora_on
    functions = {"apply_kernels": kernels.apply_kernels}
    if lora_on:
        # tunegraph.kernels re-exports it (from tunegraph.kernels.lora_patch).
        if not hasattr(kernels, "apply_lora_kernels"):
            raise RuntimeError("lora_*_kernel keys are on but tunegraph.kernels has no "
                               "apply_lora_kernels yet: the LoRA kernels can not be applied")
        functions["apply_lora_kernels"] = kernels.apply_lora_kernels
    calls = _spy_on(functions)
    if name == "tunegraph-graphs":
        _graph_layers_after_prepare_model()
    metrics = train(recipe, work / "model", work / "tokenized", out_dir, clock.progress)
    lora_applied = any(name == "apply_lora_kernels" or (
        isinstance(result, dict) and any(str(op).startswith("lora") for op in result))
        for name, result in calls)
    if lora_on and not lora_applied:
        raise RuntimeError(f"lora_*_kernel keys are on but training applied no LoRA kernel "
                           f"(calls seen: {calls}): tunegraph.ops.train.prepare_model does not "
                           f"call apply_lora_kernels")
    history = json.loads((out_dir / "log.json").read_text())["history"]
    return {"history": history, "trainable_parameters": metrics["trainable_parameters"],
            "kernels_patched": [[name, _jsonable(result)] for name, result in calls]}


def _graph_layers_after_prepare_model() -> None:
    """tunegraph-graphs: train()'s prepare_model, then the decoder layers routed through
    benchmarks/_graphed_layers.py (this provider's process only)."""
    from _graphed_layers import graph_decoder_layers

    import tunegraph.ops.train as train_module

    prepare_model = train_module.prepare_model

    def prepare_and_graph(*args: Any, **kwargs: Any) -> Any:
        model, tokenizer = prepare_model(*args, **kwargs)
        graph_decoder_layers(model, "tunegraph-graphs")
        return model, tokenizer

    train_module.prepare_model = prepare_and_graph


def _spy_on(functions: dict[str, Any]) -> list[tuple[str, Any]]:
    """Observe, not change, what tunegraph's training patches: each function in `functions` is
    replaced, in every tunegraph module that holds it (imported at module level, or looked up on
    its own module at call time), by a wrapper that records (name, its result)."""
    calls: list[tuple[str, Any]] = []

    def wrap(name: str, original: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            calls.append((name, result))
            return result
        return spy

    for name, original in functions.items():
        spy = wrap(name, original)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("tunegraph") and getattr(module, name, None) is original:
                setattr(module, name, spy)
    return calls


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def run_provider(work: Path, cfg: dict[str, Any], provider: str, out: Path) -> None:
    import torch

    out_dir = work / f"out-{provider}"
    profiled = cfg.get("profile_steps", 0) > 0
    clock = StepClock(profile_after=cfg["steps"] if profiled else None,
                      profile_steps=cfg.get("profile_steps", 0),
                      trace_path=work / f"profile-{provider}" if profiled else None,
                      sync_debug_step=cfg.get("sync_debug_step"))
    started = time.perf_counter()
    if provider == "hf":
        result = run_hf(cfg, work, out_dir, clock)
    elif provider in ("trl", "trl-liger", "trl-liger-compile"):
        result = run_trl(cfg, work, out_dir, clock, liger=provider != "trl",
                         compile_model=provider == "trl-liger-compile")
    else:
        result = run_tunegraph(cfg, work, out_dir, clock, provider)
    cuda = torch.cuda.is_available()
    history = result.pop("history")
    record = {
        "provider": provider, "step_s": clock.step_seconds(),
        "losses": [h["loss"] for h in history if "loss" in h],
        "grad_norms": [h["grad_norm"] for h in history if "grad_norm" in h],
        "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None,
        "process_s": round(time.perf_counter() - started, 1), "profile": clock.profile,
        "sync_stacks": [{"calls": n, "stack": stack} for stack, n in clock.sync_stacks.items()],
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
        "versions": _versions(), **result}
    out.write_text(json.dumps(record, indent=2))


def _versions() -> dict[str, str]:
    return {name: package_version(name) or "absent" for name in
            ("torch", "triton", "transformers", "trl", "peft", "accelerate", "liger_kernel")}


# ---------------------------------------------------------------------------------------------
# the benchmark: prepare, each provider in turn, the table and the JSON


def _subprocess(args: list[str], log: Path, timeout: int) -> tuple[int, str]:
    # The device machines reach no network: never let a library try the hub.
    env = {"HF_HUB_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as handle:
        try:
            code = subprocess.run([sys.executable, __file__, *args], stdout=handle,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -9
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    return code, tail


def timed_step_s(record: dict[str, Any], cfg: dict[str, Any]) -> list[float]:
    """The timed steps' seconds: after the warm-up, before any profiled step (step_s[i] is
    step i + 2's)."""
    return record["step_s"][cfg["warmup"] - 1:cfg["steps"] - 1]


def row_for(record: dict[str, Any], cfg: dict[str, Any], num_parameters: int) -> dict[str, Any]:
    timed_ms = [s * 1000 for s in record.get("timed_s", timed_step_s(record, cfg))]
    timing = timing_fields(timed_ms, digits=2)
    tokens_per_s = cfg["sequence_len"] / (timing["median_ms"] / 1000)
    tflops = cfg["flops_per_param"] * num_parameters * tokens_per_s / 1e12
    return {"workload": cfg["workload"], "provider": record["provider"], **timing,
            "peak_mem_mb": record["peak_mem_mb"] if record["peak_mem_mb"] is not None else 0.0,
            "throughput": round(tokens_per_s, 1), "unit": "tokens/s",
            "num_timed_steps": len(timed_ms), "tflops": round(tflops, 1),
            "mfu_vs_989": round(tflops / DATASHEET_TFLOPS, 4),
            "mfu_vs_790_measured": round(tflops / MEASURED_TFLOPS, 4),
            "peak_reserved_mb": record["peak_reserved_mb"],
            "first_losses": [round(x, 4) for x in record["losses"][:NUM_LOSSES]],
            "last_loss": round(record["losses"][-1], 4) if record["losses"] else None,
            "first_grad_norms": [round(x, 4) for x in record["grad_norms"][:3]],
            "trainable_parameters": record["trainable_parameters"],
            "kernels_patched": record.get("kernels_patched"), "process_s": record["process_s"],
            "step_ms_all": [round(s * 1000, 2) for s in record["step_s"]],
            "profile": _without_table(record.get("profile"))}


def _without_table(profile: dict[str, Any] | None) -> dict[str, Any] | None:
    """The profile summary for the results JSON (the host-side table stays in the log)."""
    return None if profile is None else {k: v for k, v in profile.items()
                                         if k != "host_ops_by_self_cpu"}


def run_bench(args: argparse.Namespace) -> int:
    cfg = settings(args.bench, args.dry_run, args.steps, args.warmup,
                   (args.profile_steps or PROFILE_STEPS) if args.profile else 0)
    # the step after the warm-up: timed, so its syncs are the timed steps' syncs
    cfg["sync_debug_step"] = args.warmup + 1 if args.sync_debug else None
    work = args.work / args.bench
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / "settings.json"
    cfg_file.write_text(json.dumps(cfg))
    started = time.perf_counter()
    prepared = work / "prepared.json"
    if not (prepared.is_file() and json.loads(prepared.read_text())["key"] == prepared_key(cfg)):
        code, tail = _subprocess(["_prepare", str(work), str(cfg_file)], work / "prepare.log",
                                 args.timeout)
        if code != 0:
            print(tail)
            raise SystemExit(f"{cfg['id']}: preparing the model and rows failed ({code})")
    info = json.loads(prepared.read_text())
    print(f"{cfg['id']}: model and rows ready in {time.perf_counter() - started:.1f}s "
          f"({info['num_parameters'] / 1e9:.3f}B parameters)", flush=True)

    providers = args.providers.split(",") if args.providers else cfg["providers"]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {PROVIDERS}")
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for repeat in range(args.repeats):
        for provider in providers:
            if provider.startswith("trl-liger") and args.dry_run:
                skipped[provider] = "Liger's kernels need CUDA (Triton): skipped in the CPU dry run"
                continue
            if provider in errors:
                continue
            result = work / f"{provider}.{repeat}.json"
            result.unlink(missing_ok=True)
            t0 = time.perf_counter()
            code, tail = _subprocess(["_provider", str(work), str(cfg_file), provider,
                                      str(result)], work / f"{provider}.{repeat}.log", args.timeout)
            if code != 0 or not result.is_file():
                errors[provider] = f"exit {code}:\n{tail}"
                print(f"  {provider}: FAILED (exit {code}); log {work / f'{provider}.{repeat}.log'}"
                      f"\n{tail}", flush=True)
                continue
            record = json.loads(result.read_text())
            record["timed_s"] = timed_step_s(record, cfg)
            print(f"  {provider}: {time.perf_counter() - t0:.1f}s, median step "
                  f"{statistics.median(record['timed_s']) * 1000:.1f} ms, "
                  f"losses {[round(x, 3) for x in record['losses'][:4]]}", flush=True)
            if record.get("profile"):
                print(format_summary(f"  profile {provider}", record["profile"]), flush=True)
                print(record["profile"]["host_ops_by_self_cpu"], flush=True)
            for sync in record.get("sync_stacks", []):
                print(f"  sync x{sync['calls']} in one step ({provider}):\n{sync['stack']}",
                      flush=True)
            if provider in records:  # repeats: pool the steps (each run drops its own warm-up)
                kept = records[provider]
                kept["timed_s"] += record["timed_s"]
                kept["peak_mem_mb"] = max(kept["peak_mem_mb"] or 0, record["peak_mem_mb"] or 0)
            else:
                records[provider] = record
            _remove_tree(work / f"out-{provider}")  # a full fine-tune's saved model: GBs

    rows = [row_for(records[p], cfg, info["num_parameters"]) for p in providers if p in records]
    reference = next((r for r in rows if r["provider"] in PEERS), None)
    for row in rows:
        if reference is not None:
            pairs = list(zip(row["first_losses"], reference["first_losses"], strict=False))
            row[f"loss_max_rel_diff_vs_{reference['provider']}"] = max(
                (abs(a - b) / abs(b) for a, b in pairs), default=None)
        if any(r["provider"] == "hf" for r in rows):
            hf = next(r for r in rows if r["provider"] == "hf")
            row["speedup_vs_hf"] = round(hf["median_ms"] / row["median_ms"], 3)
    peers_run = [r["provider"] for r in rows if r["provider"] in PEERS]
    if any(r["provider"] == "tunegraph" for r in rows) and peers_run:
        summary = compare_to_peers(rows, peers_run)
    else:
        summary = {"best_peer": None, "speedup_vs_best_peer": None,
                   "mem_ratio_vs_best_peer": None}
    checks = pass_checks(cfg["id"], rows) if not args.dry_run else None
    device = records[next(iter(records))]["device"] if records else "none"
    command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
    extra = {"model": f"{cfg['workload']}: {info['num_parameters'] / 1e9:.3f}B parameters, "
                      f"random init, shape {cfg['shape']}",
             "settings": {k: cfg[k] for k in ("sequence_len", "steps", "warmup", "lr", "bf16",
                                               "dry_run", "profile_steps")}
             | {"repeats": args.repeats},
             "precision": ("fp32 (CPU dry run)" if not cfg["bf16"] else
                           "bf16 autocast over a bf16 frozen base, fp32 adapters (Trainer "
                           "bf16=True), every provider" if cfg["lora"] else
                           "bf16 autocast over fp32 weights (Trainer bf16=True) for the peers; "
                           "tunegraph: bf16 linear weights with fp32 masters in its fused AdamW "
                           "(kernels.adamw_master_weights), autocast's numbers"),
             "gradient_checkpointing": False, "pass_checks": checks,
             "versions": records[next(iter(records))]["versions"] if records else None,
             "skipped": skipped, "errors": errors}
    write_results(args.out, bench_id=cfg["id"] + ("-dry-run" if args.dry_run else ""),
                  device=device, command=command, rows=rows, summary=summary, **extra)
    print_table(cfg, rows, summary, checks, skipped, errors, command, device)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f}s in all)")
    return 1 if errors else 0


def pass_checks(bench_id: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    mine = next((r for r in rows if r["provider"] == "tunegraph"), None)
    if mine is None or "speedup_vs_best_peer" not in mine:
        return None
    vs_hf, vs_peer, mem, mfu = PASS[bench_id]
    checks = {f"speedup_vs_best_peer >= {vs_peer}": mine["speedup_vs_best_peer"] >= vs_peer,
              f"mem_ratio_vs_best_peer >= {mem}": mine["mem_ratio_vs_best_peer"] >= mem,
              f"mfu_vs_989 >= {mfu}": mine["mfu_vs_989"] >= mfu}
    if vs_hf is not None:
        checks[f"speedup_vs_hf >= {vs_hf}"] = (mine.get("speedup_vs_hf") or 0) >= vs_hf
    return checks


def print_table(cfg: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any],
                checks: dict[str, Any] | None, skipped: dict[str, str], errors: dict[str, str],
                command: str, device: str) -> None:
    print(f"\n{cfg['id']}: {cfg['workload']} on {device}\n`{command}`\n")
    print("| provider | step ms (p10-p90) | tokens/s | TFLOP/s | MFU 989 / 790 | peak MiB | "
          "losses 1..5 | loss diff | grad norm 1 | vs best peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['speedup_vs_best_peer']}x ({r['best_peer']}), mem "
                 f"{r['mem_ratio_vs_best_peer']}x" if "speedup_vs_best_peer" in r else "")
        grad = r["first_grad_norms"][0] if r["first_grad_norms"] else "-"
        diff = next((f"{v:.1e} vs {k.rsplit('_', 1)[-1]}" for k, v in r.items()
                     if k.startswith("loss_max_rel_diff_vs_") and v is not None), "-")
        print(f"| {r['provider']} | {r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) | "
              f"{r['throughput']:,.0f} | {r['tflops']:.0f} | {r['mfu_vs_989']:.1%} / "
              f"{r['mfu_vs_790_measured']:.1%} | {r['peak_mem_mb']:,.0f} | "
              f"{' '.join(f'{x:.4f}' for x in r['first_losses'])} | {diff} | {grad} | {ratio} |")
    print(f"\nbest peer: {summary.get('best_peer')}, speedup {summary.get('speedup_vs_best_peer')}"
          f", memory ratio {summary.get('mem_ratio_vs_best_peer')}")
    if checks is not None:
        print("pass: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    for provider, why in skipped.items():
        print(f"skipped {provider}: {why}")
    for provider, why in errors.items():
        print(f"FAILED {provider}: {why.splitlines()[-1] if why else ''}")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_prepare", "_provider"):
        # Internal: python s_sft_step.py _prepare WORK SETTINGS | _provider WORK SETTINGS NAME OUT
        work, cfg = Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
        if sys.argv[1] == "_prepare":
            prepare(work, cfg)
        else:
            run_provider(work, cfg, sys.argv[4], Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/<ID>.json; dry run: "
                             "WORK/<bench>/<ID>-dry-run.json)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/s_sft_step"),
                        help="model folder, rows, logs (reused when the settings match)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 18)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the providers this many times, interleaved; steps pooled")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per subprocess")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, fp32, on the CPU")
    parser.add_argument("--profile", action="store_true",
                        help=f"after the timed steps, run {PROFILE_STEPS} more under "
                             f"torch.profiler: GPU busy/idle, kernel families, top kernels "
                             f"(printed, and under 'profile' in the JSON; traces in WORK)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="record the host stack of each synchronising CUDA call in the "
                             "first timed step (torch.cuda.set_sync_debug_mode; printed)")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help=f"--profile over this many steps (default {PROFILE_STEPS}); the "
                             f"summary splits them at each optimizer step")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.dry_run else 18)
    if args.dry_run:
        args.warmup = min(args.warmup, 2)
        args.work = args.work / "dry-run"
    if args.warmup < 1 or args.steps < args.warmup + 2:
        parser.error("--warmup >= 1 (step 1 has no start mark), and --steps must leave at "
                     "least two timed steps after it")
    if args.out is None:
        bench_id = BENCHES[args.bench]["id"]
        args.out = (args.work / args.bench / f"{bench_id}-dry-run.json" if args.dry_run
                    else REPO / "benchmarks" / "results" / f"{bench_id}.json")
    raise SystemExit(run_bench(args))


if __name__ == "__main__":
    main()
