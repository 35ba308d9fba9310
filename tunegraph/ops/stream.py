"""Continued pretraining from a stream: `pretraining_dataset` text, tokenized while training reads it.

    write_stream(recipe, tokenizer_dir, out_dir)             # the tokenized artifact of a stream
    rows = PretrainingStream(recipe, tokenizer, tokenized_dir)    # what training iterates

A stream has no end, so its tokenized artifact cannot hold the rows. It holds what makes the
stream reproducible: `stream.json` pins every source (a hub dataset's commit; a local or fsspec
source's files and content hashes), and those pins are in the stage's key, so an edited file or a
new hub commit is a new tokenized dataset and retrains. Training reads the pinned sources again,
refuses files whose content changed since, and tokenizes on the fly. `train.parquet` holds the
stream's first rows as a preview: what `--debug`, the stats and the merge check look at.

Rows: a text becomes its tokens (BOS as the tokenizer adds it) then EOS; every token is trained.
Without `sample_packing`, the token stream is cut into rows of exactly `sequence_len`, documents
running into each other (Axolotl's pretraining without packing). With it, documents (truncated to
`sequence_len`) are gathered `streaming_multipack_buffer_size` at a time (also the shuffle buffer,
as in Axolotl) and packed best-fit-decreasing into rows with `document_lengths`, so attention stays
inside each document.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tunegraph.config import Recipe
from tunegraph.ops.base_model import load_tokenizer
from tunegraph.ops.data import dataset_label, source_fingerprint, stream_rows
from tunegraph.ops.pack import PACKED_FEATURES, best_fit_decreasing, pack_rows, packing_stats

STREAM_FILE = "stream.json"
TOKENIZE_BATCH = 256
PREVIEW_ROWS = 64
ROW_NUMBER = "__tunegraph_row"

Progress = Callable[[str, int, int], None]


def is_stream(tokenized_dir: Path) -> bool:
    return (Path(tokenized_dir) / STREAM_FILE).is_file()


def _texts(recipe: Recipe, pins: list[dict[str, Any]]) -> Iterator[str]:
    """The sources' texts, round-robin across sources, each shuffled in a buffer with the data
    seed when shuffle_merged_datasets (as Axolotl shuffles its pretraining stream)."""
    iterators = []
    for index, (cfg, pin) in enumerate(zip(recipe.pretraining_dataset or [], pins, strict=True)):
        rows = stream_rows(recipe, cfg, pin.get("commit"))
        rows = rows.map(lambda _, n, skip=cfg.skip: {ROW_NUMBER: n + skip}, with_indices=True)
        if recipe.shuffle_merged_datasets:
            rows = rows.shuffle(seed=recipe.data_seed + index,
                                buffer_size=recipe.streaming_multipack_buffer_size)
        iterators.append(_checked_texts(recipe, cfg, rows))
    while iterators:
        for it in list(iterators):
            text = next(it, None)
            if text is None:
                iterators.remove(it)
            else:
                yield text


def _checked_texts(recipe: Recipe, cfg: Any, rows: datasets.IterableDataset) -> Iterator[str]:
    for row in rows:
        text = row.get(cfg.text_column)
        if not isinstance(text, str):
            got = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise ValueError(f"{dataset_label(recipe, cfg)}, row {row[ROW_NUMBER]} (counting from "
                             f"0): field '{cfg.text_column}' is {got}")
        yield text


def _documents(texts: Iterator[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    for text in _with_end(texts):
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == TOKENIZE_BATCH):
            for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
                yield [*ids, eos]
            batch = []


def _with_end(texts: Iterator[str]) -> Iterator[str | None]:
    yield from texts
    yield None


def token_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, texts: Iterator[str]
               ) -> Iterator[dict[str, list[int]]]:
    """Training rows from texts (see the module docstring)."""
    width = recipe.sequence_len
    if not recipe.sample_packing:
        pending: list[int] = []
        for ids in _documents(texts, tokenizer):
            pending += ids
            while len(pending) >= width:
                row, pending = pending[:width], pending[width:]
                yield {"input_ids": row, "labels": list(row)}
        if pending:
            yield {"input_ids": pending, "labels": list(pending)}
        return
    buffer: list[list[int]] = []
    for ids in _with_end(_documents(texts, tokenizer)):
        if ids is not None:
            buffer.append(ids[:width])
        if buffer and (ids is None or len(buffer) == recipe.streaming_multipack_buffer_size):
            for bin_rows in best_fit_decreasing([len(d) for d in buffer], width):
                docs = [buffer[i] for i in bin_rows]
                tokens = [t for d in docs for t in d]
                yield {"input_ids": tokens, "labels": list(tokens),
                       "document_lengths": [len(d) for d in docs]}
            buffer = []


def check_pins(recipe: Recipe, pins: list[dict[str, Any]]) -> None:
    """Local and URL sources must still hold what was pinned at preprocessing."""
    for cfg, pin in zip(recipe.pretraining_dataset or [], pins, strict=True):
        if "files" in pin and source_fingerprint(recipe, cfg) != pin:
            raise ValueError(f"{dataset_label(recipe, cfg)}: the files changed since the "
                             f"tokenized dataset was made; run `tunegraph preprocess` again")


class PretrainingStream(torch.utils.data.IterableDataset):
    """The training rows of a stream artifact; each iteration (epoch) starts the stream over."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, tokenized_dir: Path):
        super().__init__()
        spec = json.loads((Path(tokenized_dir) / STREAM_FILE).read_text())
        check_pins(recipe, spec["sources"])
        self.recipe, self.tokenizer, self.pins = recipe, tokenizer, spec["sources"]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return token_rows(self.recipe, self.tokenizer, _texts(self.recipe, self.pins))


