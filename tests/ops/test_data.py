"""Raw data: path resolution, formats, folders, URLs, hub commits, shards, fingerprints and the
errors a user can cause."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import pytest

from tunegraph.ops import data
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


def test_hub_ids_are_not_local_and_are_versioned_by_commit(make_recipe, monkeypatch):
    recipe = make_recipe(datasets=[{"path": "tatsu-lab/alpaca", "type": "alpaca"}])
    assert resolve_data_path(recipe, recipe.datasets[0]) is None
    monkeypatch.setattr(data, "hub_commit", lambda cfg: "c" * 40)
    assert data_fingerprint(recipe) == {"datasets": [{
        "hub": "tatsu-lab/alpaca", "revision": None, "commit": "c" * 40, "name": None,
        "split": "train", "data_files": None}]}
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "rows")
    assert load_rows(recipe, recipe.datasets[0]) == "rows"
    assert calls[0][0] == ("tatsu-lab/alpaca",) and calls[0][1]["revision"] == "c" * 40


def test_hub_commit_asks_the_hub_then_its_local_cache(make_recipe, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    recipe = make_recipe(datasets=[{"path": "org/set", "type": "alpaca"},
                                   {"path": "org/set", "type": "alpaca", "revision": "a" * 40},
                                   {"path": "org/set", "type": "alpaca", "revision": "v2"}])
    online, pinned, tagged = recipe.datasets
    asked = []

    class Hub:
        def dataset_info(self, repo_id, revision=None, timeout=None):
            asked.append((repo_id, revision))
            return type("Info", (), {"sha": "b" * 40})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert data.hub_commit(online) == "b" * 40 and data.hub_commit(pinned) == "a" * 40
    assert asked == [("org/set", None)]  # a full commit needs no question

    class Offline:
        def dataset_info(self, *args, **kwargs):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert data.hub_commit(tagged) is None
    refs = tmp_path / "hub" / "datasets--org--set" / "refs"
    refs.mkdir(parents=True)
    (refs / "v2").write_text("d" * 40 + "\n")
    assert data.hub_commit(tagged) == "d" * 40


def test_file_url_loads_and_is_versioned_by_its_bytes(make_recipe, tmp_path):
    path = write_jsonl(tmp_path / "remote" / "a.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "remote" / "b.jsonl", ALPACA_ROWS[:1])
    url = path.as_uri()
    recipe = make_recipe(datasets=[{"path": url, "type": "alpaca"},
                                   {"path": (tmp_path / "remote").as_uri(), "type": "alpaca",
                                    "data_files": "b*.jsonl"}])
    assert [r["output"] for r in load_rows(recipe, recipe.datasets[0])] == ["hi", "four"]
    assert [r["output"] for r in load_rows(recipe, recipe.datasets[1])] == ["hi"]
    before = data_fingerprint(recipe)
    assert before["datasets"][0] == {"url": url, "files": {
        url: "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}}
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert data_fingerprint(recipe) == before
    path.write_bytes(path.read_bytes().replace(b"four", b"fout"))
    after = data_fingerprint(recipe)
    assert after["datasets"][0] != before["datasets"][0]
    assert after["datasets"][1] == before["datasets"][1]


def test_store_checksums_stand_for_the_bytes(monkeypatch):
    import fsspec

    class Store:
        def info(self, path):
            return {"name": path, "size": 3, "ETag": '"abc"'}

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url: (Store(), url[5:]))
    assert data.url_checksum("s3://bucket/x.jsonl") == 'ETag:"abc"'


def test_url_errors_name_the_dataset(make_recipe, tmp_path):
    recipe = make_recipe(datasets=[{"path": (tmp_path / "none.jsonl").as_uri(), "type": "alpaca"},
                                   {"path": "nosuchprotocol://bucket/x.jsonl", "type": "alpaca"}])
    with pytest.raises(ValueError, match=r"datasets\[0\] \(file://.*\): no file or folder"):
        load_rows(recipe, recipe.datasets[0])
    with pytest.raises(ValueError, match=r"datasets\[1\] .*: cannot open the URL"):
        load_rows(recipe, recipe.datasets[1])


def test_shards_keep_axolotls_shard_and_say_which_rows(make_recipe, tmp_path):
    rows = [{"text": f"row {i}"} for i in range(20)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    kept = []
    for index in range(3):
        recipe = make_recipe(seed=5, datasets=[{"path": "t.jsonl", "type": "completion",
                                                "shards": 3, "shards_idx": index}])
        shard, numbers = data.load_numbered_rows(recipe, recipe.datasets[0])
        # Axolotl: dataset.shuffle(seed=seed).shard(num_shards=shards, index=shards_idx)
        expected = datasets.Dataset.from_list(rows).shuffle(seed=5).shard(3, index)
        assert shard["text"] == expected["text"] == [f"row {n}" for n in numbers]
        kept += numbers
    assert sorted(kept) == list(range(20))
    recipe = make_recipe(datasets=[{"path": "t.jsonl", "type": "completion"}])
    whole, numbers = data.load_numbered_rows(recipe, recipe.datasets[0])
    assert numbers is None and len(whole) == 20


def test_locate_row_names_the_file_of_a_folder_row(make_recipe, tmp_path):
    write_jsonl(tmp_path / "f" / "a.jsonl", ALPACA_ROWS)
    write_jsonl(tmp_path / "f" / "b.jsonl", ALPACA_ROWS)
    recipe = make_recipe(datasets=[{"path": "f", "type": "alpaca"}])
    name, row = data.locate_row(recipe, recipe.datasets[0], 3)
    assert (Path(name).name, row) == ("b.jsonl", 1)


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
