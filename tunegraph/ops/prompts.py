"""Prompt strategies: one dataset row -> `{"input_ids": [...], "labels": [...]}`, -100 = untrained.

    strategy = make_strategy(tokenizer, dataset_cfg, train_on_inputs=False)
    strategy(row, row_number)          # -> {"input_ids": [...], "labels": [...]}

Every strategy builds the full text once, tokenizes it once with a fast tokenizer's character
offsets, and marks as trained the tokens that overlap trained character spans. Tokenizing prompt
and answer separately and concatenating would give different tokens than the model sees at
inference, because BPE merges across the boundary (" Paris" is not " " + "Paris").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from tunegraph.config import DatasetConfig
from tunegraph.ops.templates import END_OF_TURN_TOKENS

IGNORE_INDEX = -100

# The Stanford Alpaca prompt, as Axolotl's `type: alpaca` writes it.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")

# Template role -> dataset role names when a dataset sets no `roles` (ShareGPT's human/gpt too).
DEFAULT_ROLES = {"system": ["system"], "user": ["user", "human"],
                 "assistant": ["assistant", "gpt"], "tool": ["tool"]}

Encoded = dict[str, list[int]]
Strategy = Callable[[dict[str, Any], int], Encoded]


def _row_error(dataset_cfg: DatasetConfig, row_number: int, problem: str) -> ValueError:
    return ValueError(f"dataset {dataset_cfg.path}, row {row_number} (counting from 0): {problem}")


def _text_field(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int, key: str,
                optional: bool = False, where: str = "") -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    name = f"{where}.{key}" if where else key
    if value is None:
        raise _row_error(dataset_cfg, row_number, f"field '{name}' is missing")
    if not isinstance(value, str):
        raise _row_error(dataset_cfg, row_number, f"field '{name}' must be a string, got "
                                                  f"{type(value).__name__}")
    return value


def alpaca_prompt(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1
                  ) -> tuple[str, str]:
    """(prompt up to and including '### Response:\\n', response) of an Alpaca row."""
    instruction = _text_field(dataset_cfg, row, row_number, "instruction")
    extra = _text_field(dataset_cfg, row, row_number, "input", optional=True)
    output = _text_field(dataset_cfg, row, row_number, "output")
    template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=extra), output


def chat_messages(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1
                  ) -> list[dict[str, str]]:
    """The row's conversation: `[{"role": template role, "content", "dataset_role"}, ...]`."""
    # Template role names map to themselves, then the defaults, then the dataset's own `roles`.
    to_template = {role: role for role in [*DEFAULT_ROLES, *(dataset_cfg.roles or {})]}
    for mapping in (DEFAULT_ROLES, dataset_cfg.roles or {}):
        to_template.update({name: role for role, names in mapping.items() for name in names})
    raw = row.get(dataset_cfg.field_messages)
    if not isinstance(raw, list) or not raw:
        got = "missing" if raw is None else f"a {type(raw).__name__}, not a non-empty list"
        raise _row_error(dataset_cfg, row_number, f"field '{dataset_cfg.field_messages}' is {got}")
    messages = []
    for turn, message in enumerate(raw):
        where = f"{dataset_cfg.field_messages}[{turn}]"
        if not isinstance(message, dict):
            raise _row_error(dataset_cfg, row_number, f"field '{where}' must be a mapping")
        role_field = f"{where}.{dataset_cfg.message_field_role}"
        role = message.get(dataset_cfg.message_field_role)
        if not isinstance(role, str):
            raise _row_error(dataset_cfg, row_number,
                             f"field '{role_field}' is missing or not a string")
        if role not in to_template:
            known = ", ".join(sorted(to_template))
            raise _row_error(dataset_cfg, row_number,
                             f"field '{role_field}': unknown role '{role}' (known: {known}; "
                             f"map it with roles)")
        content = _text_field(dataset_cfg, message, row_number, dataset_cfg.message_field_content,
                              where=where)
        messages.append({"role": to_template[role], "content": content, "dataset_role": role})
    return messages


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS plus every known end-of-turn token the vocabulary has (Gemma's <end_of_turn> != EOS)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool
            ) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def _overlaps(offset: tuple[int, int], start: int, end: int) -> bool:
    # Special tokens the tokenizer adds (BOS) have the empty span (0, 0) and overlap nothing.
    return offset[0] < end and offset[1] > start and offset[1] > offset[0]


