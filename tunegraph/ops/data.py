"""Raw rows: find a dataset (local file or folder, fsspec URL, hub id), version it, load it.

    rows = load_rows(recipe, recipe.datasets[0])       # a datasets.Dataset (shards applied)
    stream = stream_rows(recipe, recipe.pretraining_dataset[0])   # a datasets.IterableDataset
    data_fingerprint(recipe)                            # content versions for the data version

A dataset's version is its content, so editing one byte of a data file changes the tokenized
dataset's key (Axolotl's cache key only sees the path):
- local files: the sha256 of every file read;
- fsspec URLs (s3://, gs://, file://, ...): the store's content checksum where it keeps one (S3
  ETag, GCS md5Hash/crc32c, the hub's blob id), else the sha256 of the bytes;
- hub dataset ids: the commit the revision resolves to (asked of the hub; offline, the commit the
  local hub cache holds for it), and loading reads that same commit.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import datasets

from tunegraph.config import DatasetConfig, Recipe
from tunegraph.config.schema import PretrainingDatasetConfig
from tunegraph.ops.hashing import CHUNK_BYTES, hash_file

# File suffix -> the `datasets` packaged builder that reads it.
SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                   ".arrow": "arrow", ".txt": "text"}
# Keys of an fsspec `info()` that are derived from the content, by store.
CONTENT_CHECKSUM_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "blob_id", "sha256", "md5")
COMMIT = re.compile(r"[0-9a-f]{40}")
# Rows of a pretraining stream that the locally built tiny tokenizer learns from.
PRETRAIN_TOKENIZER_ROWS = 10_000

SourceConfig = DatasetConfig | PretrainingDatasetConfig


@dataclass(frozen=True)
class Source:
    """Where a dataset's rows come from: `kind` is "local", "url" or "hub"; `files` are the
    local paths or URLs read (empty for the hub)."""

    kind: str
    label: str
    files: tuple[str, ...] = ()
    builder: str | None = None


def dataset_label(recipe: Recipe, dataset_cfg: SourceConfig) -> str:
    """`datasets[1] (data/chat.jsonl)`: how error messages name a dataset."""
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for index, entry in enumerate(getattr(recipe, key) or []):
            if entry is dataset_cfg:
                return f"{key}[{index}] ({dataset_cfg.path})"
    return f"dataset ({dataset_cfg.path})"


def is_url(path: str) -> bool:
    """An fsspec URL (s3://bucket/x.jsonl, gs://..., file:///data/x.jsonl)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; these shapes can only be meant as local paths, so a
    # missing one is a "file not found" rather than a confusing hub lookup.
    return (Path(path).is_absolute() or path.startswith(("./", "../", "~"))
            or Path(path).suffix.lower() in SUFFIX_BUILDERS)


def resolve_data_path(recipe: Recipe, dataset_cfg: SourceConfig) -> Path | None:
    """The local file or folder of a dataset, or None for a hub dataset id or a URL.

    A relative path is looked up relative to the recipe file's folder, then the working directory.
    A path that exists nowhere but can only be local (absolute, ./ or ../, or a data suffix) is
    returned as the recipe-relative candidate, so that loading it reports the missing file."""
    if is_url(dataset_cfg.path):
        return None
    raw = Path(dataset_cfg.path).expanduser()
    candidates = [raw] if raw.is_absolute() else [recipe.base_dir / raw, Path.cwd() / raw]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return candidates[0] if _looks_local(dataset_cfg.path) else None


def _builder_for(names: list[str], dataset_cfg: SourceConfig, label: str) -> str:
    if dataset_cfg.ds_type:
        return dataset_cfg.ds_type
    suffixes = [PurePosixPath(n).suffix.lower() for n in names]
    builders = {SUFFIX_BUILDERS.get(s) for s in suffixes}
    if None in builders:
        odd = next(n for n, s in zip(names, suffixes, strict=True) if s not in SUFFIX_BUILDERS)
        raise ValueError(f"{label}: cannot tell the format of '{PurePosixPath(odd).name}' from "
                         f"its suffix (known: {', '.join(SUFFIX_BUILDERS)}); set ds_type")
    if len(builders) > 1:
        raise ValueError(f"{label}: the files mix formats ({', '.join(sorted(builders))}); "
                         f"set data_files or ds_type")
    return builders.pop()


def _patterns(dataset_cfg: SourceConfig) -> list[str]:
    value = dataset_cfg.data_files
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _wanted_suffixes(dataset_cfg: SourceConfig) -> set[str]:
    wanted = {s for s, b in SUFFIX_BUILDERS.items() if b == dataset_cfg.ds_type}
    return wanted or set(SUFFIX_BUILDERS)


def local_files(recipe: Recipe, dataset_cfg: SourceConfig) -> tuple[Path, list[Path]]:
    """(root, files) of a local dataset: the file itself, the `data_files` (names or globs inside
    the folder), or every data file in the folder (hidden files skipped)."""
    label = dataset_label(recipe, dataset_cfg)
    root = resolve_data_path(recipe, dataset_cfg)
    assert root is not None, "local_files is for local datasets"
    if not root.exists():
        raise ValueError(f"{label}: file or folder not found (looked in {recipe.base_dir} and "
                         f"{Path.cwd()})")
    if root.is_file():
        if _patterns(dataset_cfg):
            raise ValueError(f"{label}: data_files needs path to be a folder, but it is a file")
        return root, [root]
    files: list[Path] = []
    for pattern in _patterns(dataset_cfg):
        matched = sorted(p for p in root.glob(pattern) if p.is_file())
        if not matched:
            raise ValueError(f"{label}: data_files '{pattern}' matches no file in {root}")
        files += [p for p in matched if p not in files]
    if not _patterns(dataset_cfg):
        wanted = _wanted_suffixes(dataset_cfg)
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(root).parts)
                       and p.suffix.lower() in wanted)
        if not files:
            raise ValueError(f"{label}: the folder {root} holds no data file "
                             f"({', '.join(sorted(wanted))})")
    return root, files


