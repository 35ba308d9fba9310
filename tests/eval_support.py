"""Shared by the eval tests (test_eval_tasks, test_generate, test_lm_eval): a tiny model and
held-out data built in the test, and greedy decoding written out by hand as the oracle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.stages import base_model_stage, model_dir, tokenized_stage

# head_dim 32: the smallest head vLLM's CPU attention runs (it supports 32, 64, 80, ...).
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 400}
WORDS = "hot cold big small milk ink sky snow up down fast slow".split()


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows() -> list[dict[str, str]]:
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS]
    rows += [{"instruction": "What number comes after this one?", "input": str(n),
              "output": str(n + 1)} for n in (7, 19, 98, 999)]
    return rows


def make_recipe(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "learning_rate": 1e-3,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 96,
           "val_set_size": 4, "micro_batch_size": 4, "eval_max_new_tokens": 4,
           "eval_generation_rows": 2, "seed": 3, **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


def build(folder: Path) -> dict[str, Any]:
    """The tiny base model and tokenized held-out rows of `alpaca_rows`, in `folder`."""
    write_rows(folder / "data.jsonl", alpaca_rows())
    recipe = make_recipe(folder)
    store = ArtifactStore(folder / "store")
    base = base_model_stage(recipe, store, "tiny")
    tokenized = tokenized_stage(recipe, store, base.artifact)
    return {"folder": folder, "base_dir": model_dir(base.artifact),
            "tokenized_dir": tokenized.artifact.path}


@torch.no_grad()
def hand_greedy(model, prompt_ids: Sequence[int], max_new_tokens: int,
                stop_ids: Sequence[int]) -> list[int]:
    """Greedy decoding by hand: argmax of the last position, until a stop id (dropped) or the
    token budget; no KV cache, no generate()."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if next_id in stop_ids:
            break
        out.append(next_id)
        ids.append(next_id)
    return out
