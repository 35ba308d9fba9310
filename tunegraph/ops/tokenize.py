"""Tokenize a recipe's datasets into train/validation Parquet files with label masks.

    stats = tokenize_dataset(recipe, tokenizer_dir, out_dir)   # writes the files below
    load_tokenized(out_dir, "train")                           # a datasets.Dataset

out_dir/train.parquet        input_ids, labels (-100 where not trained)
out_dir/validation.parquet   input_ids, labels, reference (JSON {"prompt", "answer"} or null)
out_dir/stats.json           row/token counts, truncation and trainable share (asset checks read it)
out_dir/samples.json         up to 3 rows with trained spans wrapped in «»

`tokenization_fingerprint` is the content key of this stage: the same raw bytes, tokenizer files,
data/tokenizer keys and code version give the same output, so the asset is a cache hit.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from tunegraph.config import Recipe
from tunegraph.config.schema import DataConcern, TokenizerConcern
from tunegraph.ops.base_model import load_tokenizer
from tunegraph.ops.data import data_fingerprint, dataset_label, load_rows
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy, reference_answer

# Bump when the same inputs would give different files (prompt text, masking, split rule, ...).
TOKENIZE_CODE_VERSION = "1"
SPLITS = ("train", "validation")
NUM_SAMPLES = 3
PROGRESS_EVERY = 100
FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32")),
                              "reference": datasets.Value("string")})


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


def _tokenize_one(recipe: Recipe, index: int, tokenizer: PreTrainedTokenizerBase,
                  columns: dict[str, list], counts: dict[str, int],
                  samples: list[dict[str, Any]], cache_dir: Path | None,
                  progress: Callable[[str, int, int], None] | None) -> None:
    """Append one dataset's kept rows to `columns`, updating `counts` and `samples`."""
    dataset_cfg = recipe.datasets[index]
    rows = load_rows(recipe, dataset_cfg, cache_dir)
    strategy = make_strategy(tokenizer, dataset_cfg, recipe.train_on_inputs)
    stage = f"tokenize datasets[{index}]"
    total = len(rows)
    for row_number, row in enumerate(tqdm(rows, desc=stage, total=total, file=sys.stderr,
                                          unit="row", mininterval=1.0)):
        encoded = strategy(row, row_number)
        assert len(encoded["input_ids"]) == len(encoded["labels"])
        if len(encoded["input_ids"]) > recipe.sequence_len:
            counts["num_truncated"] += 1
            encoded = {k: v[:recipe.sequence_len] for k, v in encoded.items()}
        if all(label == IGNORE_INDEX for label in encoded["labels"]):
            counts["num_dropped_no_trainable"] += 1
        else:
            reference = reference_answer(dataset_cfg, row, row_number)
            columns["input_ids"].append(encoded["input_ids"])
            columns["labels"].append(encoded["labels"])
            columns["reference"].append(
                None if reference is None
                else json.dumps({"prompt": reference[0], "answer": reference[1]}))
            if sum(s["dataset"] == index for s in samples) < NUM_SAMPLES:
                samples.append({"dataset": index, "row": row_number,
                                "num_tokens": len(encoded["input_ids"]),
                                "text": mark_trained(tokenizer, **encoded)})
        done = row_number + 1
        if progress and (done % PROGRESS_EVERY == 0 or done == total):
            progress(stage, done, total)
    if total == 0 and progress:
        progress(stage, 0, 0)


def _pick_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Round-robin over datasets so a recipe mixing several shows each of them.
    seen: dict[int, int] = {}
    ranked = []
    for sample in samples:  # in dataset order, then row order
        rank = seen[sample["dataset"]] = seen.get(sample["dataset"], -1) + 1
        ranked.append((rank, sample["dataset"], sample))
    return [sample for *_, sample in sorted(ranked, key=lambda r: r[:2])][:NUM_SAMPLES]


def tokenize_dataset(recipe: Recipe, tokenizer_dir: Path, out_dir: Path,
                     progress: Callable[[str, int, int], None] | None = None,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Tokenize, truncate, merge, shuffle and split every dataset of the recipe into `out_dir`;
    returns the stats also written to stats.json. `progress(stage, done, total)` is called every
    100 rows and at the end of each dataset."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {"input_ids": [], "labels": [], "reference": []}
    counts = {"num_truncated": 0, "num_dropped_no_trainable": 0}
    samples: list[dict[str, Any]] = []
    tokenizers: dict[str | None, PreTrainedTokenizerBase] = {}
    for index, dataset_cfg in enumerate(recipe.datasets):
        template = dataset_cfg.chat_template
        if template not in tokenizers:
            tokenizers[template] = load_tokenizer(recipe, Path(tokenizer_dir),
                                                  chat_template=template)
        _tokenize_one(recipe, index, tokenizers[template], columns, counts, samples, cache_dir,
                      progress)

    merged = datasets.Dataset.from_dict(columns, features=FEATURES)
    if len(merged) == 0:
        labels = ", ".join(dataset_label(recipe, d) for d in recipe.datasets)
        raise ValueError(f"datasets: no row with a trained token remains in {labels} "
                         f"({counts['num_dropped_no_trainable']} dropped)")
    if recipe.shuffle_merged_datasets:
        merged = merged.shuffle(seed=recipe.data_seed)
    num_validation = _num_validation_rows(recipe.val_set_size, len(merged))
    if num_validation:
        parts = merged.train_test_split(test_size=num_validation, shuffle=False)
        train, validation = parts["train"], parts["test"]
    else:
        train, validation = merged, merged.select([])
    train.remove_columns("reference").to_parquet(str(out_dir / "train.parquet"))
    validation.to_parquet(str(out_dir / "validation.parquet"))

    num_tokens = sum(len(ids) for ids in columns["input_ids"])
    num_trainable = sum(sum(label != IGNORE_INDEX for label in labels)
                        for labels in columns["labels"])
    stats = {"num_rows": len(merged), "num_train_rows": len(train),
             "num_validation_rows": len(validation), "num_tokens": num_tokens,
             "num_trainable_tokens": num_trainable, **counts,
             "trainable_share": num_trainable / num_tokens}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out_dir / "samples.json").write_text(json.dumps(_pick_samples(samples), indent=2,
                                                     ensure_ascii=False) + "\n")
    return stats


def load_tokenized(directory: Path, split: str) -> datasets.Dataset:
    """A split written by `tokenize_dataset`, as a `datasets.Dataset` (memory-mapped Arrow)."""
    if split not in SPLITS:
        raise ValueError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    path = Path(directory) / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(f"{path}: no tokenized {split} split here (run tokenization first)")
    return datasets.Dataset(pq.read_table(path, memory_map=True))
