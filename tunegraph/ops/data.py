"""Raw rows: find a dataset (local file, local folder or hub id), hash it, load it, list its text.

    rows = load_rows(recipe, recipe.datasets[0])      # a datasets.Dataset
    data_fingerprint(recipe)                           # content hashes for the data version

Local data is identified by the sha256 of every file that is read, so editing one byte of a data
file changes the tokenized dataset's version (Axolotl's cache key only sees the path). A hub
dataset is identified by its id, configuration, split and revision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from tunegraph.config import DatasetConfig, Recipe
from tunegraph.ops.hashing import hash_file

# File suffix -> the `datasets` packaged builder that reads it.
SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                   ".arrow": "arrow", ".txt": "text"}


def dataset_label(recipe: Recipe, dataset_cfg: DatasetConfig) -> str:
    """`datasets[1] (data/chat.jsonl)`: how error messages name a dataset."""
    index = next((i for i, d in enumerate(recipe.datasets) if d is dataset_cfg), None)
    where = f"datasets[{index}]" if index is not None else "dataset"
    return f"{where} ({dataset_cfg.path})"


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; these shapes can only be meant as local paths, so a
    # missing one is a "file not found" rather than a confusing hub lookup.
    return (Path(path).is_absolute() or path.startswith(("./", "../", "~"))
            or Path(path).suffix.lower() in SUFFIX_BUILDERS)


def resolve_data_path(recipe: Recipe, dataset_cfg: DatasetConfig) -> Path | None:
    """The local file or folder of a dataset, or None for a hub dataset id.

    A relative path is looked up relative to the recipe file's folder, then the working directory.
    A path that exists nowhere but can only be local (absolute, ./ or ../, or a data suffix) is
    returned as the recipe-relative candidate, so that loading it reports the missing file."""
    raw = Path(dataset_cfg.path).expanduser()
    candidates = [raw] if raw.is_absolute() else [recipe.base_dir / raw, Path.cwd() / raw]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0] if _looks_local(dataset_cfg.path) else None


def _builder_for(files: list[Path], dataset_cfg: DatasetConfig, label: str) -> str:
    if dataset_cfg.ds_type:
        return dataset_cfg.ds_type
    builders = {SUFFIX_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders:
        odd = next(f for f in files if f.suffix.lower() not in SUFFIX_BUILDERS)
        raise ValueError(f"{label}: cannot tell the format of '{odd.name}' from its suffix "
                         f"(known: {', '.join(SUFFIX_BUILDERS)}); set ds_type")
    if len(builders) > 1:
        raise ValueError(f"{label}: the files mix formats ({', '.join(sorted(builders))}); "
                         f"set data_files or ds_type")
    return builders.pop()


def local_files(recipe: Recipe, dataset_cfg: DatasetConfig) -> tuple[Path, list[Path]]:
    """(root, files) of a local dataset: the file itself, the `data_files` (names or globs inside
    the folder), or every data file in the folder (hidden files skipped)."""
    label = dataset_label(recipe, dataset_cfg)
    root = resolve_data_path(recipe, dataset_cfg)
    assert root is not None, "local_files is for local datasets"
    if not root.exists():
        raise ValueError(f"{label}: file or folder not found (looked in {recipe.base_dir} and "
                         f"{Path.cwd()})")
    patterns = dataset_cfg.data_files
    if root.is_file():
        if patterns:
            raise ValueError(f"{label}: data_files needs path to be a folder, but it is a file")
        return root, [root]
    if patterns:
        files: list[Path] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matched = sorted(p for p in root.glob(pattern) if p.is_file())
            if not matched:
                raise ValueError(f"{label}: data_files '{pattern}' matches no file in {root}")
            files += [p for p in matched if p not in files]
    else:
        wanted = {s for s, b in SUFFIX_BUILDERS.items() if b == dataset_cfg.ds_type}
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(root).parts)
                       and p.suffix.lower() in (wanted or SUFFIX_BUILDERS))
        if not files:
            raise ValueError(f"{label}: the folder {root} holds no data file "
                             f"({', '.join(sorted(wanted or SUFFIX_BUILDERS))})")
    return root, files


def data_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Per dataset, content hashes of the local files read, or the hub coordinates."""
    entries = []
    for dataset_cfg in recipe.datasets:
        if resolve_data_path(recipe, dataset_cfg) is None:
            # DatasetConfig has no `revision` key yet; getattr keeps this right once it does.
            entries.append({"hub": dataset_cfg.path,
                            "revision": getattr(dataset_cfg, "revision", None),
                            "name": dataset_cfg.name, "split": dataset_cfg.split,
                            "data_files": dataset_cfg.data_files})
            continue
        root, files = local_files(recipe, dataset_cfg)
        base = root if root.is_dir() else root.parent
        entries.append({"path": dataset_cfg.path,
                        "files": {str(f.relative_to(base)): hash_file(f) for f in files}})
    return {"datasets": entries}


