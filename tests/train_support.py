"""Shared by the training tests: the tiny golden-run recipes, their data, and the golden files.

tests/ops/test_train.py writes and checks the goldens; other tests (distributed launch, kernels
on/off) train the same runs another way and must land on the same per-step losses.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from tunegraph.config import Recipe, recipe_from_mapping

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("TUNEGRAPH_UPDATE_GOLDEN") == "1"
# CPU, fp32, one thread: a rerun on the same machine and libraries is bit-identical. The margin
# is for other CPUs and library patch releases, whose kernels sum in another order: reordering
# the sums (1x4 vs 4x1 below) moves the 12-step losses by at most 1e-7 relative (measured), while
# the changes the goldens exist to catch (masking, loss normalisation, optimizer or schedule
# mapping, seeding) move them by 1e-3 or more by step 4. 1e-4 sits between the two.
GOLDEN_RTOL = 1e-4
# 4x1 vs 1x4 on one machine: the same maths summed in another order (measured: 1e-7).
ACCUMULATION_RTOL = 1e-5

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}
COMMON = {"sequence_len": 64, "val_set_size": 8, "micro_batch_size": 4,
          "gradient_accumulation_steps": 1, "max_steps": 12, "lr_scheduler": "cosine",
          "warmup_steps": 2, "optimizer": "adamw_torch", "weight_decay": 0.0, "seed": 7,
          "bf16": False}
# The golden runs: name -> recipe keys on top of COMMON. Changing these needs new goldens.
RUNS: dict[str, dict[str, Any]] = {
    "lora_tiny": {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                  "lora_target_linear": True, "lora_modules_to_save": ["lm_head"],
                  "learning_rate": 1e-2},
    "full_tiny": {"learning_rate": 2e-3},
}


def quickstart_like_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Alpaca rows of the quickstart's kinds (examples/data/make_quickstart_data.py), short enough
    for sequence_len 64 with a 400-token vocabulary."""
    rng = random.Random(seed)
    opposites = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "wet": "dry"}
    colors = {"milk": "white", "ink": "black", "sky": "blue", "grass": "green", "plum": "purple"}
    rows = []
    for _ in range(count):
        task = rng.randrange(3)
        if task == 0:
            word = rng.choice(sorted(opposites))
            rows.append({"instruction": "Give the opposite word.", "input": word,
                         "output": opposites[word]})
        elif task == 1:
            thing = rng.choice(sorted(colors))
            rows.append({"instruction": "Name the color of the thing.", "input": thing,
                         "output": colors[thing]})
        else:
            n = rng.randrange(50)
            rows.append({"instruction": "What number comes after this one?", "input": str(n),
                         "output": str(n + 1)})
    return rows


def make(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "learning_rate": 1e-3,
           **COMMON, **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")




def stored_golden(name: str) -> list[float]:
    """The committed per-step losses of golden run `name` (tests/golden/<name>.json)."""
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text())["losses"]


def prepare_training(folder: Path, recipe: Recipe, num_rows: int = 48) -> dict[str, Any]:
    """Write `num_rows` quickstart-like rows to folder/data.jsonl and build the tiny base model and
    the tokenized data through the stages: what train() needs (folder, base_dir, tokenized_dir)."""
    from tunegraph.ops.artifacts import ArtifactStore
    from tunegraph.ops.stages import base_model_stage, model_dir, tokenized_stage

    (folder / "data.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in quickstart_like_rows(num_rows, seed=0)))
    store = ArtifactStore(folder / "store")
    base = base_model_stage(recipe, store, "tiny")
    tokenized = tokenized_stage(recipe, store, base.artifact)
    return {"folder": folder, "base_dir": model_dir(base.artifact),
            "tokenized_dir": tokenized.artifact.path, "stats": tokenized.metadata}
