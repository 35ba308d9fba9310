"""Benchmark MG1: a Llama-3.2-1B-shaped model (random init) trained 50 steps on 2 GPUs through
`tunegraph materialize --launcher torchrun --num-processes 2`: full fine-tune with FSDP2 and with
DeepSpeed ZeRO-3, LoRA with FSDP2; next to the same recipes on 1 GPU.

    python benchmarks/mg1_multi_gpu.py prepare WORK            # model folder, data, recipes
    python benchmarks/mg1_multi_gpu.py run WORK fft_fsdp2 [--kill-at 30]
    python benchmarks/mg1_multi_gpu.py report WORK --out benchmarks/results/MG1.json

`run` materializes the recipe's trained asset (and, for LoRA, the merged model) in WORK/<name>/
(its own .tunegraph home), then loads the result with plain transformers/PEFT and runs a forward
pass. `--kill-at STEP` SIGKILLs rank 1 once checkpoint STEP is saved: the train asset fails, its
RetryPolicy starts it again, and the retry resumes from that checkpoint. Each run's record goes to
WORK/<name>/record.json; `report` gathers them into the BENCHMARKS.md JSON and a Markdown table.

Throughput is the median optimizer step (forward, backward, update; saving excluded; steps 4..50)
over the non-padding tokens each GPU saw. MFU uses 6N FLOPs/token (N = all parameters, embeddings
included; attention FLOPs left out) for full fine-tuning and 4N for LoRA, against 989 TFLOP/s
(the H100/H200 dense bf16 datasheet figure) and against ~790 TFLOP/s (measured here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
         "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True}
SEQUENCE_LEN = 4096
NUM_ROWS = 400
WORDS_PER_ROW = 3400
STEPS = 50
# MG1_DRY_RUN=1: the same script on a CPU with a tiny shape, 4 steps, fp32 (checks the plumbing;
# the FSDP/DeepSpeed runs need GPUs and refuse to run on CPUs).
DRY_RUN = os.environ.get("MG1_DRY_RUN") == "1"
if DRY_RUN:
    SHAPE = {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}
    NUM_ROWS, WORDS_PER_ROW, STEPS = 16, 300, 8
COMMON = {"datasets": [{"path": "data.jsonl", "type": "completion"}], "sequence_len": SEQUENCE_LEN,
          "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": STEPS,
          "lr_scheduler": "cosine", "warmup_steps": 5, "optimizer": "adamw_torch_fused",
          "bf16": True, "save_steps": 25, "val_set_size": 0, "logging_steps": 1, "seed": 0,
          "attn_implementation": "sdpa", "weight_decay": 0.0}
FSDP2 = {"fsdp": ["full_shard", "auto_wrap"],
         "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                         "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                         "fsdp_state_dict_type": "FULL_STATE_DICT"}}
LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "lora_target_linear": True, "learning_rate": 2e-4}
FULL = {"learning_rate": 1e-4}
# name -> (recipe keys, processes)
RUNS = {
    "fft_1gpu": ({**FULL}, 1),
    "fft_fsdp2": ({**FULL, **FSDP2}, 2),
    "fft_zero3": ({**FULL, "deepspeed": "zero3_bf16.json"}, 2),
    "lora_1gpu": ({**LORA}, 1),
    "lora_fsdp2": ({**LORA, **FSDP2}, 2),
}
if DRY_RUN:
    RUNS["fft_ddp"] = ({**FULL}, 2)  # the kill/resume path on CPU processes (gloo)
PEAK_TFLOPS = 989.0
MEASURED_TFLOPS = 790.0


def prepare(work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from tunegraph.ops.base_model import build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "pe", "du", "ga", "zo"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                    for _ in range(3000)})
    # Rows of ~3,600 tokens (one word is about one token once the BPE has learned it): one row
    # fills most of a 4096-token micro-batch, so tokens/s measures long-sequence training.
    rows = [" ".join(rng.choice(words) for _ in range(WORDS_PER_ROW)) for _ in range(NUM_ROWS)]
    with open(work / "data.jsonl", "w") as out:
        for text in rows:
            out.write(json.dumps({"text": text}) + "\n")
    model_dir = work / "llama-1b-shape"
    tokenizer = build_tokenizer(rows[:50], vocab_size=8000)
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.float32 if DRY_RUN else torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    num_params = sum(p.numel() for p in model.parameters())
    (work / "model.json").write_text(json.dumps({"num_parameters": num_params, "shape": SHAPE}))
    import yaml

    for name, (keys, _) in RUNS.items():
        folder = work / name
        folder.mkdir(exist_ok=True)
        (folder / "data.jsonl").write_bytes((work / "data.jsonl").read_bytes())
        recipe = {"base_model": str(model_dir), **COMMON, **keys,
                  "output_dir": str(folder / "outputs")}
        if name.endswith("1gpu"):
            recipe["save_steps"] = None  # the baselines measure throughput; no checkpoints
        if DRY_RUN:
            recipe.update(bf16=False, max_steps=STEPS, save_steps=2, optimizer="adamw_torch")
        (folder / "mg1.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(f"prepared {work}: {num_params / 1e9:.3f}B parameters, {NUM_ROWS} rows")


def _kill_rank_1_at(home: Path, step: int, stop: threading.Event, log: list[str]) -> None:
    """SIGKILL rank 1 once the training's checkpoint `step` exists."""
    while not stop.is_set():
        # Once the checkpoint is complete (trainer_state.json is written last), so the retry has
        # it to resume from; a half-written one is discarded (tests/ops/test_launch.py).
        for state in home.glob(f"artifacts/_work/*/*/checkpoints/checkpoint-{step}/"
                               f"trainer_state.json"):
            pid_file = state.parents[2] / "_launch" / "pids" / "rank-1"
            if pid_file.is_file():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                log.append(f"killed rank 1 (pid {pid_file.read_text()}) after checkpoint {step}")
                return
        time.sleep(0.5)


