"""ArtifactStore: atomic publication, crash leftovers, the manifest, and the IO manager's pointer."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tunegraph.ops.artifacts as artifacts
from tunegraph.ops.artifacts import MANIFEST, Artifact, ArtifactStore


def tmp_folders(store: ArtifactStore, kind: str) -> list[Path]:
    return sorted((store.root / kind).glob(".tmp-*"))


def test_write_publishes_only_on_success(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with store.write("models", "k1", {"note": "hi"}) as out:
        (out / "weights.bin").write_bytes(b"\x00\x01")
        # While the body runs the files sit in a private .tmp folder, not under the key.
        assert out.parent == store.root / "models" and out.name.startswith(".tmp-k1-")
        assert not store.path("models", "k1").exists()
        assert store.get("models", "k1") is None
    artifact = store.get("models", "k1")
    assert artifact is not None and artifact.path == store.path("models", "k1")
    assert (artifact.path / "weights.bin").read_bytes() == b"\x00\x01"
    assert not out.exists() and tmp_folders(store, "models") == []


def test_exception_in_body_publishes_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(RuntimeError, match="boom"):
        with store.write("models", "k1", {}) as out:
            (out / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert store.get("models", "k1") is None
    assert not store.path("models", "k1").exists()
    assert tmp_folders(store, "models") == []


def test_killed_writer_leaves_only_a_tmp_folder(tmp_path):
    """A process that dies inside `write` (os._exit: no finally, no except) never publishes, and
    even a leftover holding a manifest is not returned by get(); clean_partial removes it."""
    store = ArtifactStore(tmp_path / "store")
    script = textwrap.dedent(f"""
        import os
        from tunegraph.ops.artifacts import ArtifactStore
        with ArtifactStore({str(store.root)!r}).write("models", "k1", {{}}) as out:
            (out / "weights.bin").write_bytes(b"partial")
            (out / "manifest.json").write_text("{{}}")
            os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    [leftover] = tmp_folders(store, "models")
    assert (leftover / "weights.bin").is_file()
    assert store.get("models", "k1") is None
    assert store.clean_partial() == 1
    assert tmp_folders(store, "models") == []
    with store.write("models", "k1", {}) as out:  # the key is free to be written again
        (out / "weights.bin").write_bytes(b"whole")
    assert (store.get("models", "k1").path / "weights.bin").read_bytes() == b"whole"
    assert store.clean_partial() == 0


def test_manifest_carries_provenance(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    before = time.time()
    with store.write("adapters", "abc", {"recipe": {"learning_rate": 0.1}}) as out:
        (out / "a.txt").write_text("alpha")
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\xff" * 3)
    manifest = store.get("adapters", "abc").manifest
    assert manifest == json.loads((store.path("adapters", "abc") / MANIFEST).read_text())
    assert (manifest["kind"], manifest["key"]) == ("adapters", "abc")
    assert manifest["recipe"] == {"learning_rate": 0.1}
    # The manifest does not hash itself: the hashes describe the files it was written beside.
    assert manifest["files"] == {"a.txt": hashlib.sha256(b"alpha").hexdigest(),
                                 "sub/b.bin": hashlib.sha256(b"\xff" * 3).hexdigest()}
    assert {"python", "tunegraph", "torch", "transformers", "peft"} <= set(manifest["libraries"])
    created = calendar.timegm(time.strptime(manifest["created_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert int(before) <= created <= time.time()  # UTC, to the second
    assert "git_revision" in manifest


def test_second_writer_of_a_key_keeps_the_first(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    for content in (b"first", b"second"):
        with store.write("models", "k", {}) as out:
            (out / "w.bin").write_bytes(content)
    assert (store.path("models", "k") / "w.bin").read_bytes() == b"first"
    assert tmp_folders(store, "models") == []


def test_writer_losing_the_rename_race_succeeds(tmp_path, monkeypatch):
    """Two processes write the same key; the other publishes between our exists() check and our
    rename. The artifact is complete (same key = same content), so our write must not fail."""
    store = ArtifactStore(tmp_path / "store")
    real_rename = os.rename

    def rival_publishes_first(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "w.bin").write_bytes(b"rival")
        (Path(dst) / MANIFEST).write_text("{}")
        real_rename(src, dst)

    monkeypatch.setattr(artifacts.os, "rename", rival_publishes_first)
    with store.write("models", "k", {}) as out:
        (out / "w.bin").write_bytes(b"ours")
    assert (store.path("models", "k") / "w.bin").read_bytes() == b"rival"
    assert tmp_folders(store, "models") == []


def test_pointer_round_trip(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with store.write("merged", "k9", {"checks": {"diff": 0.0}}) as out:
        (out / "x").write_text("x")
    artifact = store.get("merged", "k9")
    pointer = json.loads(json.dumps(artifact.to_json()))  # what the IO manager stores on disk
    assert pointer == {"kind": "merged", "key": "k9", "path": str(store.path("merged", "k9"))}
    loaded = Artifact.from_json(pointer)
    assert loaded == artifact and loaded.manifest == artifact.manifest
    assert loaded.manifest["checks"] == {"diff": 0.0}


def test_pointer_to_an_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete artifact"):
        Artifact.from_json({"kind": "models", "key": "half", "path": str(tmp_path / "half")})