def _alpaca(tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
            train_on_inputs: bool) -> Strategy:
    def encode(row: dict[str, Any], row_number: int) -> Encoded:
        prompt, response = alpaca_prompt(dataset_cfg, row, row_number)
        text = prompt + response
        ids, offsets = _encode(tokenizer, text, add_special_tokens=True)
        eos = tokenizer.eos_token_id
        if train_on_inputs:
            return {"input_ids": ids + [eos], "labels": ids + [eos]}
        labels = [i if _overlaps(o, len(prompt), len(text)) else IGNORE_INDEX
                  for i, o in zip(ids, offsets, strict=True)]
        return {"input_ids": ids + [eos], "labels": labels + [eos]}
    return encode


def _completion(tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
                train_on_inputs: bool) -> Strategy:
    def encode(row: dict[str, Any], row_number: int) -> Encoded:
        text = _text_field(dataset_cfg, row, row_number, dataset_cfg.field or "text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    return encode


def _chat_template(tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
                   train_on_inputs: bool) -> Strategy:
    if not tokenizer.chat_template:
        raise ValueError(f"dataset {dataset_cfg.path}: type chat_template, but the tokenizer has "
                         f"no chat template; set chat_template: chatml or jinja")
    eot_ids = end_of_turn_ids(tokenizer)
    to_train = set(dataset_cfg.roles_to_train)

    def encode(row: dict[str, Any], row_number: int) -> Encoded:
        messages = chat_messages(dataset_cfg, row, row_number)
        # Rendered once for the whole conversation: linear in the number of turns.
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)
        except TemplateError as exc:  # templates reject rows, e.g. "roles must alternate"
            raise _row_error(dataset_cfg, row_number, f"the chat template rejects this "
                                                      f"conversation: {exc}") from exc
        # The template writes BOS itself where the model wants one, so no special tokens here.
        ids, offsets = _encode(tokenizer, rendered, add_special_tokens=False)
        if train_on_inputs:
            return {"input_ids": ids, "labels": list(ids)}
        spans, cursor = [], 0
        for turn, message in enumerate(messages):
            start = rendered.find(message["content"], cursor)
            if start < 0:
                raise _row_error(dataset_cfg, row_number,
                                 f"the content of message {turn} ({message['role']}) is not in "
                                 f"the chat template's rendering (does the template change it?)")
            cursor = start + len(message["content"])
            spans.append((start, cursor))
        trained = [m["role"] in to_train or m["dataset_role"] in to_train for m in messages]
        last_trained = max((t for t, yes in enumerate(trained) if yes), default=-1)
        eos_turns = {"turn": {t for t, yes in enumerate(trained) if yes},
                     "last": {last_trained} - {-1}, "all": set(range(len(messages))),
                     "none": set()}[dataset_cfg.train_on_eos]

        labels = [IGNORE_INDEX] * len(ids)
        token = 0  # walks forward only: one pass over the tokens for all turns
        for turn, (start, end) in enumerate(spans):
            while token < len(ids) and offsets[token][1] <= start:
                token += 1
            while token < len(ids) and offsets[token][0] < end:
                if trained[turn] and _overlaps(offsets[token], start, end):
                    labels[token] = ids[token]
                token += 1
            if turn in eos_turns:
                # The first end-of-turn token before the next message's content.
                stop = spans[turn + 1][0] if turn + 1 < len(spans) else len(rendered)
                for k in range(token, len(ids)):
                    if offsets[k][0] >= stop:
                        break
                    if ids[k] in eot_ids:
                        labels[k] = ids[k]
                        break
        return {"input_ids": ids, "labels": labels}
    return encode


STRATEGIES: dict[str, Callable[[PreTrainedTokenizerBase, DatasetConfig, bool], Strategy]] = {
    "alpaca": _alpaca, "chat_template": _chat_template, "completion": _completion}


def make_strategy(tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
                  train_on_inputs: bool) -> Strategy:
    """The row encoder for the dataset's `type`; the tokenizer must be a fast one (offsets)."""
    if not tokenizer.is_fast:
        raise ValueError(f"dataset {dataset_cfg.path}: tokenizer {type(tokenizer).__name__} is "
                         f"not a fast tokenizer; tunegraph needs character offsets to find "
                         f"trained tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set special_tokens.eos_token")
    return STRATEGIES[dataset_cfg.type](tokenizer, dataset_cfg, train_on_inputs)


def reference_answer(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1
                     ) -> tuple[str | list[dict[str, str]], str] | None:
    """(prompt, expected answer) for exact-match evaluation, or None where a row has none.

    alpaca: the prompt text through '### Response:\\n' and `output`; chat_template: the messages
    before the last assistant message, and its content; completion: None."""
    if dataset_cfg.type == "alpaca":
        return alpaca_prompt(dataset_cfg, row, row_number)
    if dataset_cfg.type == "chat_template":
        messages = chat_messages(dataset_cfg, row, row_number)
        last = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        return prompt, messages[last]["content"]
    return None
