"""tokenize_dataset's options: sample_packing, eval_sample_packing, dataset_exact_deduplication,
test_datasets, skip_invalid_rows, shards; their stats, their errors, and the cache key."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.stages import tokenized_stage
from tunegraph.ops.tokenize import (
    STATS_JSON_KEYS,
    debug_report,
    load_tokenized,
    tokenization_fingerprint,
    tokenize_dataset,
    write_stats_json,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca(count: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"say {i}", "input": "", "output": f"number {i}"}
            for i in range(start, start + count)]


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca(40))
    write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sat " * (i % 7 + 1)}
                                          for i in range(30)])
    return tmp_path


def documents(rows) -> Counter:
    """Every document of a split (packed rows cut at document_lengths) with its labels."""
    found: Counter = Counter()
    for row in rows:
        start = 0
        for n in row.get("document_lengths") or [len(row["input_ids"])]:
            found[(tuple(row["input_ids"][start:start + n]),
                   tuple(row["labels"][start:start + n]))] += 1
            start += n
    return found


def test_packing_holds_the_same_documents_in_fewer_rows(make_recipe, tokenizer_dir, data):
    keys = {"sequence_len": 128, "val_set_size": 10,
            "datasets": [{"path": "a.jsonl", "type": "alpaca"},
                         {"path": "text.jsonl", "type": "completion"}]}
    plain = tokenize_dataset(make_recipe(**keys), tokenizer_dir, data / "plain")
    packed = tokenize_dataset(make_recipe(sample_packing=True, **keys), tokenizer_dir,
                              data / "packed")
    train = load_tokenized(data / "packed", "train")
    assert train.column_names == ["input_ids", "labels", "document_lengths"]
    assert documents(train) == documents(load_tokenized(data / "plain", "train"))
    assert max(len(ids) for ids in train["input_ids"]) <= 128
    # Held-out rows stay one per row (eval_scores reads them); the packed copy is for training.
    assert (load_tokenized(data / "packed", "validation")["input_ids"]
            == load_tokenized(data / "plain", "validation")["input_ids"])
    assert documents(load_tokenized(data / "packed", "validation_packed")) == documents(
        load_tokenized(data / "plain", "validation"))
    assert not (data / "plain" / "validation_packed.parquet").exists()
    for key in ("num_rows", "num_train_rows", "num_tokens", "num_trainable_tokens"):
        assert packed[key] == plain[key], key
    assert packed["num_packed_rows"] == len(train) < plain["num_packed_rows"] == 60
    assert packed["packing_efficiency"] == sum(map(len, train["input_ids"])) / (128 * len(train))
    assert packed["packing_efficiency"] > 1.5 * plain["packing_efficiency"]
    assert sum(int(k) * v for k, v in packed["documents_per_row"].items()) == 60
    assert plain["documents_per_row"] == {"1": 60}


def test_eval_sample_packing_can_be_turned_off(make_recipe, tokenizer_dir, data):
    recipe = make_recipe(sample_packing=True, eval_sample_packing=False, val_set_size=5,
                         datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    tokenize_dataset(recipe, tokenizer_dir, data / "out")
    assert not (data / "out" / "validation_packed.parquet").exists()


def test_exact_deduplication_within_and_across_splits(make_recipe, tokenizer_dir, tmp_path):
    rows = alpaca(10)
    write_jsonl(tmp_path / "a.jsonl", rows + rows[:3] + [rows[0]])   # 4 repeats
    write_jsonl(tmp_path / "test.jsonl", alpaca(2, start=9) + alpaca(2, start=50) * 2)
    keys = {"datasets": [{"path": "a.jsonl", "type": "alpaca"}],
            "test_datasets": [{"path": "test.jsonl", "type": "alpaca"}]}
    kept = tokenize_dataset(make_recipe(**keys), tokenizer_dir, tmp_path / "all")
    deduped = tokenize_dataset(make_recipe(dataset_exact_deduplication=True, **keys),
                               tokenizer_dir, tmp_path / "dedup")
    assert (kept["num_train_rows"], kept["num_validation_rows"]) == (14, 6)
    # Train loses its 4 repeats; the test set loses row 9 (in train) and the repeated pair.
    assert (deduped["num_train_rows"], deduped["num_validation_rows"]) == (10, 3)
    assert deduped["num_duplicates_removed"] == 4 + 3
    train = documents(load_tokenized(tmp_path / "dedup", "train"))
    held_out = documents(load_tokenized(tmp_path / "dedup", "validation"))
    assert set(train.values()) == set(held_out.values()) == {1} and not set(train) & set(held_out)


def test_test_datasets_are_the_held_out_rows(make_recipe, tokenizer, tokenizer_dir, data):
    write_jsonl(data / "test.jsonl", alpaca(3, start=100))
    recipe = make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca"}],
                         test_datasets=[{"path": "test.jsonl", "type": "alpaca"}])
    stats = tokenize_dataset(recipe, tokenizer_dir, data / "out")
    assert (stats["num_train_rows"], stats["num_validation_rows"]) == (40, 3)
    validation = load_tokenized(data / "out", "validation")
    assert [json.loads(r)["answer"] for r in validation["reference"]] == [
        "number 100", "number 101", "number 102"]
    with pytest.raises(ValueError, match="val_set_size is 0.1 but test_datasets is set"):
        make_recipe(val_set_size=0.1, datasets=[{"path": "a.jsonl", "type": "alpaca"}],
                    test_datasets=[{"path": "test.jsonl", "type": "alpaca"}])


# (A wrong type inside a JSON column does not survive loading: Arrow unifies the column's type,
# so the prompt strategies' type errors are tested on rows directly, in test_prompts*.py.)
BAD_ROWS = [{"instruction": "x", "output": "y"}, {"instruction": "z"},
            {"output": "w"}, {"instruction": "v", "output": "u"}]


def test_malformed_rows_fail_with_file_row_and_field_or_are_skipped(make_recipe, tokenizer_dir,
                                                                    tmp_path):
    write_jsonl(tmp_path / "d" / "part-0.jsonl", alpaca(3))
    write_jsonl(tmp_path / "d" / "part-1.jsonl", BAD_ROWS)
    entry = {"path": "d", "type": "alpaca"}
    with pytest.raises(ValueError, match=r"dataset d, row 4 \(counting from 0\): field 'output' "
                                         r"is missing \[file .*part-1\.jsonl, row 1 of that file\]"):
        tokenize_dataset(make_recipe(datasets=[entry]), tokenizer_dir, tmp_path / "out")
    stats = tokenize_dataset(make_recipe(skip_invalid_rows=True, datasets=[entry]),
                             tokenizer_dir, tmp_path / "skip")
    assert (stats["num_invalid_skipped"], stats["num_train_rows"]) == (2, 5)
    assert "row 4 (counting from 0): field 'output' is missing" in stats["invalid_row_examples"][0]
    assert "row 5 (counting from 0): field 'instruction' is missing" in (
        stats["invalid_row_examples"][1])


def test_skipping_every_row_is_still_an_error(make_recipe, tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "x", "answer": "y"}] * 3)
    recipe = make_recipe(skip_invalid_rows=True, datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    with pytest.raises(ValueError, match=r"datasets\[0\] \(a\.jsonl\): every row is invalid, "
                                         r"e\.g\. .*field 'instruction' is missing"):
        tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")


def test_sharded_rows_are_named_by_their_row_in_the_file(make_recipe, tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", alpaca(6) + [{"instruction": "no output"}] + alpaca(5))
    messages = set()
    for index in range(2):
        recipe = make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca", "shards": 2,
                                        "shards_idx": index}])
        try:
            stats = tokenize_dataset(recipe, tokenizer_dir, tmp_path / str(index))
            assert stats["num_train_rows"] == 6
        except ValueError as error:
            messages.add(str(error))
    assert messages == {"dataset a.jsonl, row 6 (counting from 0): field 'output' is missing"}


def test_debug_report_and_stats_json(make_recipe, tokenizer, tokenizer_dir, data):
    recipe = make_recipe(sample_packing=True, sequence_len=256,
                         datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    stats = tokenize_dataset(recipe, tokenizer_dir, data / "out")
    plain = debug_report(data / "out", tokenizer, 2, color=False)
    assert plain.count("--- row") == 2 and "«number" in plain and "\033[" not in plain
    colored = debug_report(data / "out", tokenizer, 1, color=True)
    assert "\033[32m" in colored and "\033[31m" in colored
    first = load_tokenized(data / "out", "train")[0]
    n = first["document_lengths"][0]
    # Masked tokens red, trained green, one entry per token of the first document (+ the legend).
    assert colored.count("\033[31m") == 1 + first["labels"][:n].count(IGNORE_INDEX)
    assert colored.count("\033[32m") == 1 + n - first["labels"][:n].count(IGNORE_INDEX)
    written = write_stats_json(stats, data / "stats" / "s.json")
    assert json.loads((data / "stats" / "s.json").read_text()) == written
    assert list(written) == list(STATS_JSON_KEYS) and written["num_rows"] == 40
    assert written["num_packed_rows"] < 40 and 0 < written["packing_efficiency"] <= 1


def test_packing_and_data_keys_change_the_key_training_keys_do_not(make_recipe, data):
    files = {"tokenizer.json": "abc"}
    entry = {"path": "a.jsonl", "type": "alpaca"}

    def key(**keys):
        keys.setdefault("datasets", [entry])
        return tokenization_fingerprint(make_recipe(**keys), files)

    base = key()
    assert key(learning_rate=0.5, output_dir="elsewhere", micro_batch_size=7) == base
    for changed in ({"sample_packing": True}, {"eval_sample_packing": True},
                    {"dataset_exact_deduplication": True}, {"skip_invalid_rows": True},
                    {"sequence_len": 512}, {"datasets": [{**entry, "shards": 2}]},
                    {"datasets": [{**entry, "shards": 2, "shards_idx": 1}]},
                    {"test_datasets": [{"path": "text.jsonl", "type": "completion"}]}):
        assert key(**changed) != base, changed
    with_test = key(test_datasets=[{"path": "text.jsonl", "type": "completion"}])
    test_file = data / "text.jsonl"
    test_file.write_bytes(test_file.read_bytes().replace(b"cat", b"cap", 1))
    assert key(test_datasets=[{"path": "text.jsonl", "type": "completion"}]) != with_test


def test_a_failed_tokenization_leaves_nothing_behind(make_recipe, tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", BAD_ROWS)
    store = ArtifactStore(tmp_path / "store")
    base = type("Base", (), {"path": tokenizer_dir, "key": "k"})()  # a tokenizer folder
    with pytest.raises(ValueError, match="field 'output' is missing"):
        tokenized_stage(make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca"}]), store,
                        base)
    assert list((tmp_path / "store" / "tokenized").iterdir()) == []
