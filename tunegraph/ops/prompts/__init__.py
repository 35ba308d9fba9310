"""Prompt strategies: dataset rows -> `{"input_ids": [...], "labels": [...]}`, -100 = untrained.

    strategy = make_strategy(tokenizer, dataset_cfg, train_on_inputs=False)
    strategy(row, row_number)                 # one row
    strategy.encode_batch(rows, first_row)    # many rows, one batched tokenizer call (faster)
    reference_answer(dataset_cfg, row)        # (prompt, answer) for exact-match evaluation

One module per family: `instruct` (alpaca and Axolotl's instruction types, the custom `type:`
mapping, completion, input_output, pre-tokenized rows), `chat` (chat_template), `user_defined`
(`type: module.function`), `preference` (DPO/IPO/ORPO/KTO rows and GRPO transforms for TRL; no
recipe trains them yet). `common` holds the offset-based masking they share; the golden masks in
tests/ops/test_prompts*.py pin every strategy token by token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunegraph.config import DatasetConfig
from tunegraph.config.schema import InstructionFormat
from tunegraph.ops.prompts.chat import DEFAULT_ROLES, ChatTemplate, chat_messages
from tunegraph.ops.prompts.common import IGNORE_INDEX, Encoded, Strategy
from tunegraph.ops.prompts.instruct import (
    INSTRUCT_FORMATS,
    Completion,
    InputOutput,
    Instruct,
    InstructFormat,
    PreTokenized,
    custom_format,
)
from tunegraph.ops.prompts.user_defined import UserDefined

__all__ = ["DEFAULT_ROLES", "IGNORE_INDEX", "Encoded", "Strategy", "alpaca_prompt",
           "chat_messages", "instruct_format", "make_strategy", "reference_answer", "row_texts"]

TEXT_STRATEGIES = {"completion": Completion, "input_output": InputOutput}


def instruct_format(dataset_cfg: DatasetConfig) -> InstructFormat | None:
    """The instruction format of an instruction-family dataset (or a `type:` mapping), else None."""
    if isinstance(dataset_cfg.type, InstructionFormat):
        return custom_format(dataset_cfg.type)
    return INSTRUCT_FORMATS.get(dataset_cfg.type)  # type: ignore[arg-type]


def make_strategy(tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
                  train_on_inputs: bool, *, eot_tokens: Sequence[str] | None = None,
                  search_dirs: Sequence[Path | str] = ()) -> Strategy:
    """The row encoder for the dataset's `type`; the tokenizer must be a fast one (offsets).

    `eot_tokens` is the recipe's key of that name; `search_dirs` are where `type: module.function`
    modules are looked for (the recipe's folder), before the working directory."""
    if not tokenizer.is_fast:
        raise ValueError(f"dataset {dataset_cfg.path}: tokenizer {type(tokenizer).__name__} is "
                         f"not a fast tokenizer; tunegraph needs character offsets to find "
                         f"trained tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set special_tokens.eos_token")
    kind = dataset_cfg.type
    if kind is None:
        return PreTokenized(tokenizer, dataset_cfg, train_on_inputs)
    fmt = instruct_format(dataset_cfg)
    if fmt is not None:
        return Instruct(tokenizer, dataset_cfg, train_on_inputs, fmt)
    if kind == "chat_template":
        return ChatTemplate(tokenizer, dataset_cfg, train_on_inputs, eot_tokens)
    if kind in TEXT_STRATEGIES:
        return TEXT_STRATEGIES[kind](tokenizer, dataset_cfg, train_on_inputs)
    assert isinstance(kind, str) and "." in kind, f"unvalidated dataset type {kind!r}"
    return UserDefined(tokenizer, dataset_cfg, train_on_inputs,
                       search_dirs=[*search_dirs, Path.cwd()], eot_tokens=eot_tokens)


def alpaca_prompt(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1
                  ) -> tuple[str, str]:
    """(prompt, answer) of an instruction-family row: the prompt runs through the response
    header ('### Response:\\n' for alpaca)."""
    fmt = instruct_format(dataset_cfg) or INSTRUCT_FORMATS["alpaca"]
    instruction, extra, output, system = fmt.fields(dataset_cfg, row, row_number)
    return fmt.prompt(instruction, extra, system), output


def reference_answer(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1
                     ) -> tuple[str | list[dict[str, str]], str] | None:
    """(prompt, expected answer) for exact-match evaluation, or None where a row has none.

    Instruction types: the prompt text and the answer; chat_template: the messages before the
    last assistant message, and its content; other types (completion, input_output,
    pre-tokenized, user-defined): None."""
    if instruct_format(dataset_cfg) is not None:
        return alpaca_prompt(dataset_cfg, row, row_number)
    if dataset_cfg.type == "chat_template":
        messages = chat_messages(dataset_cfg, row, row_number)
        last = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not messages[last]["content"]:
            return None
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        return prompt, messages[last]["content"]
    return None


def row_texts(dataset_cfg: DatasetConfig, row: dict[str, Any]) -> Iterator[str]:
    """The text of one row as the model will read it, for training a tokenizer: instruction rows
    with their prompt template (so its fixed words become few tokens), message contents, text,
    segments. Malformed rows and pre-tokenized or user-defined rows give nothing."""
    texts: list[Any] = []
    try:
        if instruct_format(dataset_cfg) is not None:
            texts = ["".join(alpaca_prompt(dataset_cfg, row))]
        elif dataset_cfg.type == "chat_template":
            texts = [m["content"] for m in chat_messages(dataset_cfg, row)]
        elif dataset_cfg.type == "completion":
            texts = [row.get(dataset_cfg.field or "text")]
        elif dataset_cfg.type == "input_output":
            texts = ["".join(s.get("text") or "" for s in row.get("segments") or []
                             if isinstance(s, dict))]
    except ValueError:  # a malformed row: tokenization reports it with its row number
        return
    yield from (text for text in texts if isinstance(text, str) and text)
