"""tokenize_dataset end to end on local files: files, stats, splits, truncation, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.tokenize import load_tokenized, tokenization_fingerprint, tokenize_dataset

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def mixed_recipe(make_recipe, tmp_path):
    """30 alpaca rows, 20 chats, 10 completions; returns a factory taking extra recipe keys."""
    write_jsonl(tmp_path / "data" / "alpaca.jsonl",
                [{"instruction": f"say {i}", "input": "", "output": f"number {i}"}
                 for i in range(30)])
    write_jsonl(tmp_path / "data" / "chat.jsonl",
                [{"messages": [{"role": "user", "content": f"hi {i}"},
                               {"role": "assistant", "content": f"hello {i}"}]}
                 for i in range(20)])
    write_jsonl(tmp_path / "data" / "text.jsonl", [{"text": f"the cat sat {i}"} for i in range(10)])

    def make(**keys):
        keys.setdefault("datasets", [{"path": "data/alpaca.jsonl", "type": "alpaca"},
                                     {"path": "data/chat.jsonl", "type": "chat_template"},
                                     {"path": "data/text.jsonl", "type": "completion"}])
        return make_recipe(sequence_len=256, **keys)
    return make


def test_files_and_stats_are_consistent(mixed_recipe, tokenizer_dir, tmp_path):
    calls = []
    out = tmp_path / "out"
    stats = tokenize_dataset(mixed_recipe(val_set_size=0.1), tokenizer_dir, out,
                             progress=lambda *args: calls.append(args))
    assert json.loads((out / "stats.json").read_text()) == stats
    train, validation = load_tokenized(out, "train"), load_tokenized(out, "validation")
    assert train.column_names == ["input_ids", "labels"]
    assert validation.column_names == ["input_ids", "labels", "reference"]
    assert (stats["num_rows"], stats["num_train_rows"], stats["num_validation_rows"]) == (60, 54, 6)
    assert (len(train), len(validation)) == (54, 6)
    rows = list(train) + list(validation)
    assert stats["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert stats["num_trainable_tokens"] == sum(label != IGNORE_INDEX
                                                for r in rows for label in r["labels"])
    assert stats["trainable_share"] == stats["num_trainable_tokens"] / stats["num_tokens"]
    assert (stats["num_truncated"], stats["num_dropped_no_trainable"]) == (0, 0)
    assert ("tokenize datasets[0]", 30, 30) in calls and ("tokenize datasets[2]", 10, 10) in calls
    samples = json.loads((out / "samples.json").read_text())
    assert [(s["dataset"], s["row"]) for s in samples] == [(0, 0), (1, 0), (2, 0)]
    assert samples[1]["text"] == ("<|im_start|>user\nhi 0<|im_end|>\n<|im_start|>assistant\n"
                                  "«hello 0<|im_end|>»\n")


def test_validation_references(mixed_recipe, tokenizer_dir, tmp_path):
    tokenize_dataset(mixed_recipe(val_set_size=60 - 1), tokenizer_dir, tmp_path / "out")
    references = [None if r is None else json.loads(r)
                  for r in load_tokenized(tmp_path / "out", "validation")["reference"]]
    assert len(references) == 59 and references.count(None) >= 9  # completion rows have none
    alpaca = next(r for r in references if r and isinstance(r["prompt"], str))
    assert alpaca["prompt"].endswith(f"### Instruction:\nsay {alpaca['answer'].split()[1]}\n\n"
                                     f"### Response:\n")
    chat = next(r for r in references if r and isinstance(r["prompt"], list))
    assert chat["prompt"] == [{"role": "user", "content": "hi " + chat["answer"].split()[1]}]


def test_shuffle_is_seeded_and_optional(mixed_recipe, tokenizer, tokenizer_dir, tmp_path):
    def train_ids(name, **keys):
        tokenize_dataset(mixed_recipe(**keys), tokenizer_dir, tmp_path / name)
        return load_tokenized(tmp_path / name, "train")["input_ids"]
    assert train_ids("a", seed=1) == train_ids("b", seed=1) != train_ids("c", seed=2)
    assert train_ids("d", seed=2, dataset_seed=1) == train_ids("a", seed=1)
    in_order = [tokenizer.decode(ids) for ids in train_ids("e", shuffle_merged_datasets=False)]
    assert in_order[0].startswith("<s>Below is an instruction")
    assert in_order[30] == ("<|im_start|>user\nhi 0<|im_end|>\n<|im_start|>assistant\n"
                            "hello 0<|im_end|>\n")
    assert in_order[59] == "<s>the cat sat 9</s>"
    # Without shuffling, the validation rows are the last ones, as in datasets' train_test_split.
    split = train_ids("f", shuffle_merged_datasets=False, val_set_size=10)
    assert [tokenizer.decode(ids) for ids in split] == in_order[:50]


@pytest.mark.parametrize("val_set_size", [60, 75, 2.5])
def test_impossible_validation_split_names_val_set_size(mixed_recipe, tokenizer_dir, tmp_path,
                                                        val_set_size):
    with pytest.raises(ValueError, match="val_set_size"):
        tokenize_dataset(mixed_recipe(val_set_size=val_set_size), tokenizer_dir, tmp_path / "out")


def test_truncation_and_rows_without_trained_tokens(make_recipe, tokenizer, tokenizer_dir,
                                                    tmp_path):
    long_text = " ".join(["the cat sat on the mat"] * 10)
    write_jsonl(tmp_path / "text.jsonl", [{"text": long_text}, {"text": "hi"}])
    long_chat = [{"role": "user", "content": long_text}, {"role": "assistant", "content": "sure"}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": long_chat}, {"messages": CHAT}])
    recipe = make_recipe(sequence_len=32, shuffle_merged_datasets=False,
                         datasets=[{"path": "text.jsonl", "type": "completion"},
                                   {"path": "chat.jsonl", "type": "chat_template"}])
    stats = tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")
    # The long text is cut to 32 tokens; the long chat loses its answer and is dropped.
    assert (stats["num_truncated"], stats["num_dropped_no_trainable"]) == (2, 1)
    train = load_tokenized(tmp_path / "out", "train")
    assert [len(ids) for ids in train["input_ids"]] == [32, 3, len(tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True)["input_ids"])]
    assert train["input_ids"][0] == tokenizer(long_text)["input_ids"][:32]


def test_bad_row_in_a_file_names_file_row_and_field(make_recipe, tokenizer_dir, tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"instruction": "x", "output": "y"},
                                                {"instruction": "z"}])
    recipe = make_recipe(datasets=[{"path": "data/a.jsonl", "type": "alpaca"}])
    with pytest.raises(ValueError, match=r"data/a\.jsonl, row 1 .*field 'output' is missing"):
        tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")


def test_gemma_style_jinja_template_from_the_recipe(make_recipe, tokenizer, tmp_path):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>",
                                                                "<end_of_turn>"]})
    tokenizer.save_pretrained(tmp_path / "gemma_tokenizer")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    template = ("{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] "
                "+ '<end_of_turn>\n' }}{% endfor %}")
    recipe = make_recipe(chat_template="jinja", chat_template_jinja=template,
                         datasets=[{"path": "chat.jsonl", "type": "chat_template"}])
    tokenize_dataset(recipe, tmp_path / "gemma_tokenizer", tmp_path / "out")
    samples = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert samples[0]["text"] == ("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>assistant\n"
                                  "«hello there<end_of_turn>»\n")


def test_tokenization_fingerprint_tracks_what_changes_tokens(mixed_recipe, tmp_path):
    files = {"tokenizer.json": "abc"}
    base = tokenization_fingerprint(mixed_recipe(), files)
    assert tokenization_fingerprint(mixed_recipe(), files) == base
    assert tokenization_fingerprint(mixed_recipe(learning_rate=0.5, output_dir="elsewhere"),
                                    files) == base
    assert tokenization_fingerprint(mixed_recipe(chat_template="chatml"), files) != base
    datasets = [{"path": "data/alpaca.jsonl", "type": "alpaca"},
                {"path": "data/chat.jsonl", "type": "chat_template", "roles_to_train": ["user"]}]
    assert tokenization_fingerprint(mixed_recipe(datasets=datasets), files) != base
    assert tokenization_fingerprint(mixed_recipe(), {"tokenizer.json": "abd"}) != base
    data_file = tmp_path / "data" / "text.jsonl"
    data_file.write_bytes(data_file.read_bytes().replace(b"sat 9", b"sat 8"))
    assert tokenization_fingerprint(mixed_recipe(), files) != base
