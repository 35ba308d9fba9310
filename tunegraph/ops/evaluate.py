"""Evaluation: held-out loss and perplexity, and exact-match of greedy generations.

    evaluate(recipe, base_dir, trained_dir, tokenized_dir)  ->  {"base": {...}, "trained": {...}}

Both the base and the trained model are scored on the same held-out rows, so the scores say what
training changed. Exact-match runs where the held-out rows carry a reference answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunegraph.config import Recipe
from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.tokenize import load_tokenized
from tunegraph.ops.train import PadCollator

EVAL_CODE_VERSION = "1"
Progress = Callable[[str, int, int], None]


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, rows: list[dict[str, list[int]]], pad_token_id: int,
                 batch_size: int) -> tuple[float, int]:
    """Mean cross-entropy per trained token over `rows`, and the number of trained tokens."""
    collate = PadCollator(pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                 ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("val_set_size: the held-out rows have no trained tokens to score")
    return total / count, count


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    if isinstance(prompt, list):  # chat messages before the answer
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                references: list[dict[str, Any]], max_new_tokens: int) -> tuple[float, list[dict]]:
    """Share of prompts whose greedy continuation, stripped, equals the reference answer."""
    hits, samples = 0, []
    for ref in references:
        ids = torch.tensor([_prompt_ids(tokenizer, ref["prompt"])])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        hit = answer == str(ref["answer"]).strip()
        hits += hit
        if len(samples) < 5:
            samples.append({"answer": ref["answer"], "generated": answer, "match": hit})
    return hits / len(references), samples


def score_model(recipe: Recipe, model_dir: Path, tokenized_dir: Path,
                references: list[dict[str, Any]]) -> dict[str, Any]:
    tokenizer = load_tokenizer(recipe, model_dir)
    model = load_model(recipe, model_dir).eval()
    rows = [dict(input_ids=r["input_ids"], labels=r["labels"])
            for r in load_tokenized(tokenized_dir, "validation")]
    loss, num_tokens = heldout_loss(model, rows, tokenizer.pad_token_id,
                                    recipe.eval_batch_size or recipe.micro_batch_size)
    scores: dict[str, Any] = {"heldout_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                              "num_heldout_tokens": num_tokens}
    if references:
        scores["exact_match"], scores["samples"] = exact_match(model, tokenizer, references,
                                                               recipe.eval_max_new_tokens)
        scores["num_exact_match_rows"] = len(references)
    return scores


def evaluate(recipe: Recipe, base_dir: Path, trained_dir: Path, tokenized_dir: Path,
             progress: Progress | None = None) -> dict[str, Any]:
    """Score the base model and the trained (merged or fully fine-tuned) model on held-out rows."""
    validation = load_tokenized(tokenized_dir, "validation")
    if len(validation) == 0:
        raise ValueError("val_set_size: eval_scores needs held-out rows; set val_set_size > 0")
    references = [json.loads(r) for r in validation["reference"] if r][:recipe.eval_generation_rows]
    results = {}
    for index, (name, model_dir) in enumerate((("base", base_dir), ("trained", trained_dir))):
        if progress:
            progress("evaluate", index, 2)
        results[name] = score_model(recipe, model_dir, tokenized_dir, references)
    if progress:
        progress("evaluate", 2, 2)
    results["heldout_loss_delta"] = results["trained"]["heldout_loss"] - results["base"]["heldout_loss"]
    return results
