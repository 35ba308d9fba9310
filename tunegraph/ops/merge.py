"""Merge a LoRA adapter into its base model with PEFT's `merge_and_unload`, and check the result.

    merge_lora(recipe, base_dir, adapter_dir, out_dir)

The check compares logits of the merged model against base+adapter (unmerged) on held-out rows;
it is what the merged-model asset check gates on (1e-5 in fp32).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import PeftModel

from tunegraph.config import Recipe
from tunegraph.ops.base_model import load_model, load_tokenizer

MERGE_CODE_VERSION = "1"


def merge_lora(recipe: Recipe, base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Write base + adapter, merged, as a plain transformers model (fp32) with its tokenizer."""
    base = load_model(recipe, base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(recipe, adapter_dir).save_pretrained(out_dir)


@torch.no_grad()
def max_logit_difference(recipe: Recipe, base_dir: Path, adapter_dir: Path, merged_dir: Path,
                         input_ids_rows: list[list[int]]) -> float:
    """Largest |logit| difference between base+adapter (unmerged, PEFT) and the merged model."""
    unmerged = PeftModel.from_pretrained(load_model(recipe, base_dir), adapter_dir).eval()
    merged = load_model(recipe, merged_dir).eval()
    worst = 0.0
    for ids in input_ids_rows:
        batch = torch.tensor([ids])
        diff = float((unmerged(input_ids=batch).logits - merged(input_ids=batch).logits).abs().max())
        if math.isnan(diff):  # max() would drop a NaN; it must fail the check instead
            return diff
        worst = max(worst, diff)
    return worst
