"""Content hashes: the keys of content-addressed stages and Dagster data versions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


def hash_json(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Every regular file under `root` (or `root` itself), sorted, skipping names in `skip`."""
    if root.is_file():
        return [root]
    skipped = set(skip)
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not (set(p.relative_to(root).parts) & skipped))


def hash_tree(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """{relative path: sha256} for every file under `root`."""
    base = root if root.is_dir() else root.parent
    return {str(p.relative_to(base)): hash_file(p) for p in list_files(root, skip)}


def short(digest: str) -> str:
    """The 16-hex prefix used in artifact directory names and Dagster data versions."""
    return digest[:16]
