"""Evaluation: held-out loss and perplexity, exact-match of greedy generations on held-out rows,
the recipe's generation tasks (`eval_tasks`) and lm-evaluation-harness tasks (`lm_eval_tasks`).

    evaluate(recipe, base_dir, trained_dir, tokenized_dir)
      -> {"base": {...}, "trained": {...}, "heldout_loss_delta": float}

Each model's scores hold heldout_loss, perplexity, num_heldout_tokens; exact_match, samples and
num_exact_match_rows where held-out rows carry a reference answer; `tasks` {name: {score, scorer,
num_rows, samples}} for eval_tasks; `lm_eval` {task: {metric: value, num_rows}} for lm_eval_tasks.
Both models are scored on the same rows, so the scores say what training changed.

Generation goes through tunegraph.ops.generate: transformers' `generate` on the model already
loaded for the loss, or, with `eval_generation_backend: vllm`, one vLLM child process for both
models before anything else is loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunegraph.config import Recipe
from tunegraph.config.schema import EvalTaskConfig
from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.eval_tasks import Example, load_examples, request_for, stop_ids, task_result
from tunegraph.ops.generate import GenerationJob, GenerationRequest, generate, hf_generate
from tunegraph.ops.tokenize import load_tokenized
from tunegraph.ops.train import PadCollator

# Bump when the same inputs give different scores. 2: generation also stops at end-of-turn
# tokens (<|im_end|>, ...), not only at EOS; eval_tasks, lm_eval_tasks, vLLM.
EVAL_CODE_VERSION = "2"
Progress = Callable[[str, int, int], None]
# Held-out exact-match samples kept in the scores.
NUM_HELDOUT_SAMPLES = 5


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


@dataclass
class Suite:
    """Prompts scored together: the held-out rows (`task` None) or one of eval_tasks."""

    examples: list[Example]
    max_new_tokens: int
    task: EvalTaskConfig | None = None


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _heldout_scores(examples: Sequence[Example], texts: Sequence[str]) -> dict[str, Any]:
    hits = [text == ex.answer.strip() for ex, text in zip(examples, texts, strict=True)]
    samples = [{"answer": ex.answer, "generated": text, "match": hit}
               for ex, text, hit in list(zip(examples, texts, hits, strict=True))
               [:NUM_HELDOUT_SAMPLES]]
    return {"exact_match": sum(hits) / len(hits), "samples": samples,
            "num_exact_match_rows": len(hits)}


@torch.no_grad()
def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                references: list[dict[str, Any]], max_new_tokens: int,
                stops: tuple[int, ...] | None = None) -> tuple[float, list[dict]]:
    """Share of prompts whose greedy continuation, stripped, equals the reference answer."""
    stops = stops or (tokenizer.eos_token_id,)
    examples = [Example(ref["prompt"], str(ref["answer"])) for ref in references]
    outputs = hf_generate(model, [request_for(tokenizer, ex.prompt, max_new_tokens, stops)
                                  for ex in examples])
    scores = _heldout_scores(examples, [_decode(tokenizer, ids) for ids in outputs])
    return scores["exact_match"], scores["samples"]


def _suites(recipe: Recipe, references: list[dict[str, Any]]) -> list[Suite]:
    suites = []
    if references:
        suites.append(Suite([Example(r["prompt"], str(r["answer"])) for r in references],
                            recipe.eval_max_new_tokens))
    for index, task in enumerate(recipe.eval_tasks):
        suites.append(Suite(load_examples(recipe, index),
                            task.max_new_tokens or recipe.eval_max_new_tokens, task))
    return suites


def _requests(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, suites: Sequence[Suite]
              ) -> list[GenerationRequest]:
    stops = stop_ids(recipe, tokenizer)
    return [request_for(tokenizer, ex.prompt, suite.max_new_tokens, stops)
            for suite in suites for ex in suite.examples]


def _generation_scores(tokenizer: PreTrainedTokenizerBase, suites: Sequence[Suite],
                       outputs: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Split the flat outputs back into suites and score each."""
    scores: dict[str, Any] = {}
    start = 0
    for suite in suites:
        texts = [_decode(tokenizer, ids) for ids in outputs[start:start + len(suite.examples)]]
        start += len(suite.examples)
        if suite.task is None:
            scores.update(_heldout_scores(suite.examples, texts))
        else:
            scores.setdefault("tasks", {})[suite.task.name] = task_result(suite.task,
                                                                          suite.examples, texts)
    assert start == len(outputs), "one output per prompt"
    return scores