def load_rows(recipe: Recipe, dataset_cfg: DatasetConfig,
              cache_dir: Path | None = None) -> datasets.Dataset:
    """The dataset's rows as a `datasets.Dataset`.

    Local data is read by the packaged builder for its format. Without `cache_dir`, the Arrow
    files `datasets` writes go to a temporary folder and the rows are kept in memory, so loading
    local data never fills the user's home cache (tunegraph caches the *tokenized* data itself,
    keyed by content). Hub datasets use `cache_dir` or the usual HF cache."""
    label = dataset_label(recipe, dataset_cfg)
    root = resolve_data_path(recipe, dataset_cfg)
    if root is None:
        return _load_hub(dataset_cfg, label, cache_dir)
    _, files = local_files(recipe, dataset_cfg)
    builder = _builder_for(files, dataset_cfg, label)
    with tempfile.TemporaryDirectory(prefix="tunegraph-datasets-") as scratch:
        try:
            rows = datasets.load_dataset(builder, data_files=[str(f) for f in files],
                                         split=dataset_cfg.split,
                                         cache_dir=str(cache_dir or scratch),
                                         keep_in_memory=cache_dir is None)
        except ValueError as exc:  # unknown split, bad slice
            raise ValueError(f"{label}: split '{dataset_cfg.split}': {exc}") from exc
        except (datasets.exceptions.DatasetGenerationError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise ValueError(f"{label}: could not read as {builder}: "
                             f"{type(cause).__name__}: {cause}") from exc
    return rows


def _load_hub(dataset_cfg: DatasetConfig, label: str, cache_dir: Path | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(dataset_cfg.path, name=dataset_cfg.name,
                                     data_files=dataset_cfg.data_files, split=dataset_cfg.split,
                                     revision=getattr(dataset_cfg, "revision", None),
                                     cache_dir=str(cache_dir) if cache_dir else None)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise ValueError(f"{label}: not a local file or folder, and not found on the hub "
                         f"({exc})") from exc
    except ValueError as exc:  # unknown split or configuration name
        raise ValueError(f"{label}: {exc}") from exc


def row_texts(dataset_cfg: DatasetConfig, row: dict[str, Any]) -> Iterator[str]:
    """The text of one row as the model will read it, for training a tokenizer: Alpaca rows with
    their prompt template (so its fixed words become few tokens), message and text contents."""
    from tunegraph.ops.prompts import alpaca_prompt

    if dataset_cfg.type == "alpaca":
        try:
            prompt, output = alpaca_prompt(dataset_cfg, row)
        except ValueError:  # a malformed row: tokenization reports it with its row number
            return
        keys: list[Any] = [prompt + output]
    elif dataset_cfg.type == "completion":
        keys = [row.get(dataset_cfg.field or "text")]
    else:
        messages = row.get(dataset_cfg.field_messages) or []
        keys = [m.get(dataset_cfg.message_field_content) for m in messages if isinstance(m, dict)]
    yield from (text for text in keys if isinstance(text, str) and text)


def iter_texts(recipe: Recipe, cache_dir: Path | None = None) -> Iterator[str]:
    """The raw text of every row of every dataset, in order: what the tiny tokenizer learns from.
    Malformed rows are skipped here; tokenization reports them with their row number."""
    for dataset_cfg in recipe.datasets:
        for row in load_rows(recipe, dataset_cfg, cache_dir):
            yield from row_texts(dataset_cfg, row)
