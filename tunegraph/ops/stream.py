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

`streaming: true` streams `datasets:` the same way (SftStream): rows are read with
`load_dataset(..., streaming=True)` from the same sources as without streaming, encoded by the
dataset's prompt strategy (labels as without streaming), truncated at `sequence_len`, rows with
nothing to train dropped; without `sample_packing` each row is one training row, with it the
documents are packed `streaming_multipack_buffer_size` at a time as above (labels kept).
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
from tunegraph.ops.base_model import _chat_template, load_tokenizer
from tunegraph.ops.data import (
    _load_files,
    _load_hub,
    dataset_label,
    resolve_source,
    source_fingerprint,
    stream_rows,
)
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
    yield from pack_documents(recipe, ((ids[:width], ids[:width])
                                       for ids in _documents(texts, tokenizer)))


def pack_documents(recipe: Recipe, documents: Iterator[tuple[list[int], list[int]]]
                   ) -> Iterator[dict[str, list[int]]]:
    """Packed rows from (input_ids, labels) documents no longer than sequence_len, gathered
    streaming_multipack_buffer_size at a time and packed best-fit-decreasing."""
    buffer: list[tuple[list[int], list[int]]] = []
    for doc in _with_end(documents):
        if doc is not None:
            buffer.append(doc)
        if buffer and (doc is None or len(buffer) == recipe.streaming_multipack_buffer_size):
            for bin_rows in best_fit_decreasing([len(d[0]) for d in buffer],
                                                recipe.sequence_len):
                docs = [buffer[i] for i in bin_rows]
                yield {"input_ids": [t for ids, _ in docs for t in ids],
                       "labels": [t for _, labels in docs for t in labels],
                       "document_lengths": [len(ids) for ids, _ in docs]}
            buffer = []


def streamed_sources(recipe: Recipe) -> list[Any]:
    """The entries a stream artifact reads: pretraining_dataset, else (streaming) datasets."""
    return list(recipe.pretraining_dataset or recipe.datasets)


def _dataset_rows(recipe: Recipe, cfg: Any, commit: str | None) -> datasets.IterableDataset:
    source = resolve_source(recipe, cfg)
    if source.kind == "hub":
        return _load_hub(source, cfg, None, streaming=True, commit=commit)
    return _load_files(source, cfg, None, streaming=True)


def _encoded(recipe: Recipe, cfg: Any, strategy: Any, rows: datasets.IterableDataset
             ) -> Iterator[tuple[list[int], list[int]]]:
    """One dataset's kept documents (input_ids, labels), as tokenize_dataset keeps them."""
    from tunegraph.ops.prompts import IGNORE_INDEX
    from tunegraph.ops.tokenize import BATCH_ROWS

    def encode(batch: list[dict[str, Any]], numbers: list[int]) -> list[Any]:
        try:
            return list(strategy.encode_batch(batch, numbers[0]))
        except ValueError:  # some row is malformed: one by one to name it (or skip it)
            encoded = []
            for row, number in zip(batch, numbers, strict=True):
                try:
                    encoded.append(strategy(row, number))
                except ValueError:
                    if not recipe.skip_invalid_rows:
                        raise
                    encoded.append(None)
            return encoded

    batch: list[dict[str, Any]] = []
    numbers: list[int] = []
    for row in _with_end(iter(rows)):
        if row is not None:
            numbers.append(row.pop(ROW_NUMBER))
            batch.append(row)
        if batch and (row is None or len(batch) == BATCH_ROWS):
            for enc in encode(batch, numbers):
                if enc is None:
                    continue
                ids = enc["input_ids"][:recipe.sequence_len]
                labels = enc["labels"][:recipe.sequence_len]
                if any(label != IGNORE_INDEX for label in labels):
                    yield list(ids), list(labels)
            batch, numbers = [], []


def _sft_documents(recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                   pins: list[dict[str, Any]]) -> Iterator[tuple[list[int], list[int]]]:
    """The datasets' kept documents, round-robin across datasets, each shuffled in a buffer with
    the data seed when shuffle_merged_datasets."""
    import copy

    from tunegraph.ops.prompts import make_strategy

    iterators = []
    for index, (cfg, pin) in enumerate(zip(recipe.datasets, pins, strict=True)):
        dataset_tokenizer = tokenizer
        if cfg.chat_template is not None:
            dataset_tokenizer = copy.deepcopy(tokenizer)
            dataset_tokenizer.chat_template = _chat_template(recipe, dataset_tokenizer,
                                                             cfg.chat_template)
        strategy = make_strategy(dataset_tokenizer, cfg, recipe.train_on_inputs,
                                 eot_tokens=getattr(recipe, "eot_tokens", None),
                                 search_dirs=[recipe.base_dir])
        rows = _dataset_rows(recipe, cfg, pin.get("commit"))
        rows = rows.map(lambda _, n: {ROW_NUMBER: n}, with_indices=True)
        if recipe.shuffle_merged_datasets:
            rows = rows.shuffle(seed=recipe.data_seed + index,
                                buffer_size=recipe.streaming_multipack_buffer_size)
        iterators.append(_encoded(recipe, cfg, strategy, rows))
    while iterators:
        for it in list(iterators):
            doc = next(it, None)
            if doc is None:
                iterators.remove(it)
            else:
                yield doc


