"""Raw data versions: DVC's hash where DVC tracks the data (real git + dvc repositories), the
files' sha256 elsewhere, a hub dataset's coordinates."""

from pathlib import Path

import pytest
from dvc_support import dvc, dvc_file_md5, init_repo

from tunegraph.config import load_recipe
from tunegraph.ops.hashing import hash_file, hash_json, short
from tunegraph.ops.raw_data import raw_data_version

ROWS = '{"instruction": "say hi", "output": "hi"}\n{"instruction": "say yo", "output": "yo"}\n'


def _recipe(folder: Path, datasets: str = "  - path: data/rows.jsonl\n    type: alpaca\n"):
    (folder / "r.yaml").write_text(f"base_model: tunegraph:tiny-llama\nlearning_rate: 0.001\n"
                                 f"datasets:\n{datasets}")
    return load_recipe(folder / "r.yaml")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "rows.jsonl"
    path.write_text(ROWS)
    return path


def test_untracked_data_is_versioned_by_its_bytes(tmp_path: Path, data_file: Path):
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert dataset.tracked_by == "files"
    assert version == dataset.version == short(hash_json({"rows.jsonl": hash_file(data_file)}))
    data_file.write_text(ROWS.replace("hi", "ho"))
    assert raw_data_version(_recipe(tmp_path))[0] != version


def test_a_dvc_tracked_file_reports_the_md5_of_its_dvc_file(tmp_path: Path, data_file: Path):
    init_repo(tmp_path)
    dvc(tmp_path, "add", "-q", "data/rows.jsonl")
    recorded = dvc_file_md5(tmp_path / "data" / "rows.jsonl.dvc")
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert (version, dataset.tracked_by) == (recorded, "dvc")
    assert dataset.details["dvc_file"] == "data/rows.jsonl.dvc"
    assert dataset.details["status"] == "in sync"

    # Edited without `dvc add`: what is on disk (what tokenization reads), flagged.
    data_file.write_text(ROWS + ROWS)
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert version != recorded and dataset.details["dvc_md5"] == recorded
    assert "modified" in dataset.details["status"]
    dvc(tmp_path, "add", "-q", "data/rows.jsonl")
    assert version == dvc_file_md5(tmp_path / "data" / "rows.jsonl.dvc")
    assert raw_data_version(_recipe(tmp_path))[1][0].details["status"] == "in sync"

    # Not pulled yet: the version DVC would bring, and the command that brings it.
    data_file.unlink()
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert version == dvc_file_md5(tmp_path / "data" / "rows.jsonl.dvc")
    assert "dvc pull" in dataset.details["status"]


def test_a_file_inside_a_dvc_tracked_folder_reports_the_folder_md5(tmp_path: Path,
                                                                     data_file: Path):
    init_repo(tmp_path)
    dvc(tmp_path, "add", "-q", "data")
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert version == dvc_file_md5(tmp_path / "data.dvc") and version.endswith(".dir")
    assert dataset.details["dvc_path"] == "data"


def test_untracked_data_in_a_dvc_repository_is_hashed(tmp_path: Path, data_file: Path):
    init_repo(tmp_path)
    version, (dataset,) = raw_data_version(_recipe(tmp_path))
    assert dataset.tracked_by == "files"
    assert version == short(hash_json({"rows.jsonl": hash_file(data_file)}))


def test_several_datasets_combine_and_hub_ids_are_coordinates(tmp_path: Path, data_file: Path):
    recipe = _recipe(tmp_path, "  - path: data/rows.jsonl\n    type: alpaca\n"
                               "  - path: org/some-dataset\n    type: alpaca\n    split: train\n")
    version, (local, hub) = raw_data_version(recipe)
    assert (local.tracked_by, hub.tracked_by) == ("files", "hub")
    assert hub.details["hub"] == "org/some-dataset"
    assert version == short(hash_json([local.version, hub.version]))


def test_a_missing_local_file_is_an_error_naming_the_dataset(tmp_path: Path):
    with pytest.raises(ValueError, match=r"datasets\[0\] \(data/rows.jsonl\): file or folder "
                                         r"not found"):
        raw_data_version(_recipe(tmp_path))
