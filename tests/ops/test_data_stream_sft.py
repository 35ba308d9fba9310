"""streaming: true for `datasets:`: rows read as a stream, encoded by the prompt strategies,
truncated and (with sample_packing) packed while training reads them; training runs max_steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_support import make, prepare_training, quickstart_like_rows

from tests_support import REPO
from tunegraph.config import load_recipe
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.base_model import load_tokenizer
from tunegraph.ops.packed_attention import PackedCollator, position_ids_for
from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.stages import base_model_stage, tokenized_stage
from tunegraph.ops.stream import STREAM_FILE, PretrainingStream
from tunegraph.ops.tokenize import load_tokenized, tokenize_dataset
from tunegraph.ops.train import train

SEQUENCE_LEN = 256
AXOLOTL_SFT = REPO.parent / "shared" / "axolotl-configs" / "streaming__sft.yaml"


@pytest.fixture
def alpaca(tmp_path) -> Path:
    rows = quickstart_like_rows(30, seed=1)
    rows[3]["output"] = " ".join(["paris is the capital of france"] * 40)  # truncated
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_recipe(make_recipe, **keys):
    keys.setdefault("sequence_len", SEQUENCE_LEN)
    return make_recipe(datasets=[{"path": "data.jsonl", "type": "alpaca"}], **keys)


def streamed(recipe, tokenizer_dir, out):
    tokenize_dataset(recipe, tokenizer_dir, out)
    return list(PretrainingStream(recipe, load_tokenizer(recipe, tokenizer_dir), out))


def test_streamed_rows_are_the_tokenized_rows(make_recipe, tokenizer_dir, alpaca, tmp_path):
    plain = sft_recipe(make_recipe, shuffle_merged_datasets=False)
    stats = tokenize_dataset(plain, tokenizer_dir, tmp_path / "plain")
    assert stats["num_truncated"] == 1
    expected = load_tokenized(tmp_path / "plain", "train")
    recipe = sft_recipe(make_recipe, shuffle_merged_datasets=False, streaming=True, max_steps=2)
    rows = streamed(recipe, tokenizer_dir, tmp_path / "stream")
    assert [r["input_ids"] for r in rows] == expected["input_ids"]
    assert [r["labels"] for r in rows] == expected["labels"]
    assert any(label == IGNORE_INDEX for label in rows[0]["labels"])  # prompt masked
    spec = json.loads((tmp_path / "stream" / STREAM_FILE).read_text())
    assert spec["key"] == "datasets" and list(spec["sources"][0]["files"]) == ["data.jsonl"]
    preview = load_tokenized(tmp_path / "stream", "train")
    assert preview["labels"] == [r["labels"] for r in rows[:len(preview)]]
    # Shuffled (the default): the same rows in another, seeded order.
    shuffled = streamed(sft_recipe(make_recipe, streaming=True, max_steps=2, seed=5),
                        tokenizer_dir, tmp_path / "shuffled")
    key = lambda r: (r["input_ids"], r["labels"])  # noqa: E731
    assert sorted(map(key, shuffled)) == sorted(map(key, rows)) and shuffled != rows


def test_packed_rows_keep_each_documents_labels_and_positions(make_recipe, tokenizer_dir, alpaca,
                                                              tmp_path):
    keys = {"streaming": True, "max_steps": 2, "sequence_len": 512,
            "shuffle_merged_datasets": False}
    unpacked = streamed(sft_recipe(make_recipe, **keys), tokenizer_dir, tmp_path / "u")
    recipe = sft_recipe(make_recipe, sample_packing=True, streaming_multipack_buffer_size=7,
                        **keys)
    rows = streamed(recipe, tokenizer_dir, tmp_path / "p")
    assert len(rows) < len(unpacked)
    docs = []
    for row in rows:
        assert sum(row["document_lengths"]) == len(row["input_ids"]) == len(row["labels"])
        assert len(row["input_ids"]) <= 512
        start = 0
        for n in row["document_lengths"]:
            docs.append((row["input_ids"][start:start + n], row["labels"][start:start + n]))
            start += n
    assert sorted(docs) == sorted((r["input_ids"], r["labels"]) for r in unpacked)
    row = next(r for r in rows if len(r["document_lengths"]) > 1)
    batch = PackedCollator(0)([row])
    lengths = row["document_lengths"]
    assert batch["position_ids"][0].tolist() == position_ids_for(lengths)
    starts = {sum(lengths[:i]) for i in range(len(lengths))}
    assert batch["labels"][0].tolist() == [IGNORE_INDEX if i in starts else label
                                           for i, label in enumerate(row["labels"])]


def test_schema_rules(make_recipe):
    with pytest.raises(ValueError, match="streaming: true .* needs max_steps: set max_steps"):
        sft_recipe(make_recipe, streaming=True)
    with pytest.raises(ValueError, match="val_set_size is 0.1 but streaming is true"):
        sft_recipe(make_recipe, streaming=True, max_steps=2, val_set_size=0.1)
    with pytest.raises(ValueError, match="dataset_exact_deduplication needs every row at once"):
        sft_recipe(make_recipe, streaming=True, max_steps=2, dataset_exact_deduplication=True)
    with pytest.raises(ValueError, match=r"datasets\[0\]\.shards .* streaming is true"):
        make_recipe(datasets=[{"path": "d.jsonl", "type": "alpaca", "shards": 2}],
                    streaming=True, max_steps=2)
    assert sft_recipe(make_recipe, val_set_size=0.1).streaming is False


@pytest.mark.skipif(not AXOLOTL_SFT.is_file(), reason="no ../shared/axolotl-configs here")
def test_axolotl_streaming_sft_example_validates():
    from tunegraph.cli import plan_of

    recipe = load_recipe(AXOLOTL_SFT)
    assert recipe.streaming and recipe.sample_packing and recipe.max_steps == 1000
    assert plan_of(recipe)["assets"]


def test_streamed_sft_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = make(tmp_path, streaming=True, val_set_size=0, max_steps=10, sample_packing=True,
                  streaming_multipack_buffer_size=16, micro_batch_size=2)
    prepared = prepare_training(tmp_path, recipe)
    assert prepared["stats"]["streaming"] is True
    assert (prepared["tokenized_dir"] / STREAM_FILE).is_file()
    metrics = train(recipe, prepared["base_dir"], prepared["tokenized_dir"], tmp_path / "out")
    assert [step for step, _ in metrics["losses"]] == list(range(1, 11))
    assert all(loss == loss and loss > 0 for _, loss in metrics["losses"])
    # The data file's content is in the tokenized key: an edit is a new tokenized dataset.
    store = ArtifactStore(tmp_path / "store")
    base = base_model_stage(recipe, store, "tiny")
    before = tokenized_stage(recipe, store, base.artifact).artifact.key
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace("white", "WHITE", 1))
    assert tokenized_stage(recipe, store, base.artifact).artifact.key != before
    with pytest.raises(ValueError, match=r"datasets\[0\] \(data\.jsonl\): the files changed"):
        PretrainingStream(recipe, None, prepared["tokenized_dir"])
