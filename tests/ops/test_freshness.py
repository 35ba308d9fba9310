"""tunegraph/ops/freshness.py without Dagster: probing stages computes their keys and does no work;
data snapshots hash a file again only when its size or mtime moved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from recipes_support import write_tiny_recipe

from tunegraph.config import load_recipe
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.freshness import changed_files, data_snapshot, probe_stages
from tunegraph.ops.stages import base_model_stage, tokenized_stage


def test_probe_reports_stored_keys_and_computes_nothing(tmp_path: Path):
    recipe = load_recipe(write_tiny_recipe(tmp_path))
    store = ArtifactStore(tmp_path / "store")
    base = base_model_stage(recipe, store, "tiny").artifact
    tokenized = tokenized_stage(recipe, store, base).artifact
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))

    probes = {p.stage: p for p in probe_stages(recipe, store, "tiny")}
    assert (probes["base_model"].key, probes["base_model"].stored) == (base.key, True)
    assert (probes["tokenized_dataset"].key, probes["tokenized_dataset"].stored) == (
        tokenized.key, True)
    # Training would compute: its key is known, nothing downstream of it is.
    assert probes["adapter"].key is not None and not probes["adapter"].stored
    assert probes["merged_model"].key is None
    assert "eval_scores" not in probes  # its partitions are the checkpoints training makes
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before

    data = tmp_path / "data" / "rows.jsonl"
    data.write_bytes(data.read_bytes().replace(b'"cold"', b'"cool"', 1))
    probes = {p.stage: p for p in probe_stages(recipe, store, "tiny")}
    assert probes["base_model"].key != base.key and not probes["base_model"].stored
    assert probes["tokenized_dataset"].key is None


def test_snapshot_rehashes_only_files_whose_stat_moved(tmp_path: Path):
    recipe = load_recipe(write_tiny_recipe(tmp_path))
    data = tmp_path / "data" / "rows.jsonl"
    first = data_snapshot(recipe)
    assert list(first) == [str(data)]

    # Same size and mtime: trusted without reading (a stat per file per tick).
    stat = data.stat()
    data.write_bytes(data.read_bytes().replace(b'"cold"', b'"warm"', 1))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_snapshot(recipe, first) == first
    # A moved mtime is read and hashed again: here the bytes differ.
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = data_snapshot(recipe, first)
    assert changed_files(first, second) == [str(data)]

    data.unlink()
    with pytest.raises(ValueError, match=r"datasets\[0\] \(data/rows.jsonl\): file or folder not found"):
        data_snapshot(recipe, second)
