"""Tokenize a recipe's datasets into train/validation Parquet files with label masks.

    stats = tokenize_dataset(recipe, tokenizer_dir, out_dir)   # writes the files below
    load_tokenized(out_dir, "train")                           # a datasets.Dataset

out_dir/train.parquet        input_ids, labels (-100 where not trained); with sample_packing also
                             document_lengths: each row is several documents (tunegraph.ops.pack)
out_dir/validation.parquet   input_ids, labels, reference (JSON {"prompt", "answer"} or null):
                             one document per row, what eval_scores reads
out_dir/validation_packed.parquet   the same rows packed, when eval_sample_packing
out_dir/stream.json          pretraining_dataset or streaming: true only: what training streams
                             (tunegraph.ops.stream);
                             train.parquet then holds the stream's first rows, as a preview
out_dir/stats.json           counts, truncation, trainable share, packing (asset checks read it)
out_dir/samples.json         up to 3 rows with trained spans wrapped in «»

Rows go through: load (shards) -> encode (prompt strategy, batched) -> skip or fail on malformed
rows -> truncate at sequence_len -> drop rows with nothing to train -> merge -> exact
deduplication -> shuffle -> split (val_set_size, or test_datasets) -> pack.

`tokenization_fingerprint` is the content key of this stage: the same raw bytes, tokenizer files,
data/tokenizer keys and code version give the same output, so the asset is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tunegraph.config import DatasetConfig, Recipe
from tunegraph.config.schema import DataConcern, TokenizerConcern
from tunegraph.ops.base_model import load_tokenizer
from tunegraph.ops.data import (
    data_fingerprint,
    dataset_label,
    load_numbered_rows,
    locate_row,
    resolve_source,
)
from tunegraph.ops.pack import pack_rows
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy

# Bump when the same inputs would give different files (prompt text, masking, split rule, ...).
# 2: packing, deduplication, test_datasets, skipped rows, shards, stats keys.
# 3: prompt strategies package: built-in templates, end-of-turn rule, token-ends-in-span masks.
TOKENIZE_CODE_VERSION = "3"
SPLITS = ("train", "validation", "validation_packed")
NUM_SAMPLES = 3
NUM_INVALID_EXAMPLES = 5
BATCH_ROWS = 256  # rows per batched tokenizer call: large enough for Rust's speed, small for memory
FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32")),
                              "reference": datasets.Value("string")})
# What `tunegraph preprocess --stats-json` writes (the full stats.json has more).
STATS_JSON_KEYS = ("num_rows", "num_tokens", "num_trainable_tokens", "num_truncated",
                   "packing_efficiency", "num_packed_rows")

Progress = Callable[[str, int, int], None]


def tokenization_fingerprint(recipe: Recipe, tokenizer_files_hash: dict[str, str]
                             ) -> dict[str, Any]:
    """Everything the tokenized files depend on, and nothing else (no learning_rate, output_dir)."""
    return {"data": data_fingerprint(recipe),
            "keys": recipe.concern_values(DataConcern, TokenizerConcern),
            # `seed` shuffles and splits only while dataset_seed is unset; data_seed is that choice.
            "data_seed": recipe.data_seed,
            "code_version": TOKENIZE_CODE_VERSION,
            "tokenizer_files": tokenizer_files_hash}


def mark_trained(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]
                 ) -> str:
    """The row's text with every trained run of tokens wrapped in «»."""
    pieces, run, run_trained = [], [], False
    for token, label in [*zip(input_ids, labels, strict=True), (None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if run and (token is None or trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"«{text}»" if run_trained else text)
            run = []
        run.append(token)
        run_trained = trained
    return "".join(pieces)


GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def render_tokens(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int],
                  color: bool) -> str:
    """One row token by token, as `axolotl preprocess --debug` shows it: trained tokens green,
    masked ones red, each as `text(id)`. Without colour, trained tokens are wrapped in «»."""
    if not color:
        return mark_trained(tokenizer, input_ids, labels)
    pieces = []
    for token, label in zip(input_ids, labels, strict=True):
        text = tokenizer.decode([token], skip_special_tokens=False)
        pieces.append(f"{RED if label == IGNORE_INDEX else GREEN}{text!r}({token}){RESET}")
    return " ".join(pieces)


def _num_validation_rows(val_set_size: float, num_rows: int) -> int:
    if val_set_size <= 0:
        return 0
    if val_set_size < 1:
        # A share rounds up, as in datasets' train_test_split; round() first because
        # 0.1 * 30 is 3.0000000000000004 in floating point, which would round up to 4.
        num_val = math.ceil(round(val_set_size * num_rows, 6))
    elif val_set_size != int(val_set_size):
        raise ValueError(f"val_set_size: {val_set_size} is a row count (>= 1) but not a whole "
                         f"number; use a share below 1 or a whole row count")
    else:
        num_val = int(val_set_size)
    if num_val < 1 or num_val >= num_rows:
        raise ValueError(f"val_set_size: {val_set_size} gives {num_val} validation rows out of "
                         f"{num_rows} tokenized rows; at least one validation row and one "
                         f"training row are needed")
    return num_val


class _Collected:
    """Kept rows of one part (training data, or test_datasets) and what happened to the others."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {"input_ids": [], "labels": [], "reference": []}
        self.counts: Counter[str] = Counter({"num_truncated": 0, "num_dropped_no_trainable": 0,
                                             "num_invalid_skipped": 0})
        self.invalid_examples: list[str] = []
        self.samples: list[dict[str, Any]] = []


def _row_problem(recipe: Recipe, dataset_cfg: DatasetConfig, row_number: int,
                 error: ValueError) -> ValueError:
    """The strategy's error (it names the dataset, row and field), plus the file and its row
    when the dataset is read from several files."""
    source = resolve_source(recipe, dataset_cfg)
    if len(source.files) < 2:
        return error
    name, row_in_file = locate_row(recipe, dataset_cfg, row_number)
    return ValueError(f"{error} [file {name}, row {row_in_file} of that file]")


def _encode_dataset(recipe: Recipe, index: int, dataset_cfg: DatasetConfig,
                    tokenizer: PreTrainedTokenizerBase, out: _Collected, references: bool,
                    stage: str, cache_dir: Path | None, progress: Progress | None) -> None:
    """Append one dataset's kept rows to `out`."""
    rows, numbers = load_numbered_rows(recipe, dataset_cfg, cache_dir)
    strategy = make_strategy(tokenizer, dataset_cfg, recipe.train_on_inputs,
                             eot_tokens=getattr(recipe, "eot_tokens", None),
                             search_dirs=[recipe.base_dir])
    total = len(rows)
    invalid_before = out.counts["num_invalid_skipped"]
    with tqdm(total=total, desc=stage, file=sys.stderr, unit="row", mininterval=1.0) as bar:
        for start in range(0, total, BATCH_ROWS):
            chunk = rows[start:start + BATCH_ROWS]
            batch = [dict(zip(chunk, values, strict=True)) for values in zip(*chunk.values(),
                                                                             strict=True)]
            row_numbers = [numbers[start + i] if numbers else start + i for i in range(len(batch))]
            try:
                # Row numbers only reach error messages, which the one-by-one pass below gives
                # exactly (shards keep rows whose numbers are not consecutive).
                encoded: list[dict[str, list[int]] | None] = list(
                    strategy.encode_batch(batch, row_numbers[0]))
            except ValueError:  # some row is malformed: encode one by one to find which
                encoded = []
                for row, number in zip(batch, row_numbers, strict=True):
                    try:
                        encoded.append(strategy(row, number))
                    except ValueError as exc:
                        if not recipe.skip_invalid_rows:
                            raise _row_problem(recipe, dataset_cfg, number, exc) from exc
                        out.counts["num_invalid_skipped"] += 1
                        if len(out.invalid_examples) < NUM_INVALID_EXAMPLES:
                            out.invalid_examples.append(str(exc))
                        encoded.append(None)
            for row, number, enc in zip(batch, row_numbers, encoded, strict=True):
                if enc is not None:
                    _keep(recipe, index, strategy, row, number, enc, out, references, tokenizer)
            bar.update(len(batch))
            if progress:
                progress(stage, start + len(batch), total)
    if total == 0 and progress:
        progress(stage, 0, 0)
    if total and out.counts["num_invalid_skipped"] - invalid_before == total:
        # Every row failed: more likely a wrong recipe key than bad data. Say so, with the error.
        raise ValueError(f"{dataset_label(recipe, dataset_cfg)}: every row is invalid, e.g. "
                         f"{out.invalid_examples[-1]}")


def _keep(recipe: Recipe, index: int, strategy: Any, row: dict[str, Any], number: int,
          encoded: dict[str, list[int]], out: _Collected, references: bool,
          tokenizer: PreTrainedTokenizerBase) -> None:
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    if len(ids) > recipe.sequence_len:
        out.counts["num_truncated"] += 1
        ids, labels = ids[:recipe.sequence_len], labels[:recipe.sequence_len]
    if all(label == IGNORE_INDEX for label in labels):
        out.counts["num_dropped_no_trainable"] += 1
        return
    reference = strategy.reference(row, number) if references else None
    out.columns["input_ids"].append(ids)
    out.columns["labels"].append(labels)
    out.columns["reference"].append(
        None if reference is None else json.dumps({"prompt": reference[0],
                                                   "answer": reference[1]}))
    if sum(s["dataset"] == index for s in out.samples) < NUM_SAMPLES:
        out.samples.append({"dataset": index, "row": number, "num_tokens": len(ids),
                            "text": mark_trained(tokenizer, ids, labels)})


def _collect(recipe: Recipe, entries: list[DatasetConfig], key: str, tokenizer_dir: Path,
             references: bool, cache_dir: Path | None, progress: Progress | None) -> _Collected:
    out = _Collected()
    tokenizers: dict[str | None, PreTrainedTokenizerBase] = {}
    for index, dataset_cfg in enumerate(entries):
        template = dataset_cfg.chat_template
        if template not in tokenizers:
            tokenizers[template] = load_tokenizer(recipe, Path(tokenizer_dir),
                                                  chat_template=template)
        _encode_dataset(recipe, index, dataset_cfg, tokenizers[template], out, references,
                        f"tokenize {key}[{index}]", cache_dir, progress)
    return out


def _row_digest(ids: list[int], labels: list[int]) -> bytes:
    return hashlib.sha256(array("i", ids).tobytes() + b"|" + array("i", labels).tobytes()).digest()


def deduplicate(columns: dict[str, list], seen: set[bytes] | None = None) -> int:
    """Drop, in place, rows whose (input_ids, labels) equal an earlier row's or a digest in
    `seen` (rows of another split); keeps first occurrences in order. Returns how many went.
    Like Axolotl's dataset_exact_deduplication, rows are compared after tokenization."""
    seen = set() if seen is None else seen
    keep = []
    for i, (ids, labels) in enumerate(zip(columns["input_ids"], columns["labels"], strict=True)):
        digest = _row_digest(ids, labels)
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    removed = len(columns["input_ids"]) - len(keep)
    if removed:
        for name in columns:
            columns[name] = [columns[name][i] for i in keep]
    return removed


def _pick_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Round-robin over datasets so a recipe mixing several shows each of them.
    seen: dict[int, int] = {}
    ranked = []
    for sample in samples:  # in dataset order, then row order
        rank = seen[sample["dataset"]] = seen.get(sample["dataset"], -1) + 1
        ranked.append((rank, sample["dataset"], sample))
    return [sample for *_, sample in sorted(ranked, key=lambda r: r[:2])][:NUM_SAMPLES]


def unpacked_packing_stats(train: datasets.Dataset, sequence_len: int) -> dict[str, Any]:
    """pack_rows' stats for rows left unpacked: each row one document in a row of sequence_len
    (the efficiency is then the share of a sequence_len-wide batch that holds tokens)."""
    num_tokens = sum(len(ids) for ids in train["input_ids"]) if len(train) else 0
    return {"num_packed_rows": len(train),
            "packing_efficiency": num_tokens / (len(train) * sequence_len) if len(train) else 0.0,
            "packing_lower_bound_rows": -(-num_tokens // sequence_len),
            "documents_per_row": {"1": len(train)} if len(train) else {}}


def tokenize_dataset(recipe: Recipe, tokenizer_dir: Path, out_dir: Path,
                     progress: Progress | None = None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Tokenize, truncate, merge, deduplicate, shuffle, split and pack the recipe's datasets into
    `out_dir`; returns the stats also written to stats.json. `progress(stage, done, total)` is
    called after every batch of BATCH_ROWS rows of each dataset."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.pretraining_dataset or (recipe.streaming and recipe.datasets):
        from tunegraph.ops.stream import write_stream

        return write_stream(recipe, Path(tokenizer_dir), out_dir, progress, cache_dir)
    held_out_split = recipe.val_set_size > 0
    data = _collect(recipe, recipe.datasets, "datasets", tokenizer_dir, held_out_split,
                    cache_dir, progress)
    seen: set[bytes] = set()
    num_duplicates = (deduplicate(data.columns, seen) if recipe.dataset_exact_deduplication
                      else 0)
    merged = datasets.Dataset.from_dict(data.columns, features=FEATURES)
    if len(merged) == 0:
        labels = ", ".join(dataset_label(recipe, d) for d in recipe.datasets)
        raise ValueError(f"datasets: no row with a trained token remains in {labels} "
                         f"({data.counts['num_dropped_no_trainable']} dropped, "
                         f"{data.counts['num_invalid_skipped']} invalid)")
    if recipe.shuffle_merged_datasets:
        merged = merged.shuffle(seed=recipe.data_seed)
    counts = Counter(data.counts)
    invalid_examples = list(data.invalid_examples)
    if recipe.test_datasets:
        test = _collect(recipe, recipe.test_datasets, "test_datasets", tokenizer_dir, True,
                        cache_dir, progress)
        if recipe.dataset_exact_deduplication:
            num_duplicates += deduplicate(test.columns, seen)
        counts.update(test.counts)
        invalid_examples += test.invalid_examples[:NUM_INVALID_EXAMPLES - len(invalid_examples)]
        train = merged
        validation = datasets.Dataset.from_dict(test.columns, features=FEATURES)
        if len(validation) == 0:
            raise ValueError("test_datasets: no row with a trained token remains")
    else:
        num_validation = _num_validation_rows(recipe.val_set_size, len(merged))
        if num_validation:
            parts = merged.train_test_split(test_size=num_validation, shuffle=False)
            train, validation = parts["train"], parts["test"]
        else:
            train, validation = merged, merged.select([])
    train = train.remove_columns("reference")

    if recipe.sample_packing:
        packed_train, packing = pack_rows(train, recipe.sequence_len)
        packed_train.to_parquet(str(out_dir / "train.parquet"))
    else:
        packing = unpacked_packing_stats(train, recipe.sequence_len)
        train.to_parquet(str(out_dir / "train.parquet"))
    validation.to_parquet(str(out_dir / "validation.parquet"))
    if recipe.packs_eval and len(validation):
        packed_validation, _ = pack_rows(validation.remove_columns("reference"),
                                         recipe.sequence_len)
        packed_validation.to_parquet(str(out_dir / "validation_packed.parquet"))

    num_tokens = sum(len(ids) for part in (train, validation) for ids in part["input_ids"])
    num_trainable = sum(sum(label != IGNORE_INDEX for label in labels)
                        for part in (train, validation) for labels in part["labels"])
    stats = {"num_rows": len(train) + len(validation), "num_train_rows": len(train),
             "num_validation_rows": len(validation), "num_tokens": num_tokens,
             "num_trainable_tokens": num_trainable, **dict(sorted(counts.items())),
             "num_duplicates_removed": num_duplicates,
             "trainable_share": num_trainable / num_tokens, "sequence_len": recipe.sequence_len,
             "sample_packing": recipe.sample_packing, **packing,
             "invalid_row_examples": invalid_examples}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out_dir / "samples.json").write_text(json.dumps(_pick_samples(data.samples), indent=2,
                                                     ensure_ascii=False) + "\n")
    return stats


def load_tokenized(directory: Path, split: str) -> datasets.Dataset:
    """A split written by `tokenize_dataset`, as a `datasets.Dataset` (memory-mapped Arrow)."""
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    path = Path(directory) / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(f"{path}: no tokenized {split} split here (run tokenization first)")
    # The artifact's files never change under their path (content-addressed store), so the path
    # is the fingerprint; without one, datasets would pickle every token to hash the table.
    stat = path.stat()
    return datasets.Dataset(pq.read_table(path, memory_map=True),
                            fingerprint=hashlib.sha256(
                                f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
                            ).hexdigest()[:16])


def debug_rows(directory: Path, num_rows: int) -> list[dict[str, Any]]:
    """The first `num_rows` documents of the training split (a packed row is cut back into its
    documents), each {"input_ids", "labels"}: what `tunegraph preprocess --debug` shows."""
    from tunegraph.ops.packed_attention import documents_of

    rows = load_tokenized(directory, "train")
    shown: list[dict[str, Any]] = []
    for row in rows:
        for document in documents_of(row):
            if len(shown) == num_rows:
                return shown
            shown.append(document)
    return shown


def debug_report(directory: Path, tokenizer: PreTrainedTokenizerBase, num_rows: int,
                 color: bool) -> str:
    """The first `num_rows` training documents token by token (`render_tokens`), with a legend."""
    legend = (f"legend: {GREEN}trained{RESET} {RED}masked (-100){RESET}" if color
              else "legend: «trained», the rest masked (-100)")
    parts = [legend]
    for number, row in enumerate(debug_rows(directory, num_rows)):
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        parts.append(f"--- row {number}: {len(row['input_ids'])} tokens, {trained} trained ---\n"
                     + render_tokens(tokenizer, row["input_ids"], row["labels"], color))
    return "\n".join(parts)


def write_stats_json(stats: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the `--stats-json` subset of `stats` to `path` atomically (a temporary file renamed
    into place, so a reader never sees half a file); returns what was written."""
    picked = {key: stats.get(key) for key in STATS_JSON_KEYS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(picked, indent=2) + "\n")
    tmp.replace(path)
    return picked