def sft_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, pins: list[dict[str, Any]]
             ) -> Iterator[dict[str, list[int]]]:
    """Training rows of streamed `datasets` (see the module docstring)."""
    documents = _sft_documents(recipe, tokenizer, pins)
    if recipe.sample_packing:
        yield from pack_documents(recipe, documents)
    else:
        for ids, labels in documents:
            yield {"input_ids": ids, "labels": labels}


def _stream_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                 pins: list[dict[str, Any]]) -> Iterator[dict[str, list[int]]]:
    if recipe.pretraining_dataset:
        return token_rows(recipe, tokenizer, _texts(recipe, pins))
    return sft_rows(recipe, tokenizer, pins)


def check_pins(recipe: Recipe, pins: list[dict[str, Any]]) -> None:
    """Local and URL sources must still hold what was pinned at preprocessing."""
    for cfg, pin in zip(streamed_sources(recipe), pins, strict=True):
        if "files" in pin and source_fingerprint(recipe, cfg) != pin:
            raise ValueError(f"{dataset_label(recipe, cfg)}: the files changed since the "
                             f"tokenized dataset was made; run `tunegraph preprocess` again")


class PretrainingStream(torch.utils.data.IterableDataset):
    """The training rows of a stream artifact (pretraining_dataset, or `datasets` with
    streaming: true); each iteration (epoch) starts the stream over."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, tokenized_dir: Path):
        super().__init__()
        spec = json.loads((Path(tokenized_dir) / STREAM_FILE).read_text())
        check_pins(recipe, spec["sources"])
        self.recipe, self.tokenizer, self.pins = recipe, tokenizer, spec["sources"]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return _stream_rows(self.recipe, self.tokenizer, self.pins)


SftStream = PretrainingStream  # the same class reads a streamed `datasets:` artifact


def write_stream(recipe: Recipe, tokenizer_dir: Path, out_dir: Path,
                 progress: Progress | None = None, cache_dir: Path | None = None
                 ) -> dict[str, Any]:
    """The tokenized artifact of a stream (pretraining_dataset or streaming datasets): stream.json, a preview train.parquet,
    validation rows from test_datasets, stats.json and samples.json (see tunegraph.ops.tokenize).
    Counts in the stats are those of the preview (and the validation rows): a stream's total is
    unknown until it is read."""
    from tunegraph.ops.tokenize import FEATURES, _collect, mark_trained

    key = "pretraining_dataset" if recipe.pretraining_dataset else "datasets"
    stage = f"preview {'pretraining' if recipe.pretraining_dataset else 'datasets'} stream"
    pins = [source_fingerprint(recipe, cfg) for cfg in streamed_sources(recipe)]
    tokenizer = load_tokenizer(recipe, tokenizer_dir)
    preview = []
    bar = tqdm(total=PREVIEW_ROWS, desc=stage, file=sys.stderr, unit="row")
    for row in _stream_rows(recipe, tokenizer, pins):
        preview.append(row)
        bar.update(1)
        if len(preview) == PREVIEW_ROWS:
            break
    bar.close()
    if not preview:
        raise ValueError(f"{key}: the stream holds no row with a trained token")
    if progress:
        progress(stage, len(preview), PREVIEW_ROWS)
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
    num_trainable = sum(sum(label != -100 for label in r["labels"]) for r in preview) + sum(
        sum(label != -100 for label in labels) for labels in columns["labels"])
    stats = {"streaming": True, "num_rows": len(lengths) + len(validation),
             "num_train_rows": len(lengths), "num_validation_rows": len(validation),
             "num_tokens": num_tokens, "num_trainable_tokens": num_trainable,
             "num_truncated": 0, "num_dropped_no_trainable": 0, "num_invalid_skipped": 0,
             **counts, "trainable_share": num_trainable / num_tokens,
             "sequence_len": recipe.sequence_len, "sample_packing": recipe.sample_packing,
             **packing, "num_preview_rows": len(preview)}
    (out_dir / STREAM_FILE).write_text(json.dumps({"key": key, "sources": pins,
                                                   "preview_rows": len(preview)}, indent=2))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    first = preview[0]
    (out_dir / "samples.json").write_text(json.dumps([{
        "dataset": 0, "row": 0, "num_tokens": len(first["input_ids"]),
        "text": mark_trained(tokenizer, first["input_ids"], first["labels"])}], indent=2,
        ensure_ascii=False) + "\n")
    return stats
