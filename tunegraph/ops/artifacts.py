"""The artifact store: content-addressed directories with a manifest, written atomically.

Layout: `<root>/<kind>/<key>/` holds an artifact's files and `manifest.json`. `key` is the content
hash of everything that produced it, so an existing complete directory IS the cache hit. A write
goes to `<root>/<kind>/.tmp-<key>-<random>/` and becomes visible by one `os.rename` after the
manifest is written: a crash leaves only a `.tmp-*` folder, which readers never see as complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tunegraph.ops.hashing import hash_tree

MANIFEST = "manifest.json"
TRACKED_LIBRARIES = ("tunegraph", "torch", "transformers", "peft", "trl", "datasets", "tokenizers",
                     "accelerate", "safetensors", "dagster")


@dataclass(frozen=True)
class Artifact:
    """A handle to one complete artifact: what downstream stages receive."""

    kind: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "path": str(self.path)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Artifact:
        path = Path(value["path"])
        return cls(value["kind"], value["key"], path, read_manifest(path))


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{path} is not a complete artifact: {MANIFEST} is missing")
    return json.loads(manifest.read_text())


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(cwd: Path | None = None) -> str | None:
    """The git revision of the working directory's repository, '+dirty' if it has changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


class ArtifactStore:
    """Content-addressed artifact directories under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact for (kind, key), or None if it has not been written."""
        path = self.path(kind, key)
        if not (path / MANIFEST).is_file():
            return None
        return Artifact(kind, key, path, read_manifest(path))

    @contextmanager
    def write(self, kind: str, key: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield a private folder to fill; on success, add the manifest and publish it atomically.

        The manifest gets the content hash of every file, the library versions, the git revision
        and the creation time added to what the caller passes (resolved recipe, inputs, metrics).
        On an exception the folder is removed and nothing is published.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            full = {"kind": kind, "key": key, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                           time.gmtime()),
                    "libraries": library_versions(), "git_revision": git_revision(), **manifest,
                    "files": hash_tree(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                # Another writer published this key first (rename onto a non-empty folder
                # fails); ours is identical by key, so theirs stands and ours is dropped.
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_partial(self) -> int:
        """Remove `.tmp-*` folders left by crashed writes; returns how many were removed."""
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        return removed