def run(work: Path, name: str, kill_at: int | None) -> None:
    keys, processes = RUNS[name]
    folder = work / name
    home = folder / ".tunegraph"
    env = {**os.environ, "TUNEGRAPH_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    select = ["--select", "merged_model" if keys.get("adapter") else "model", "--with-upstream"]
    launch = ["--launcher", "torchrun", "--num-processes", str(processes)] if processes > 1 else []
    command = [sys.executable, "-m", "tunegraph.cli", "materialize", "mg1.yaml", *select, *launch]
    events: list[str] = []
    stop = threading.Event()
    killer = None
    if kill_at:
        killer = threading.Thread(target=_kill_rank_1_at, args=(home, kill_at, stop, events),
                                  daemon=True)
        killer.start()
    started = time.perf_counter()
    with open(folder / "materialize.log", "w") as log:
        result = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    stop.set()
    tail = (folder / "materialize.log").read_text().splitlines()[-25:]
    if result.returncode != 0:
        print("\n".join(tail))
        raise SystemExit(f"{name}: materialize failed ({result.returncode})")
    kind = "adapters" if keys.get("adapter") else "models"
    trained = max((home / "artifacts" / kind).glob("*/metrics.json"),
                  key=lambda p: p.stat().st_mtime)
    metrics = json.loads(trained.read_text())
    load_s = _load_and_forward(trained.parent, home, kind)
    steps = metrics["num_steps"]
    tokens_per_gpu_step = metrics["num_input_tokens_seen"] / steps / metrics["world_size"]
    record = {"name": name, "processes": processes, "keys": keys, "wall_s": round(wall, 1),
              "events": events, "resumed_from_step": metrics.get("resumed_from_step"),
              "num_steps": steps, "first_loss": metrics["first_loss"],
              "last_loss": metrics["last_loss"],
              "median_step_s": metrics["median_step_s"],
              "tokens_per_gpu_step": tokens_per_gpu_step,
              "tokens_per_s_per_gpu": tokens_per_gpu_step / metrics["median_step_s"],
              "peak_memory_mb_per_rank": metrics["peak_memory_mb_per_rank"],
              "checkpoints": metrics["checkpoints"], "reload_and_forward_s": load_s}
    (folder / "record.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def _load_and_forward(trained: Path, home: Path, kind: str) -> float:
    """Load the trained model (or the merged one, for LoRA) with plain transformers; one forward."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    if kind == "adapters":
        folder = max((home / "artifacts" / "merged").glob("*/config.json"),
                     key=lambda p: p.stat().st_mtime).parent
    else:
        folder = trained / "model"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    ids = torch.randint(0, 8000, (1, 256), device=device)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all(), f"{folder}: non-finite logits"
    for checkpoint in sorted((trained / "checkpoints").glob("checkpoint-*")):
        assert any(checkpoint.glob("*.safetensors")), f"{checkpoint}: no weights"
    return round(time.perf_counter() - started, 1)


def report(work: Path, out: Path) -> None:
    info = json.loads((work / "model.json").read_text())
    num_params = info["num_parameters"]
    rows = []
    for name in RUNS:
        path = work / name / "record.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        flops_per_token = (6 if name.startswith("fft") else 4) * num_params
        tflops = flops_per_token * record["tokens_per_s_per_gpu"] / 1e12
        rows.append({"workload": name, "provider": "tunegraph",
                     "median_ms": round(record["median_step_s"] * 1000, 1),
                     "p10_ms": None, "p90_ms": None,
                     "peak_mem_mb": max(record["peak_memory_mb_per_rank"] or [0.0]),
                     "throughput": round(record["tokens_per_s_per_gpu"]), "unit": "tokens/s/GPU",
                     "processes": record["processes"],
                     "peak_mem_mb_per_rank": record["peak_memory_mb_per_rank"],
                     "mfu_vs_989": round(tflops / PEAK_TFLOPS, 3),
                     "mfu_vs_790_measured": round(tflops / MEASURED_TFLOPS, 3),
                     "flops_convention": "6N (full) / 4N (LoRA), N incl. embeddings",
                     "first_loss": round(record["first_loss"], 4),
                     "last_loss": round(record["last_loss"], 4),
                     "resumed_from_step": record["resumed_from_step"],
                     "events": record["events"], "materialize_wall_s": record["wall_s"]})
    import torch

    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
              if torch.cuda.is_available() else "CPU (dry run)")
    result = {"id": "MG1", "device": device, "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/mg1_multi_gpu.py prepare/run/report (see docstring)",
              "model": f"Llama-3.2-1B shape, random init, {num_params / 1e9:.3f}B parameters",
              "rows": rows, "best_peer": None, "speedup_vs_best_peer": None,
              "mem_ratio_vs_best_peer": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    header = ("| run | GPUs | step ms | tokens/s/GPU | MFU (989) | peak MiB/GPU | loss 1 → 50 | "
              "resumed from |\n|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['workload']} | {r['processes']} | {r['median_ms']} | {r['throughput']} | "
        f"{r['mfu_vs_989']:.1%} | {r['peak_mem_mb']:.0f} | {r['first_loss']} → {r['last_loss']} | "
        f"{r['resumed_from_step'] or '-'} |" for r in rows]
    print("\n".join(lines))
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("work", type=Path)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("work", type=Path)
    run_parser.add_argument("name", choices=sorted(RUNS))
    run_parser.add_argument("--kill-at", type=int, default=None)
    report_parser = sub.add_parser("report")
    report_parser.add_argument("work", type=Path)
    report_parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/MG1.json")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.work)
    elif args.command == "run":
        run(args.work, args.name, args.kill_at)
    else:
        report(args.work, args.out)


if __name__ == "__main__":
    main()