def url_files(recipe: Recipe, dataset_cfg: SourceConfig) -> list[str]:
    """The files of an fsspec URL dataset: the URL itself, `data_files` globs inside it, or every
    data file under it, as full URLs."""
    import fsspec

    label = dataset_label(recipe, dataset_cfg)
    try:
        fs, root = fsspec.core.url_to_fs(dataset_cfg.path)
        is_dir = fs.isdir(root)
        exists = is_dir or fs.exists(root)
    except (ImportError, ValueError) as exc:  # no driver for the protocol (s3fs, gcsfs, ...)
        raise ValueError(f"{label}: cannot open the URL: {exc}") from exc
    if not exists:
        raise ValueError(f"{label}: no file or folder at this URL")
    if not is_dir:
        if _patterns(dataset_cfg):
            raise ValueError(f"{label}: data_files needs path to be a folder, but it is a file")
        return [dataset_cfg.path]
    root = root.rstrip("/")
    if _patterns(dataset_cfg):
        found: list[str] = []
        for pattern in _patterns(dataset_cfg):
            matched = sorted(p for p in fs.glob(f"{root}/{pattern}") if fs.isfile(p))
            if not matched:
                raise ValueError(f"{label}: data_files '{pattern}' matches no file under the URL")
            found += [p for p in matched if p not in found]
    else:
        wanted = _wanted_suffixes(dataset_cfg)
        found = sorted(p for p in fs.find(root)
                       if not any(part.startswith(".") for part in p[len(root):].split("/"))
                       and PurePosixPath(p).suffix.lower() in wanted)
        if not found:
            raise ValueError(f"{label}: the folder at this URL holds no data file")
    return [fs.unstrip_protocol(p) for p in found]


def resolve_source(recipe: Recipe, dataset_cfg: SourceConfig) -> Source:
    label = dataset_label(recipe, dataset_cfg)
    if is_url(dataset_cfg.path):
        files = url_files(recipe, dataset_cfg)
        return Source("url", label, tuple(files), _builder_for(files, dataset_cfg, label))
    if resolve_data_path(recipe, dataset_cfg) is None:
        return Source("hub", label)
    _, paths = local_files(recipe, dataset_cfg)
    files = [str(p) for p in paths]
    return Source("local", label, tuple(files), _builder_for(files, dataset_cfg, label))


