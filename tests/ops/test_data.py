"""Raw data: path resolution, formats, folders, fingerprints and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tunegraph.ops.data import data_fingerprint, iter_texts, load_rows, resolve_data_path

ALPACA_ROWS = [{"instruction": "say hi", "input": "", "output": "hi"},
               {"instruction": "add", "input": "2 and 2", "output": "four"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_relative_path_prefers_recipe_folder_then_working_directory(make_recipe, tmp_path,
                                                                    monkeypatch):
    workdir = tmp_path / "work"
    write_jsonl(workdir / "data" / "a.jsonl", ALPACA_ROWS[:1])
    monkeypatch.chdir(workdir)
    recipe = make_recipe(datasets=[{"path": "data/a.jsonl", "type": "alpaca"}])
    assert resolve_data_path(recipe, recipe.datasets[0]) == (workdir / "data" / "a.jsonl").resolve()
    write_jsonl(tmp_path / "data" / "a.jsonl", ALPACA_ROWS)  # beside the recipe file: wins
    beside_recipe = (tmp_path / "data" / "a.jsonl").resolve()
    assert resolve_data_path(recipe, recipe.datasets[0]) == beside_recipe
    assert len(load_rows(recipe, recipe.datasets[0])) == 2


def test_hub_ids_are_not_local(make_recipe):
    recipe = make_recipe(datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}])
    assert resolve_data_path(recipe, recipe.datasets[0]) is None
    assert data_fingerprint(recipe) == {"datasets": [{
        "hub": "tatsu-lab/alpaca", "revision": None, "name": None, "split": "train",
        "data_files": None}]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".arrow"])
def test_formats_by_suffix(make_recipe, tmp_path, suffix):
    table = datasets.Dataset.from_list(ALPACA_ROWS)
    path = tmp_path / f"rows{suffix}"
    if suffix in (".jsonl", ".json"):
        table.to_json(str(path))
    elif suffix == ".csv":
        table.to_csv(str(path), index=False)
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(tmp_path / "saved"))
        next((tmp_path / "saved").glob("*.arrow")).rename(path)
    recipe = make_recipe(datasets=[{"path": path.name, "type": "alpaca"}])
    rows = load_rows(recipe, recipe.datasets[0], cache_dir=tmp_path / "cache")
    assert [r["output"] for r in rows] == ["hi", "four"]


def test_text_files_and_ds_type(make_recipe, tmp_path):
    (tmp_path / "corpus.txt").write_text("the cat sat\nthe dog sat\n")
    (tmp_path / "corpus.data").write_text('{"text": "hello"}\n')
    recipe = make_recipe(datasets=[{"path": "corpus.txt", "type": "completion"},
                                   {"path": "corpus.data", "type": "completion",
                                    "ds_type": "json"}])
    assert list(iter_texts(recipe)) == ["the cat sat", "the dog sat", "hello"]


def test_folder_loads_its_data_files_and_honours_data_files(make_recipe, tmp_path):
    write_jsonl(tmp_path / "chats" / "part-0.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "chats" / "part-1.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "chats" / ".hidden" / "x.jsonl", [{"text": "never"}])
    (tmp_path / "chats" / "README.md").write_text("not data")
    recipe = make_recipe(datasets=[{"path": "chats", "type": "completion"},
                                   {"path": "chats", "type": "completion",
                                    "data_files": ["part-1.jsonl"]}])
    assert sorted(r["text"] for r in load_rows(recipe, recipe.datasets[0])) == ["one", "two"]
    assert [r["text"] for r in load_rows(recipe, recipe.datasets[1])] == ["two"]
    fingerprint = data_fingerprint(recipe)["datasets"]
    assert sorted(fingerprint[0]["files"]) == ["part-0.jsonl", "part-1.jsonl"]
    assert list(fingerprint[1]["files"]) == ["part-1.jsonl"]


def test_fingerprint_follows_file_bytes(make_recipe, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    recipe = make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    before = data_fingerprint(recipe)
    path.write_text(path.read_text().replace("four", "fout"))
    assert data_fingerprint(recipe) != before


@pytest.mark.parametrize("entry, message", [
    ({"path": "./missing.jsonl"}, "datasets[1] (./missing.jsonl): file or folder not found"),
    ({"path": "rows.xml"}, "datasets[1] (rows.xml): cannot tell the format of 'rows.xml'"),
    ({"path": "a.jsonl", "split": "test"}, "datasets[1] (a.jsonl): split 'test'"),
    ({"path": "broken.jsonl"}, "datasets[1] (broken.jsonl): could not read as json"),
    ({"path": "a.jsonl", "data_files": "x.jsonl"}, "data_files needs path to be a folder"),
])
def test_user_errors_name_dataset_and_path(make_recipe, tmp_path, entry, message):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    (tmp_path / "rows.xml").write_text("<rows/>")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x",\n')
    recipe = make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca"},
                                   {"type": "alpaca", **entry}])
    with pytest.raises(ValueError) as error:
        load_rows(recipe, recipe.datasets[1])
    assert message in str(error.value)


def test_iter_texts_reads_every_type(make_recipe, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    write_jsonl(tmp_path / "t.jsonl", [{"body": "the end"}])
    recipe = make_recipe(datasets=[{"path": "a.jsonl", "type": "alpaca"},
                                   {"path": "c.jsonl", "type": "chat_template"},
                                   {"path": "t.jsonl", "type": "completion", "field": "body"}])
    texts = list(iter_texts(recipe))
    # Alpaca rows come with their prompt template, so the tokenizer learns its fixed words.
    assert texts[0].startswith("Below is an instruction") and texts[0].endswith("say hi\n\n### Response:\nhi")
    assert "### Input:\n2 and 2" in texts[1] and texts[1].endswith("four")
    assert texts[2:] == ["hi", "yo", "the end"]
