"""Shared by benchmarks/*.py: percentiles, the ratios to the best peer, and the results JSON in
BENCHMARKS.md's one format. Not runnable; import it after putting benchmarks/ on sys.path.

    from _results import percentile, compare_to_peers, write_results, package_version
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from pathlib import Path
from typing import Any

MINE = "tunegraph"


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timing_fields(samples_ms: list[float], digits: int = 3) -> dict[str, float]:
    """median_ms, p10_ms, p90_ms of pooled samples."""
    return {"median_ms": round(statistics.median(samples_ms), digits),
            "p10_ms": round(percentile(samples_ms, 0.1), digits),
            "p90_ms": round(percentile(samples_ms, 0.9), digits)}


def compare_to_peers(rows: list[dict[str, Any]], peers: list[str]) -> dict[str, Any]:
    """Per workload, add to tunegraph's row its best (fastest) peer, the speedup (best peer's
    time over tunegraph's) and the memory ratio (lowest peer's peak over tunegraph's); > 1 means
    tunegraph is ahead. Returns the top-level fields: the best peer (or "per workload: ..."), and
    the geometric means over workloads."""
    mine_rows = []
    for workload in dict.fromkeys(row["workload"] for row in rows):
        in_workload = [row for row in rows if row["workload"] == workload]
        peer_rows = [row for row in in_workload if row["provider"] in peers]
        mine = next(row for row in in_workload if row["provider"] == MINE)
        fastest = min(peer_rows, key=lambda row: row["median_ms"])
        leanest = min(row["peak_mem_mb"] for row in peer_rows)
        mine.update(best_peer=fastest["provider"],
                    speedup_vs_best_peer=round(fastest["median_ms"] / mine["median_ms"], 3),
                    mem_ratio_vs_best_peer=round(leanest / max(mine["peak_mem_mb"], 1e-3), 3))
        mine_rows.append(mine)
    best = sorted({row["best_peer"] for row in mine_rows})

    def geomean(key: str) -> float:
        return round(math.exp(statistics.fmean(math.log(max(row[key], 1e-6)) for row in mine_rows)), 3)

    return {"best_peer": best[0] if len(best) == 1 else "per workload: " + ", ".join(best),
            "speedup_vs_best_peer": geomean("speedup_vs_best_peer"),
            "mem_ratio_vs_best_peer": geomean("mem_ratio_vs_best_peer"),
            "speedup_vs_best_peer_min": min(row["speedup_vs_best_peer"] for row in mine_rows),
            "mem_ratio_vs_best_peer_min": min(row["mem_ratio_vs_best_peer"] for row in mine_rows)}


def write_results(out: Path, *, bench_id: str, device: str, command: str,
                  rows: list[dict[str, Any]], summary: dict[str, Any], **extra: Any) -> dict:
    """Write {"id", "device", "date", "command", "rows", "best_peer", "speedup_vs_best_peer",
    "mem_ratio_vs_best_peer", ...extra} to `out` and return it."""
    result = {"id": bench_id, "device": device, "date": datetime.date.today().isoformat(),
              "command": command, "rows": rows, **summary, **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
