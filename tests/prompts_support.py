"""Helpers for the prompt-strategy tests (tests/ops/test_prompts*.py): trained spans, golden masks.

Golden masks live in tests/golden/masks/<name>.json: every token of an encoded sample row with
whether it is trained. They were checked by hand when written; regenerate with
TUNEGRAPH_UPDATE_GOLDEN=1 only with a reason in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy

GOLDEN_MASKS = Path(__file__).resolve().parent / "golden" / "masks"
# Every built-in template's special tokens (and Qwen3's <think> tags), so that golden masks show
# them as one token each, as the model families' tokenizers do.
TEMPLATE_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
                   "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                   "[INST]", "[/INST]", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                   "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<tool_call>",
                   "</tool_call>", "<tool_response>", "</tool_response>", "<|header_start|>",
                   "<|header_end|>", "<|eot|>", "<think>", "</think>"]


def with_template_tokens(tokenizer: Any) -> Any:
    """The tokenizer, knowing TEMPLATE_TOKENS as special tokens."""
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_TOKENS})
    return tokenizer


def trained_spans(tokenizer: Any, encoded: dict[str, list[int]]) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    spans, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def encode(tokenizer: Any, row: dict[str, Any], train_on_inputs: bool = False,
           eot_tokens: list[str] | None = None, search_dirs: tuple = (), **dataset_keys: Any
           ) -> dict[str, list[int]]:
    """Row 7 of data/rows.jsonl through the strategy of `dataset_keys`."""
    dataset_cfg = DatasetConfig(path="data/rows.jsonl", **dataset_keys)
    strategy = make_strategy(tokenizer, dataset_cfg, train_on_inputs, eot_tokens=eot_tokens,
                             search_dirs=search_dirs)
    return strategy(row, 7)


def token_table(tokenizer: Any, encoded: dict[str, list[int]]) -> list[list[Any]]:
    """[[token text, trained], ...] for every token."""
    return [[tokenizer.decode([token]), label != IGNORE_INDEX]
            for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True)]


def assert_golden(name: str, tokenizer: Any, encoded: dict[str, list[int]]) -> None:
    """The encoded row equals tests/golden/masks/<name>.json token by token."""
    path = GOLDEN_MASKS / f"{name}.json"
    table = token_table(tokenizer, encoded)
    if os.environ.get("TUNEGRAPH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        body = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in table)
        path.write_text("[\n" + body + "\n]\n")
    assert path.is_file(), f"{path} is missing: run with TUNEGRAPH_UPDATE_GOLDEN=1 and check it"
    assert table == json.loads(path.read_text()), f"tokens or mask differ from {path}"
