"""Sample packing: put tokenized rows side by side in rows of `sequence_len` tokens.

    bins = best_fit_decreasing(lengths, capacity=4096)     # [[row, row, ...], ...]
    packed, stats = pack_rows(dataset, capacity=4096)      # input_ids, labels, document_lengths

A packed row is its documents' tokens one after the other; `document_lengths` says where each
document ends, so training restarts position ids per document and never lets attention cross
from one document into the next (tunegraph.ops.packed_attention). Labels are stored as the
documents had them; the collator masks each document's first label, which a packed row would
otherwise predict from the previous document's last token.

The bin packing is hand-written: no maintained Python library packs integer sizes into bins
quickly (`binpacking` on PyPI is first-fit over Python lists, minutes for 100k items; Axolotl's
own packer needs numba). Benchmark D2 (benchmarks/d2_pack.py) measures it against first-fit in
sampler order (what Axolotl does) and against the lower bound sum(lengths) / capacity.
"""

from __future__ import annotations

import uuid
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

PACKED_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                     "labels": datasets.List(datasets.Value("int32")),
                                     "document_lengths": datasets.List(datasets.Value("int32"))})


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity` in total: longest item first, each
    into the open bin it fills most tightly (the fullest one it still fits), else a new bin.

    Deterministic: equal lengths keep their index order, and among bins with equal free space
    the most recently filled one is chosen. O(n log n) for the sort, then O(log C) per item:
    open bins are kept in buckets by free space (an integer 0..capacity), and a sorted list of
    the free-space values that have a bucket finds the tightest fit with one bisection. That list
    never holds more than capacity + 1 values, so inserting into it stays cheap."""
    sizes = np.asarray(lengths, dtype=np.int64)
    if sizes.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {sizes.shape}")
    if len(sizes) and (sizes.min() < 1 or sizes.max() > capacity):
        raise ValueError(f"lengths must be between 1 and capacity ({capacity}); got "
                         f"{int(sizes.min())}..{int(sizes.max())}")
    order = np.argsort(-sizes, kind="stable")
    bins: list[list[int]] = []
    holders: list[list[int]] = [[] for _ in range(capacity + 1)]  # free space -> open bins
    free_values: list[int] = []  # sorted free-space values whose holders list is non-empty
    for index, size in zip(order.tolist(), sizes[order].tolist(), strict=True):
        at = bisect_left(free_values, size)
        if at == len(free_values):
            bin_id, free = len(bins), capacity - size
            bins.append([index])
        else:
            fit = free_values[at]
            bin_id = holders[fit].pop()
            if not holders[fit]:
                del free_values[at]
            bins[bin_id].append(index)
            free = fit - size
        if free:
            if not holders[free]:
                insort(free_values, free)
            holders[free].append(bin_id)
    return bins


def packing_stats(lengths: Sequence[int] | np.ndarray, bins: list[list[int]], capacity: int
                  ) -> dict[str, Any]:
    """Efficiency (tokens / row slots), row count and the documents-per-row distribution."""
    num_tokens = int(np.sum(lengths)) if len(lengths) else 0
    per_row = Counter(len(b) for b in bins)
    return {"num_packed_rows": len(bins),
            "packing_efficiency": num_tokens / (len(bins) * capacity) if bins else 0.0,
            # The fewest rows any packing could use: how close this one came.
            "packing_lower_bound_rows": -(-num_tokens // capacity),
            "documents_per_row": {str(k): per_row[k] for k in sorted(per_row)}}


def pack_rows(rows: datasets.Dataset, capacity: int) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Pack a tokenized split (input_ids, labels) into rows of at most `capacity` tokens.

    The copy is done by Arrow: rows are taken in bin order and their token lists flattened once,
    then cut at the bins' boundaries, so no token passes through a Python list."""
    # The Arrow rows in the dataset's order (a shuffled or split dataset is an index mapping
    # over its table, which `with_format("arrow")` applies).
    table = rows.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    table = table.combine_chunks()
    lengths = np.asarray(pa.compute.list_value_length(table["input_ids"]).to_numpy(
        zero_copy_only=False), dtype=np.int64)
    bins = best_fit_decreasing(lengths, capacity)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    taken = table.take(pa.array(order))
    docs_per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    doc_lengths = lengths[order]
    tokens_per_bin = np.add.reduceat(doc_lengths, np.r_[0, np.cumsum(docs_per_bin)[:-1]]) \
        if len(bins) else np.zeros(0, dtype=np.int64)
    token_offsets = pa.array(np.r_[0, np.cumsum(tokens_per_bin)].astype(np.int32))
    doc_offsets = pa.array(np.r_[0, np.cumsum(docs_per_bin)].astype(np.int32))
    columns = {name: pa.ListArray.from_arrays(
        token_offsets, pa.concat_arrays([c.flatten() for c in taken[name].chunks])
        if taken[name].num_chunks else pa.array([], pa.int32()))
        for name in ("input_ids", "labels")}
    columns["document_lengths"] = pa.ListArray.from_arrays(
        doc_offsets, pa.array(doc_lengths.astype(np.int32)))
    table = pa.table(columns)
    # A fingerprint given, so datasets does not hash (pickle) every token to make one: 1.6 s of
    # 3.6 s for 16M tokens, measured.
    packed = datasets.Dataset(table, fingerprint=f"packed-{uuid.uuid4().hex}")
    if packed.features != PACKED_FEATURES:
        packed = packed.cast(PACKED_FEATURES)
    return packed, packing_stats(lengths, bins, capacity)
