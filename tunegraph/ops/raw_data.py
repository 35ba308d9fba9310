"""Raw data versions: what the `<recipe>/raw_data` source asset reports to Dagster.

    version, datasets = raw_data_version(recipe)     # one string; one DatasetVersion per dataset

Where DVC tracks a dataset (a `.dvc` file written by `dvc add`, or an output of a `dvc.yaml` stage),
its version is DVC's own hash, read through DVC's API: the md5 that the `.dvc` file or `dvc.lock`
holds (`.dir` suffix for a folder). So `dvc pull` of another version, or `dvc add` of an edit,
changes it, and DVC's state database spares re-hashing unchanged files. A DVC-tracked file edited
but not `dvc add`-ed reports the md5 of what is on disk (what tokenization reads), marked
"modified". Data DVC does not track is versioned by the sha256 of the files read, as in the
tokenized dataset's key; a hub dataset by its id, configuration, split and revision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegraph.config import DatasetConfig, Recipe
from tunegraph.ops.data import dataset_label, local_files, resolve_data_path
from tunegraph.ops.hashing import hash_file, hash_json, short

DVC_DIR = ".dvc"


@dataclass(frozen=True)
class DatasetVersion:
    """One dataset's version and where it comes from (`tracked_by`: "dvc", "files" or "hub")."""

    label: str
    version: str
    tracked_by: str
    details: dict[str, Any] = field(default_factory=dict)


def raw_data_version(recipe: Recipe) -> tuple[str, list[DatasetVersion]]:
    """The recipe's raw-data version: its one dataset's version, or a hash of all of them."""
    versions = [dataset_version(recipe, dataset_cfg) for dataset_cfg in recipe.datasets]
    if len(versions) == 1:
        return versions[0].version, versions
    return short(hash_json([v.version for v in versions])), versions


def dataset_version(recipe: Recipe, dataset_cfg: DatasetConfig) -> DatasetVersion:
    label = dataset_label(recipe, dataset_cfg)
    path = resolve_data_path(recipe, dataset_cfg)
    if path is None:
        coordinates = {"hub": dataset_cfg.path, "name": dataset_cfg.name,
                       "split": dataset_cfg.split, "data_files": dataset_cfg.data_files,
                       "revision": getattr(dataset_cfg, "revision", None)}
        return DatasetVersion(label, short(hash_json(coordinates)), "hub", coordinates)
    details: dict[str, Any] = {}
    if (repo_root := dvc_repo_root(path)) is not None:
        try:
            found = dvc_version(repo_root, path, label)
        except ImportError:
            found, details = None, {"dvc": f"{repo_root} is a DVC repository, but dvc is not "
                                           f"installed (pip install 'tunegraph[dvc]'): files hashed"}
        if found is not None:
            return found
    _, files = local_files(recipe, dataset_cfg)  # raises, naming the dataset, if missing
    base = path if path.is_dir() else path.parent
    hashes = {str(f.relative_to(base)): hash_file(f) for f in files}
    return DatasetVersion(label, short(hash_json(hashes)), "files", {**details, "sha256": hashes})


def dvc_repo_root(path: Path) -> Path | None:
    """The nearest folder at or above `path` that holds a `.dvc` folder (a DVC repository)."""
    for folder in [path, *path.parents]:
        if (folder / DVC_DIR).is_dir():
            return folder
    return None


def dvc_version(repo_root: Path, path: Path, label: str) -> DatasetVersion | None:
    """DVC's hash of the output that is or contains `path`; None if DVC does not track it."""
    from dvc.exceptions import DvcException, OutputNotFoundError
    from dvc.repo import Repo

    try:
        with Repo(str(repo_root)) as repo:
            try:
                (out, *_) = repo.find_outs_by_path(str(path), strict=False)
            except OutputNotFoundError:
                return None
            committed = out.hash_info.value if out.hash_info else None
            workspace = out.get_hash().value if out.exists else None
            tracked_in = str(Path(out.stage.path).relative_to(repo_root))
            out_path = str(Path(out.fs_path).relative_to(repo_root))
    except DvcException as exc:
        raise ValueError(f"{label}: DVC could not read {repo_root}: {exc}") from exc
    if workspace is None and committed is None:
        return None
    if workspace is None:
        status = "not in the workspace (run `dvc pull`)"
    elif committed is None:
        status = "not committed (run `dvc repro` or `dvc commit`)"
    elif workspace != committed:
        status = f"modified since {tracked_in} was written (run `dvc add` or `dvc commit`)"
    else:
        status = "in sync"
    version = workspace or committed
    assert version is not None
    return DatasetVersion(label, version, "dvc", {"dvc_file": tracked_in, "dvc_path": out_path,
                                                 "dvc_md5": committed, "workspace_md5": workspace,
                                                 "status": status})
