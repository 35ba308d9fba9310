"""Generation tasks from the recipe (`eval_tasks:`): local rows -> prompts, answers, scores.

    examples = load_examples(recipe, 0)                     # eval_tasks[0]'s rows, validated
    requests = [request_for(tokenizer, ex.prompt, n, stop) for ex in examples]
    hit = score(task, generated_text, ex.answer)            # exact_match / contains / regex

A row becomes a prompt and an answer the way training reads it (tunegraph.ops.prompts): alpaca
rows get the Alpaca template and their output, chat rows the messages before the last assistant
message, rendered by the recipe's chat template with the generation prompt; completion rows are
taken as they are (`prompt`, `answer` columns). So a task file can be a held-out slice of the
training data, in the same format.

`local_path` and `suite_fingerprint` are shared with tunegraph.ops.lm_eval: the eval stage's key
hashes every file an eval reads, so editing a task file re-runs evals and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunegraph.config import DatasetConfig, Recipe
from tunegraph.config.schema import EvalTaskConfig
from tunegraph.ops.generate import GenerationRequest
from tunegraph.ops.hashing import hash_file, list_files
from tunegraph.ops.templates import END_OF_TURN_TOKENS

# Samples kept per task in the scores (the UI shows them).
NUM_SAMPLES = 3

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    prompt: Prompt
    answer: str


def local_path(recipe: Recipe, path: str, key: str) -> Path:
    """A file or folder named in the recipe: beside the recipe file, else in the working
    directory; a ValueError naming `key` when it is in neither."""
    raw = Path(path).expanduser()
    candidates = [raw] if raw.is_absolute() else [recipe.base_dir / raw, Path.cwd() / raw]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    where = " and ".join(str(c.parent) for c in candidates)
    raise ValueError(f"{key}: '{path}' not found (looked in {where})")


def _read_rows(path: Path, label: str) -> list[dict[str, Any]]:
    if path.is_dir():
        raise ValueError(f"{label}: '{path}' is a folder; name a .jsonl or .json file")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{label}, line {number + 1}: not valid JSON ({exc.msg})") from None
    elif path.suffix.lower() == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{label}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{label}: a .json task file must hold a list of rows")
    else:
        raise ValueError(f"{label}: '{path.name}' is not a .jsonl or .json file")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{label}, row {number} (counting from 0): a row must be a JSON "
                             f"object, got {type(row).__name__}")
    return rows


def _text(row: dict[str, Any], key: str, label: str, number: int) -> str:
    value = row.get(key)
    if value is None:
        raise ValueError(f"{label}, row {number} (counting from 0): field '{key}' is missing")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric answers ("42") are common in task files
    if not isinstance(value, str):
        raise ValueError(f"{label}, row {number} (counting from 0): field '{key}' must be a "
                         f"string, got {type(value).__name__}")
    return value


def _example(task: EvalTaskConfig, row: dict[str, Any], label: str, number: int) -> Example:
    from tunegraph.ops.prompts import reference_answer

    if task.type == "completion":
        return Example(_text(row, task.field_prompt, label, number),
                       _text(row, task.field_answer, label, number))
    config = DatasetConfig(path=task.path, type=task.type, **(
        {"field_messages": task.field_messages} if task.type == "chat_template" else {}))
    try:
        found = reference_answer(config, row, number)
    except ValueError as exc:  # "dataset PATH, row N (counting from 0): ..." from prompts
        raise ValueError(f"{label}: {exc}") from None
    if found is None:
        raise ValueError(f"{label}, row {number} (counting from 0): no answer to score (a chat "
                         f"row needs an assistant message with content)")
    return Example(*found)


def load_examples(recipe: Recipe, index: int) -> list[Example]:
    """The prompts and answers of `eval_tasks[index]` (its first `limit` rows)."""
    task = recipe.eval_tasks[index]
    label = f"eval_tasks[{index}] ({task.name}, {task.path})"
    path = local_path(recipe, task.path, f"eval_tasks[{index}].path")
    rows = _read_rows(path, label)[:task.limit]
    if not rows:
        raise ValueError(f"{label}: the file has no rows")
    return [_example(task, row, label, number) for number, row in enumerate(rows)]


def stop_ids(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Where a generation ends: EOS, and every end-of-turn token the vocabulary has (a chat
    model ends its answer with <|im_end|> or <|eot_id|>, which need not be its EOS)."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in (*END_OF_TURN_TOKENS, *(recipe.eot_tokens or [])):
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    if not ids:
        raise ValueError("the tokenizer has no eos_token, so generation cannot stop: set "
                         "special_tokens.eos_token")
    return tuple(ids)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Text as training tokenizes it (with the tokenizer's BOS); chat messages through the
    chat template with the assistant's generation prompt."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def request_for(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, max_new_tokens: int,
                stops: tuple[int, ...]) -> GenerationRequest:
    return GenerationRequest(tuple(prompt_ids(tokenizer, prompt)), max_new_tokens, stops)


def score(task: EvalTaskConfig, generated: str, answer: str) -> bool:
    """Whether one generation is right under the task's scorer."""
    generated, answer = generated.strip(), answer.strip()
    if task.ignore_case:
        generated, answer = generated.casefold(), answer.casefold()
    if task.scorer == "exact_match":
        return generated == answer
    if task.scorer == "contains":
        return answer in generated
    assert task.scorer == "regex" and task.pattern is not None
    match = re.search(task.pattern, generated, flags=re.IGNORECASE if task.ignore_case else 0)
    if match is None:
        return False
    if match.re.groups == 0:
        return True
    found = (match.group(1) or "").strip()
    return (found.casefold() if task.ignore_case else found) == answer


def task_result(task: EvalTaskConfig, examples: Sequence[Example], generated: Sequence[str]
                ) -> dict[str, Any]:
    """`{"score", "scorer", "num_rows", "samples"}` for one task and one model."""
    hits = [score(task, text, ex.answer) for ex, text in zip(examples, generated, strict=True)]
    samples = [{"prompt": ex.prompt, "answer": ex.answer, "generated": text, "match": hit}
               for ex, text, hit in list(zip(examples, generated, hits, strict=True))[:NUM_SAMPLES]]
    return {"score": sum(hits) / len(hits), "scorer": task.scorer, "num_rows": len(hits),
            "samples": samples}


def suite_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Content hashes of every file the recipe's evals read: eval_tasks files, lm-eval task
    folders (every file in them) and the data files their task files name. Paths enter only as
    the recipe writes them, so the same recipe in another checkout hashes the same."""
    fingerprint: dict[str, Any] = {}
    for index, task in enumerate(recipe.eval_tasks):
        path = local_path(recipe, task.path, f"eval_tasks[{index}].path")
        fingerprint[f"eval_tasks[{index}]"] = hash_file(path) if path.is_file() else None
    if recipe.lm_eval_tasks:
        from tunegraph.ops.lm_eval import include_paths, task_data_files

        fingerprint["lm_eval_include_path"] = [
            {str(p.relative_to(folder)): hash_file(p) for p in list_files(folder)
             if "__pycache__" not in p.parts} for folder in include_paths(recipe)]
        fingerprint["lm_eval_data_files"] = sorted(hash_file(p) for p in task_data_files(recipe))
    return fingerprint
