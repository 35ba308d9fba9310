"""pretraining_dataset: a pinned stream, tokenized on the fly, cut or packed into rows; training
reads it for max_steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.data import iter_texts
from tunegraph.ops.stages import base_model_stage, tokenized_stage, train_stage
from tunegraph.ops.stream import STREAM_FILE, PretrainingStream
from tunegraph.ops.tokenize import load_tokenized, tokenize_dataset

TEXTS = [f"the cat sat on mat number {i} " * (1 + i % 5) for i in range(40)]
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    return path


def stream_recipe(make_recipe, **keys):
    keys.setdefault("pretraining_dataset", [{"path": "corpus.jsonl", "text_column": "body"}])
    return make_recipe(max_steps=2, sequence_len=32, **keys)


def test_stream_rows_are_the_token_stream_cut_at_sequence_len(make_recipe, tokenizer,
                                                              tokenizer_dir, corpus, tmp_path):
    recipe = stream_recipe(make_recipe, shuffle_merged_datasets=False)
    stats = tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")
    rows = list(PretrainingStream(recipe, tokenizer, tmp_path / "out"))
    expected = [t for text in TEXTS for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert [t for r in rows for t in r["input_ids"]] == expected
    assert {len(r["input_ids"]) for r in rows[:-1]} == {32} and len(rows[-1]["input_ids"]) <= 32
    assert all(r["labels"] == r["input_ids"] for r in rows)
    spec = json.loads((tmp_path / "out" / STREAM_FILE).read_text())
    assert list(spec["sources"][0]["files"]) == ["corpus.jsonl"]
    preview = load_tokenized(tmp_path / "out", "train")
    assert preview["input_ids"] == [r["input_ids"] for r in rows[:len(preview)]]
    assert stats["streaming"] is True and stats["num_preview_rows"] == len(preview)
    # Full rows, documents running into each other; only the stream's last row is short.
    assert stats["packing_efficiency"] == sum(map(len, preview["input_ids"])) / (32 * len(preview))
    assert stats["num_packed_rows"] == len(preview) == len(rows)  # all 40 texts fit the preview


@pytest.mark.parametrize("buffer", [7, 10_000])
def test_packed_stream_keeps_documents_whole(make_recipe, tokenizer, tokenizer_dir, corpus,
                                             tmp_path, buffer):
    recipe = stream_recipe(make_recipe, sample_packing=True, seed=3,
                           streaming_multipack_buffer_size=buffer)
    stats = tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")
    rows = list(PretrainingStream(recipe, tokenizer, tmp_path / "out"))
    docs = []
    for row in rows:
        assert sum(row["document_lengths"]) == len(row["input_ids"]) <= 32
        start = 0
        for n in row["document_lengths"]:
            docs.append(tuple(row["input_ids"][start:start + n]))
            start += n
    expected = [tuple((tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[:32]) for t in TEXTS]
    assert sorted(docs) == sorted(expected)
    if buffer == 7:  # each buffer of 7 documents is packed on its own: no row mixes two buffers
        firsts = {0}
        for row in rows:
            firsts.add(max(firsts) + len(row["document_lengths"]))
        assert set(range(0, len(TEXTS), 7)) <= firsts
    assert rows == list(PretrainingStream(recipe, tokenizer, tmp_path / "out"))  # seeded
    assert sum(int(k) * v for k, v in stats["documents_per_row"].items()) == len(TEXTS)


def test_edited_source_after_preprocessing_is_refused(make_recipe, tokenizer, tokenizer_dir,
                                                      corpus, tmp_path):
    recipe = stream_recipe(make_recipe)
    tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")
    corpus.write_text(corpus.read_text().replace("mat", "hat", 1))
    with pytest.raises(ValueError, match=r"pretraining_dataset\[0\] \(corpus\.jsonl\): the files "
                                         r"changed since the tokenized dataset was made"):
        PretrainingStream(recipe, tokenizer, tmp_path / "out")


def test_a_row_without_text_is_named(make_recipe, tokenizer_dir, tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"body": "fine"}\n{"other": "x"}\n')
    recipe = stream_recipe(make_recipe, shuffle_merged_datasets=False)
    with pytest.raises(ValueError, match=r"pretraining_dataset\[0\] \(corpus\.jsonl\), row 1 "
                                         r"\(counting from 0\): field 'body' is missing"):
        tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")


def test_schema_rules(make_recipe):
    with pytest.raises(ValueError, match="needs max_steps"):
        make_recipe(pretraining_dataset=[{"path": "c.jsonl"}])
    with pytest.raises(ValueError, match="datasets and pretraining_dataset are both set"):
        make_recipe(max_steps=2, pretraining_dataset=[{"path": "c.jsonl"}],
                    datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    with pytest.raises(ValueError, match="a pretraining_dataset stream cannot be split"):
        make_recipe(max_steps=2, val_set_size=0.1, pretraining_dataset=[{"path": "c.jsonl"}])


def test_continued_pretraining_end_to_end(make_recipe, corpus, tmp_path, monkeypatch):
    """The tiny base model learns its tokenizer from the stream; training streams max_steps."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "held_out.jsonl").write_text('{"text": "the cat sat"}\n' * 4)
    recipe = stream_recipe(make_recipe, tiny_model=TINY, sample_packing=True,
                           micro_batch_size=2, learning_rate=1e-2, eval_steps=1,
                           test_datasets=[{"path": "held_out.jsonl", "type": "completion"}])
    assert next(iter_texts(recipe)) == TEXTS[0]
    store = ArtifactStore(tmp_path / "store")
    base = base_model_stage(recipe, store, "tiny")
    tokenized = tokenized_stage(recipe, store, base.artifact)
    trained = train_stage(recipe, store, base.artifact, tokenized.artifact)
    assert trained.metadata["num_steps"] == 2
    # Evaluated during training on the packed held-out rows (eval_sample_packing follows packing).
    assert [step for step, _ in trained.metadata["eval_losses"]] == [1, 2]
    assert tokenized.metadata["num_validation_rows"] == 4
    assert (tokenized.artifact.path / "validation_packed.parquet").is_file()
    corpus.write_text(corpus.read_text() + json.dumps({"body": "one more"}) + "\n")
    assert tokenized_stage(recipe, store, base.artifact).artifact.key != tokenized.artifact.key
