"""Batches of packed rows in which attention never crosses from one document into another.

    collate = PackedCollator(pad_token_id, attn_implementation="sdpa")
    batch = collate([{"input_ids": [...], "labels": [...], "document_lengths": [3, 5]}, ...])

A packed row (tunegraph.ops.pack) holds several documents. The model must see each of them as if
it were alone: positions restart at 0 per document, a token attends only to earlier tokens of its
own document, and the first token of a document is not a target (its logits' predecessor is the
last token of the previous document). Both attention paths below are transformers' own:

- flash_attention_2 / flash_attention_3 (varlen): the batch is flattened into one row of all its
  documents with `transformers.DataCollatorWithFlattening`, which also gives the cumulative
  sequence lengths (`cu_seq_lens_q/k`, `max_length_q/k`) that flash-attn's varlen kernel takes.
  No padding, no mask, no attention across documents.
- sdpa / eager / flex: rows stay rows (padded to the longest, or to `pad_to`), with `position_ids`
  restarting per document and no `attention_mask`. transformers' masking utilities
  (`find_packed_sequence_indices`) read document boundaries off the restarts and build the
  block-diagonal causal 4D mask for the implementation in use (a boolean mask for SDPA, an
  additive one for eager). Padding is a segment of its own, so no real token attends to it.
  That detection only runs without a KV cache: a model whose config says use_cache builds one
  and then attends across documents (measured: 0.2 logit error on the tiny Llama). Trainer turns
  the cache off (TrainingArguments.use_cache); every batch says `use_cache=False` too, so the
  collator is right outside the Trainer as well.

Rows without `document_lengths` (unpacked rows) are one document each, so the same collator
serves packed training and unpacked evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

IGNORE_INDEX = -100
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def documents_of(row: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The documents of a packed row, each with its own input_ids and labels."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    lengths = row.get("document_lengths") or [len(ids)]
    assert sum(lengths) == len(ids) == len(labels), (sum(lengths), len(ids), len(labels))
    out, start = [], 0
    for length in lengths:
        out.append({"input_ids": ids[start:start + length], "labels": labels[start:start + length]})
        start += length
    return out


def token_tensor(values: Any) -> torch.Tensor:
    """A row's token ids (a list, or an array) as int64, through numpy rather than torch.tensor
    on a Python list (which infers the dtype element by element): collation runs on the main
    process between optimizer steps, while the GPU waits (S1, benchmarks/NOTES.md)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def position_ids_for(document_lengths: list[int]) -> list[int]:
    return [p for length in document_lengths for p in range(length)]


class PackedCollator:
    """Collates packed (or plain) rows for the model's attention implementation; see the module
    docstring. `pad_to` (pad_to_sequence_len) fixes the width of non-flattened batches."""

    def __init__(self, pad_token_id: int, attn_implementation: str | None = None,
                 pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.flatten = attn_implementation in VARLEN_ATTENTION
        self._flattening = DataCollatorWithFlattening(return_flash_attn_kwargs=True,
                                                      separator_id=IGNORE_INDEX)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.flatten:
            batch = self._flattening([doc for row in rows for doc in documents_of(row)])
        else:
            batch = self._rows(rows)
        return {**batch, "use_cache": False}

    def _rows(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        assert self.pad_to is None or longest <= self.pad_to, (longest, self.pad_to)
        width = self.pad_to or longest
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.empty((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            lengths = list(row.get("document_lengths") or [len(row["input_ids"])])
            n = sum(lengths)
            ids[i, :n] = token_tensor(row["input_ids"])
            labels[i, :n] = token_tensor(row["labels"])
            starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
            labels[i, starts] = IGNORE_INDEX  # a document's first token is nobody's target
            # Padding restarts at 0 too: a segment of its own that no real token attends to.
            positions[i] = torch.tensor(position_ids_for(lengths + ([width - n] if width > n
                                                                    else [])))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