def score_model(recipe: Recipe, model_dir: Path, tokenized_dir: Path,
                tokenizer: PreTrainedTokenizerBase, suites: Sequence[Suite],
                requests: list[GenerationRequest],
                generated: list[list[int]] | None = None) -> dict[str, Any]:
    """One model's scores; `generated` holds its outputs when vLLM made them beforehand."""
    model = load_model(recipe, model_dir).eval()
    rows = [dict(input_ids=r["input_ids"], labels=r["labels"])
            for r in load_tokenized(tokenized_dir, "validation")]
    loss, num_tokens = heldout_loss(model, rows, tokenizer.pad_token_id,
                                    recipe.eval_batch_size or recipe.micro_batch_size)
    scores: dict[str, Any] = {"heldout_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                              "num_heldout_tokens": num_tokens}
    if requests:
        if generated is None:
            generated = hf_generate(model, requests)
        scores.update(_generation_scores(tokenizer, suites, generated))
    if recipe.lm_eval_tasks:
        from tunegraph.ops.lm_eval import run_lm_eval

        scores["lm_eval"] = run_lm_eval(recipe, model, tokenizer)
    return scores


def evaluate(recipe: Recipe, base_dir: Path, trained_dir: Path, tokenized_dir: Path,
             progress: Progress | None = None) -> dict[str, Any]:
    """Score the base model and the trained (merged or fully fine-tuned) model."""
    validation = load_tokenized(tokenized_dir, "validation")
    if len(validation) == 0:
        raise ValueError("val_set_size: eval_scores needs held-out rows; set val_set_size > 0")
    references = [json.loads(r) for r in validation["reference"] if r][:recipe.eval_generation_rows]
    suites = _suites(recipe, references)  # reads the task files: their errors come before any model
    models = {"base": Path(base_dir), "trained": Path(trained_dir)}
    tokenizers = {who: load_tokenizer(recipe, path) for who, path in models.items()}
    requests = {who: _requests(recipe, tokenizers[who], suites) for who in models}
    generated: dict[str, list[list[int]] | None] = dict.fromkeys(models)
    if recipe.eval_generation_backend == "vllm" and requests["base"]:
        if progress:
            progress("generate (vllm)", 0, 1)
        outputs = generate("vllm", [GenerationJob(models[who], requests[who]) for who in models],
                           trust_remote_code=recipe.trust_remote_code, seed=recipe.seed)
        generated = dict(zip(models, outputs, strict=True))
        if progress:
            progress("generate (vllm)", 1, 1)
    results: dict[str, Any] = {}
    for index, (who, model_dir) in enumerate(models.items()):
        if progress:
            progress("evaluate", index, len(models))
        results[who] = score_model(recipe, model_dir, tokenized_dir, tokenizers[who], suites,
                                   requests[who], generated[who])
    if progress:
        progress("evaluate", len(models), len(models))
    results["heldout_loss_delta"] = results["trained"]["heldout_loss"] - results["base"]["heldout_loss"]
    return results


def flat_scores(scores: dict[str, Any]) -> dict[str, float]:
    """Every number in `evaluate`'s scores under a slash path ("trained/tasks/colors/score",
    "base/lm_eval/colors_mc/acc"), for Dagster metadata."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", scores)  # lists (samples) are not numbers and stay out
    return flat