def url_checksum(url: str) -> str:
    """The store's content checksum of a URL's file, else the sha256 of its bytes."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    for key in CONTENT_CHECKSUM_KEYS:
        if info.get(key):
            return f"{key}:{info[key]}"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def hub_commit(dataset_cfg: SourceConfig) -> str | None:
    """The commit a hub dataset's revision (default main) is at: asked of the hub, or, offline,
    read from the local hub cache; None when neither knows (loading will then fail, saying why)."""
    revision = dataset_cfg.revision
    if revision and COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_cfg.path, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 (offline, unknown id, no access: the cache may still know)
        pass
    from huggingface_hub import constants

    ref = (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset_cfg.path.replace('/', '--')}"
           / "refs" / (revision or "main"))
    return ref.read_text().strip() if ref.is_file() else None


def source_fingerprint(recipe: Recipe, dataset_cfg: SourceConfig) -> dict[str, Any]:
    """One dataset's content version (see the module docstring)."""
    source = resolve_source(recipe, dataset_cfg)
    if source.kind == "hub":
        return {"hub": dataset_cfg.path, "revision": dataset_cfg.revision,
                "commit": hub_commit(dataset_cfg), "name": dataset_cfg.name,
                "split": dataset_cfg.split, "data_files": dataset_cfg.data_files}
    if source.kind == "url":
        return {"url": dataset_cfg.path, "files": {f: url_checksum(f) for f in source.files}}
    root = resolve_data_path(recipe, dataset_cfg)
    assert root is not None
    base = root if root.is_dir() else root.parent
    return {"path": dataset_cfg.path,
            "files": {str(Path(f).relative_to(base)): hash_file(Path(f)) for f in source.files}}


def data_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Per dataset (and test dataset, and pretraining stream), its content version."""
    fingerprint: dict[str, Any] = {
        "datasets": [source_fingerprint(recipe, d) for d in recipe.datasets]}
    for key in ("test_datasets", "pretraining_dataset"):
        if getattr(recipe, key):
            fingerprint[key] = [source_fingerprint(recipe, d) for d in getattr(recipe, key)]
    return fingerprint


def _load_files(source: Source, dataset_cfg: SourceConfig, cache_dir: Path | None,
                streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    assert source.builder is not None
    with tempfile.TemporaryDirectory(prefix="tunegraph-datasets-") as scratch:
        try:
            if streaming:
                return datasets.load_dataset(source.builder, data_files=list(source.files),
                                             split=dataset_cfg.split, streaming=True)
            return datasets.load_dataset(source.builder, data_files=list(source.files),
                                         split=dataset_cfg.split,
                                         cache_dir=str(cache_dir or scratch),
                                         keep_in_memory=cache_dir is None)
        except ValueError as exc:  # unknown split, bad slice
            raise ValueError(f"{source.label}: split '{dataset_cfg.split}': {exc}") from exc
        except (datasets.exceptions.DatasetGenerationError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise ValueError(f"{source.label}: could not read as {source.builder}: "
                             f"{type(cause).__name__}: {cause}") from exc


def _load_hub(source: Source, dataset_cfg: SourceConfig, cache_dir: Path | None,
              streaming: bool = False, commit: str | None = None
              ) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(dataset_cfg.path, name=dataset_cfg.name,
                                     data_files=dataset_cfg.data_files, split=dataset_cfg.split,
                                     revision=commit or hub_commit(dataset_cfg)
                                     or dataset_cfg.revision,
                                     cache_dir=str(cache_dir) if cache_dir else None,
                                     streaming=streaming)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise ValueError(f"{source.label}: not a local file or folder, and not found on the hub "
                         f"({exc})") from exc
    except ValueError as exc:  # unknown split or configuration name
        raise ValueError(f"{source.label}: {exc}") from exc


def load_numbered_rows(recipe: Recipe, dataset_cfg: DatasetConfig,
                       cache_dir: Path | None = None) -> tuple[datasets.Dataset, list[int] | None]:
    """The dataset's rows, and for a shard, each kept row's number in the whole dataset (None
    when every row is kept, in order), so errors name rows as the user counts them.

    Local data and URLs are read by the packaged builder for their format. Without `cache_dir`,
    the Arrow files `datasets` writes go to a temporary folder and the rows are kept in memory,
    so loading local data never fills the user's home cache (tunegraph caches the *tokenized*
    data itself, keyed by content). Hub datasets use `cache_dir` or the usual HF cache."""
    source = resolve_source(recipe, dataset_cfg)
    if source.kind == "hub":
        rows = _load_hub(source, dataset_cfg, cache_dir)
    else:
        rows = _load_files(source, dataset_cfg, cache_dir)
    if not dataset_cfg.shards:
        return rows, None
    # Axolotl's rule: shuffle with the seed, then keep shard shards_idx of shards. The same
    # permutation applied to row numbers tells which rows were kept.
    numbers = datasets.Dataset.from_dict({"n": list(range(len(rows)))})
    kept = numbers.shuffle(seed=recipe.data_seed).shard(dataset_cfg.shards,
                                                         dataset_cfg.shards_idx)["n"]
    return rows.select(kept), kept


def load_rows(recipe: Recipe, dataset_cfg: DatasetConfig,
              cache_dir: Path | None = None) -> datasets.Dataset:
    """The dataset's rows as a `datasets.Dataset` (only the kept shard, when `shards` is set)."""
    return load_numbered_rows(recipe, dataset_cfg, cache_dir)[0]


