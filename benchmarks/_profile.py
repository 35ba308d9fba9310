"""One profiled window of a benchmark, reduced to what says where the time goes.

`StepProfiler` wraps torch.profiler (CPU and CUDA activities) around a window the caller marks
with start() and stop(); `summarize_trace` reads the Chrome trace it exports (torch.profiler's
own format: "traceEvents" with "cat" = "kernel" / "gpu_memcpy" / "gpu_memset" on the GPU
streams) into: the window's wall time, the GPU's busy time (the union of its kernels'
intervals), time per kernel family, the largest idle gaps with the kernel before each, and the
top kernels by total time. Written by hand: torch.profiler's key_averages gives totals per
name but not busy-vs-idle, which is the question for a step that runs ~40% over its floor.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Kernel families, first match wins (substrings of the lower-cased kernel name). Triton kernels
# carry their Python function's name (no C++ namespace, no "void"): the rest of the names.
FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "matmul")),
    ("optimizer", ("multi_tensor", "adam", "fused_sgd")),
    ("reduction", ("reduce",)),
    ("copy/cast", ("copy", "memcpy", "memset", "catarray", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]
TRITON = "tunegraph/liger triton"


def family(name: str) -> str:
    lowered = name.lower()
    for label, needles in FAMILIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other" if ("::" in name or lowered.startswith("void ")) else TRITON


def _union_ms(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float, int]]]:
    """Busy time (ms) of sorted (start_us, end_us) intervals, and the idle gaps between them as
    (gap_ms, start_us, index of the interval before the gap)."""
    busy_us, gaps = 0.0, []
    current_start, current_end, last_index = None, None, -1
    for index, (start, end) in enumerate(intervals):
        if current_end is None:
            current_start, current_end, last_index = start, end, index
        elif start > current_end:
            busy_us += current_end - current_start
            gaps.append(((start - current_end) / 1000, current_end, last_index))
            current_start, current_end, last_index = start, end, index
        else:
            if end > current_end:
                current_end, last_index = end, index
    if current_end is not None:
        busy_us += current_end - current_start
    return busy_us / 1000, gaps


def _split_at_optimizer(events: list[dict[str, Any]], intervals: list[tuple[float, float]]
                        ) -> list[dict[str, Any]]:
    """The window cut into steps after each run of optimizer kernels (a step ends with its
    optimizer): per piece, GPU wall from its first kernel to its optimizer's end, busy time,
    and its largest idle gap. Shows whether slow steps are slow everywhere or at one stall."""
    pieces, start = [], 0
    for index, event in enumerate(events):
        ends_step = (family(event["name"]) == "optimizer"
                     and (index + 1 == len(events)
                          or family(events[index + 1]["name"]) != "optimizer"))
        if ends_step:
            piece = intervals[start:index + 1]
            busy_ms, gaps = _union_ms(piece)
            gap = max(gaps, default=(0.0, 0.0, 0))
            pieces.append({"wall_ms": round((max(e for _, e in piece) - piece[0][0]) / 1000, 2),
                           "busy_ms": round(busy_ms, 2), "largest_gap_ms": round(gap[0], 3),
                           "gap_after": events[start + gap[2]]["name"][:60] if gaps else "",
                           "kernels": len(piece)})
            start = index + 1
    return pieces


def summarize_trace(trace: dict[str, Any], steps: int, top: int = 15) -> dict[str, Any]:
    """Per-step figures of a Chrome trace spanning `steps` steps (see the module docstring)."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and "dur" in e]
    if not events:
        return {"steps": steps, "gpu_events": 0, "note": "no GPU events in the trace"}
    events.sort(key=lambda e: float(e["ts"]))
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
    window_ms = (max(end for _, end in intervals) - intervals[0][0]) / 1000
    busy_ms, gaps = _union_ms(intervals)
    by_family: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        duration_ms = float(event["dur"]) / 1000
        by_family[family(event["name"])] += duration_ms
        by_name[event["name"]][0] += 1
        by_name[event["name"]][1] += duration_ms
    per_step_split = _split_at_optimizer(events, intervals)
    gaps.sort(reverse=True)
    per_step = 1 / steps
    return {
        "steps": steps,
        "gpu_events": len(events),
        "kernels_per_step": round(len(events) * per_step),
        "gpu_window_ms_per_step": round(window_ms * per_step, 2),
        "gpu_busy_ms_per_step": round(busy_ms * per_step, 2),
        "gpu_idle_ms_per_step": round((window_ms - busy_ms) * per_step, 2),
        "idle_gaps_over_50us_per_step": round(sum(g for g, _, _ in gaps if g > 0.05) * per_step, 2),
        "largest_gaps": [{"ms": round(g, 3), "after": events[i]["name"][:90]}
                         for g, _, i in gaps[:8]],
        "per_step": per_step_split,
        "ms_per_step_by_family": {k: round(v * per_step, 2) for k, v in
                                  sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "family": family(name),
                         "calls_per_step": round(count * per_step, 1),
                         "ms_per_step": round(total * per_step, 3)}
                        for name, (count, total) in
                        sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]],
    }


def format_summary(label: str, summary: dict[str, Any]) -> str:
    """A few lines for a log."""
    if not summary.get("gpu_events"):
        return f"{label}: {summary.get('note', 'no profile')}"
    lines = [f"{label}: per step {summary['gpu_window_ms_per_step']} ms of GPU window, "
             f"{summary['gpu_busy_ms_per_step']} busy, {summary['gpu_idle_ms_per_step']} idle "
             f"({summary['kernels_per_step']} kernels)",
             "  by family (ms/step): " + ", ".join(
                 f"{k} {v}" for k, v in summary["ms_per_step_by_family"].items()),
             "  per step (wall/busy ms, largest gap): " + "; ".join(
                 f"{p['wall_ms']}/{p['busy_ms']} ({p['largest_gap_ms']} after "
                 f"{p['gap_after'][:30]})" for p in summary.get("per_step", [])),
             "  largest gaps: " + "; ".join(
                 f"{g['ms']} ms after {g['after'][:50]}" for g in summary["largest_gaps"][:5])]
    lines += [f"  {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<6} {k['family']:<22} "
              f"{k['name'][:90]}" for k in summary["top_kernels"]]
    return "\n".join(lines)


class StepProfiler:
    """torch.profiler over a window of steps: start(), then stop(steps) writes the trace
    (gzipped) and the host-side operator table beside `trace_path`, and returns the summary."""

    def __init__(self, trace_path: Path) -> None:
        self.trace_path = Path(trace_path)
        self._profiler = None

    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()

    def stop(self, steps: int) -> dict[str, Any]:
        import torch

        if self._profiler is None:
            raise RuntimeError("StepProfiler.stop() before start()")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        raw = self.trace_path.with_suffix(".json")
        profiler.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        with gzip.open(self.trace_path.with_suffix(".json.gz"), "wt") as handle:
            json.dump(trace, handle)
        raw.unlink()
        summary = summarize_trace(trace, steps)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        self.trace_path.with_suffix(".cpu.txt").write_text(table)
        summary["host_ops_by_self_cpu"] = table
        return summary
