"""Bin packing: a valid partition, the best-fit rule at every step, and packed rows that hold
exactly the documents they came from."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from tunegraph.ops.pack import best_fit_decreasing, pack_rows, packing_stats


def lognormal(count: int, median: int, sigma: float, capacity: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, count)), 1, capacity).astype(int)


def first_fit(lengths: np.ndarray, capacity: int) -> int:
    """Bins used by plain first-fit in the given order (the rule Axolotl's sampler applies)."""
    free: list[int] = []
    for size in lengths.tolist():
        slot = next((i for i, f in enumerate(free) if f >= size), None)
        if slot is None:
            free.append(capacity - size)
        else:
            free[slot] -= size
    return len(free)


def assert_partition(lengths: np.ndarray, bins: list[list[int]], capacity: int) -> None:
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(0 < lengths[b].sum() <= capacity for b in bins)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_best_fit_rule_holds_at_every_placement(sigma):
    """Replay the bins in the order items were placed (longest first): each item went into a bin
    with the least free space that still held it, or opened a bin when none could."""
    capacity = 512
    lengths = lognormal(600, 90, sigma, capacity, seed=int(sigma * 10))
    bins = best_fit_decreasing(lengths, capacity)
    assert_partition(lengths, bins, capacity)
    where = {i: b for b, items in enumerate(bins) for i in items}
    position = {i: k for items in bins for k, i in enumerate(items)}
    free: dict[int, int] = {}
    for index in np.argsort(-lengths, kind="stable").tolist():
        size, chosen = int(lengths[index]), where[index]
        fits = [f for f in free.values() if f >= size]
        if position[index] == 0:
            assert chosen not in free and not fits, "opened a bin while one still had room"
            free[chosen] = capacity - size
        else:
            assert free[chosen] == min(fits), "not the tightest fit"
            free[chosen] -= size


def test_beats_first_fit_and_approaches_the_lower_bound():
    capacity = 4096
    lengths = lognormal(5000, 600, 0.8, capacity)
    order = np.random.default_rng(1).permutation(len(lengths))
    bins = best_fit_decreasing(lengths, capacity)
    stats = packing_stats(lengths, bins, capacity)
    assert stats["packing_lower_bound_rows"] <= stats["num_packed_rows"] <= first_fit(
        lengths[order], capacity)
    assert stats["packing_efficiency"] >= 0.99
    assert sum(int(k) * v for k, v in stats["documents_per_row"].items()) == len(lengths)


def test_edge_cases_and_errors():
    assert best_fit_decreasing([], 8) == []
    assert best_fit_decreasing([8, 8], 8) == [[0], [1]]
    # Equal lengths keep their order; the last-filled bin with the tightest room is chosen.
    assert best_fit_decreasing([3, 5, 3, 2], 8) == [[1, 0], [2, 3]]
    with pytest.raises(ValueError, match=r"between 1 and capacity \(8\); got 0\.\.9"):
        best_fit_decreasing([9, 0], 8)


def test_pack_rows_keeps_every_document_whole():
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 400, rng.integers(1, 40)).tolist() for _ in range(200)]
    labels = [[-100 if k % 3 == 0 else t for k, t in enumerate(d)] for d in docs]
    rows = datasets.Dataset.from_dict({"input_ids": docs, "labels": labels})
    packed, stats = pack_rows(rows, capacity=64)
    assert packed.column_names == ["input_ids", "labels", "document_lengths"]
    assert len(packed) == stats["num_packed_rows"] < len(docs)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["document_lengths"]) <= 64
        start = 0
        for n in row["document_lengths"]:
            seen.append((tuple(row["input_ids"][start:start + n]),
                         tuple(row["labels"][start:start + n])))
            start += n
    assert sorted(seen) == sorted(zip(map(tuple, docs), map(tuple, labels), strict=True))
    assert stats["packing_efficiency"] == sum(map(len, docs)) / (64 * len(packed))