def write_stream(recipe: Recipe, tokenizer_dir: Path, out_dir: Path,
                 progress: Progress | None = None, cache_dir: Path | None = None
                 ) -> dict[str, Any]:
    """The tokenized artifact of a pretraining stream: stream.json, a preview train.parquet,
    validation rows from test_datasets, stats.json and samples.json (see tunegraph.ops.tokenize).
    Counts in the stats are those of the preview (and the validation rows): a stream's total is
    unknown until it is read."""
    from tunegraph.ops.tokenize import FEATURES, _collect, mark_trained

    pins = [source_fingerprint(recipe, cfg) for cfg in recipe.pretraining_dataset or []]
    tokenizer = load_tokenizer(recipe, tokenizer_dir)
    preview = []
    bar = tqdm(total=PREVIEW_ROWS, desc="preview pretraining stream", file=sys.stderr,
               unit="row")
    for row in token_rows(recipe, tokenizer, _texts(recipe, pins)):
        preview.append(row)
        bar.update(1)
        if len(preview) == PREVIEW_ROWS:
            break
    bar.close()
    if not preview:
        raise ValueError("pretraining_dataset: the stream holds no row")
    if progress:
        progress("preview pretraining stream", len(preview), PREVIEW_ROWS)
    if recipe.sample_packing:
        train = datasets.Dataset.from_list(preview, features=PACKED_FEATURES)
        lengths = [n for row in preview for n in row["document_lengths"]]
        bins, start = [], 0
        for row in preview:
            bins.append(list(range(start, start + len(row["document_lengths"]))))
            start += len(row["document_lengths"])
        packing = packing_stats(lengths, bins, recipe.sequence_len)
    else:
        train = datasets.Dataset.from_list(preview)
        lengths = [len(row["input_ids"]) for row in preview]
        packing = packing_stats(lengths, [[i] for i in range(len(preview))], recipe.sequence_len)
    train.to_parquet(str(out_dir / "train.parquet"))
    columns: dict[str, list] = {"input_ids": [], "labels": [], "reference": []}
    counts: dict[str, int] = {}
    if recipe.test_datasets:
        test = _collect(recipe, recipe.test_datasets, "test_datasets", tokenizer_dir, True,
                        cache_dir, progress)
        columns, counts = test.columns, dict(test.counts)
    validation = datasets.Dataset.from_dict(columns, features=FEATURES)
    validation.to_parquet(str(out_dir / "validation.parquet"))
    if recipe.packs_eval and len(validation):
        packed, _ = pack_rows(validation.remove_columns("reference"), recipe.sequence_len)
        packed.to_parquet(str(out_dir / "validation_packed.parquet"))
    num_tokens = sum(len(r["input_ids"]) for r in preview) + sum(map(len, columns["input_ids"]))
    num_trainable = sum(len(r["input_ids"]) for r in preview) + sum(
        sum(label != -100 for label in labels) for labels in columns["labels"])
    stats = {"streaming": True, "num_rows": len(lengths) + len(validation),
             "num_train_rows": len(lengths), "num_validation_rows": len(validation),
             "num_tokens": num_tokens, "num_trainable_tokens": num_trainable,
             "num_truncated": 0, "num_dropped_no_trainable": 0, "num_invalid_skipped": 0,
             **counts, "trainable_share": num_trainable / num_tokens,
             "sequence_len": recipe.sequence_len, "sample_packing": recipe.sample_packing,
             **packing, "num_preview_rows": len(preview)}
    (out_dir / STREAM_FILE).write_text(json.dumps({"sources": pins,
                                                   "preview_rows": len(preview)}, indent=2))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    first = preview[0]
    (out_dir / "samples.json").write_text(json.dumps([{
        "dataset": 0, "row": 0, "num_tokens": len(first["input_ids"]),
        "text": mark_trained(tokenizer, first["input_ids"], first["labels"])}], indent=2,
        ensure_ascii=False) + "\n")
    return stats