def locate_row(recipe: Recipe, dataset_cfg: SourceConfig, row_number: int) -> tuple[str, int]:
    """(file, row within that file) of a row of a dataset read from several files: for error
    messages only (each file is loaded again to count its rows)."""
    source = resolve_source(recipe, dataset_cfg)
    start = 0
    for name in source.files:
        count = len(_load_files(Source(source.kind, source.label, (name,), source.builder),
                                dataset_cfg, None))
        if row_number < start + count:
            return name, row_number - start
        start += count
    raise AssertionError(f"row {row_number} is past the end of {source.label}")


def stream_rows(recipe: Recipe, dataset_cfg: PretrainingDatasetConfig,
                commit: str | None = None) -> datasets.IterableDataset:
    """A pretraining dataset as a stream of rows, `skip` applied; a hub id is read at `commit`
    (the one pinned at preprocessing), else at the commit its revision is at now."""
    source = resolve_source(recipe, dataset_cfg)
    if source.kind == "hub":
        rows = _load_hub(source, dataset_cfg, None, streaming=True, commit=commit)
    else:
        rows = _load_files(source, dataset_cfg, None, streaming=True)
    return rows.skip(dataset_cfg.skip) if dataset_cfg.skip else rows


def stream_texts(recipe: Recipe, dataset_cfg: PretrainingDatasetConfig,
                 commit: str | None = None) -> Iterator[str]:
    """The text of each row of a pretraining stream; a row without text is an error naming it."""
    label = dataset_label(recipe, dataset_cfg)
    for number, row in enumerate(stream_rows(recipe, dataset_cfg, commit), start=dataset_cfg.skip):
        text = row.get(dataset_cfg.text_column)
        if not isinstance(text, str):
            got = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise ValueError(f"{label}, row {number} (counting from 0): field "
                             f"'{dataset_cfg.text_column}' is {got}")
        yield text


def iter_texts(recipe: Recipe, cache_dir: Path | None = None) -> Iterator[str]:
    """The raw text of every row of every dataset, in order: what the tiny tokenizer learns from
    (for a pretraining stream, its first rows). Malformed rows are skipped here; tokenization
    reports them with their row number."""
    from tunegraph.ops.prompts import row_texts

    for dataset_cfg in recipe.datasets:
        for row in load_rows(recipe, dataset_cfg, cache_dir):
            yield from row_texts(dataset_cfg, row)
    for stream_cfg in recipe.pretraining_dataset or []:
        for number, text in enumerate(stream_texts(recipe, stream_cfg)):
            if number >= PRETRAIN_TOKENIZER_ROWS:
                break
            yield text
