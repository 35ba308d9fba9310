"""Benchmarks O1 and O2 (CPU): what Dagster costs on top of the work, for the quickstart recipe.

    python benchmarks/o_orchestration.py            # ~6 min on a 2-core machine

O2: the quickstart materialized through Dagster (`tunegraph materialize examples/quickstart.yaml`,
what a user runs: the embedded SQLite instance, every asset, each checkpoint's eval_scores
partition, the report and the asset checks) against the same stages called directly in one
Python process (tunegraph.ops.stages and ops.report in the asset graph's order: base model,
tokenized dataset, training, merge, eval scores per checkpoint, report; no Dagster imported).
Each runs in a fresh subprocess with its own empty TUNEGRAPH_HOME (instance and artifact
store), so both pay the same imports and do the same work from nothing; wall time of the
subprocess. Pass (BENCHMARKS.md): Dagster adds <= 10%.

O1: the same `tunegraph materialize` again in the Dagster run's TUNEGRAPH_HOME, nothing changed:
wall time of the subprocess, and from its summary table that every asset with a cache flag
reports a cache hit (so no training step ran). Pass: < 5 s wall, no training step.

Writes benchmarks/results/O1.json and O2.json (the shared results format).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import write_results  # noqa: E402

RECIPE = REPO / "examples" / "quickstart.yaml"


def direct(recipe_path: str, out_dir: str) -> None:
    """The quickstart's stages in the asset graph's order, without Dagster (in a subprocess)."""
    sys.path.insert(0, str(REPO))
    from tunegraph.config import base_model_slug, load_recipe
    from tunegraph.ops.artifacts import ArtifactStore
    from tunegraph.ops.checkpoints import list_checkpoints
    from tunegraph.ops.report import report_stage
    from tunegraph.ops.stages import (
        base_model_stage,
        eval_stage,
        merge_stage,
        tokenized_stage,
        train_stage,
    )

    recipe = load_recipe(recipe_path, {"output_dir": out_dir})
    store = ArtifactStore(Path(os.environ["TUNEGRAPH_HOME"]) / "artifacts")
    base = base_model_stage(recipe, store, base_model_slug(recipe)).artifact
    tokenized = tokenized_stage(recipe, store, base).artifact
    trained = train_stage(recipe, store, base, tokenized).artifact
    if recipe.is_lora:
        merge_stage(recipe, store, base, trained, tokenized)
    evals = {checkpoint.partition: eval_stage(recipe, store, base, tokenized, checkpoint).artifact
             for checkpoint in list_checkpoints(trained, recipe.name)}
    report_stage(store, recipe.name, evals)
    print(f"direct: {len(evals)} checkpoints evaluated: {sorted(evals)}")


def _timed(command: list[str], home: Path, log: Path) -> tuple[float, str]:
    env = {**os.environ, "TUNEGRAPH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({result.returncode}); see {log}\n"
                         f"{(result.stdout + result.stderr)[-2000:]}")
    return seconds, result.stdout


def cache_flags(summary: str) -> dict[str, str]:
    """asset -> its `cached` column from `tunegraph materialize`'s summary table."""
    flags, in_table = {}, False
    for line in summary.splitlines():
        if line.startswith("asset") and "cached" in line:
            in_table = True
            continue
        parts = line.split()
        if in_table and len(parts) >= 2 and "/" in parts[0] and parts[1] in ("True", "False", "-"):
            flags[parts[0]] = parts[1]
    return flags


def _row(workload: str, provider: str, seconds: float, **extra: Any) -> dict[str, Any]:
    ms = round(seconds * 1000, 1)
    return {"workload": workload, "provider": provider, "median_ms": ms, "p10_ms": ms,
            "p90_ms": ms, "peak_mem_mb": 0.0, "throughput": round(1 / seconds, 4),
            "unit": "runs/s", **extra}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_direct":
        direct(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--work", type=Path, default=Path("/tmp/o_orchestration"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    tunegraph = [sys.executable, "-m", "tunegraph.cli"]
    recipe = str(args.recipe.resolve())
    dagster_home, direct_home = args.work / "dagster", args.work / "direct"
    materialize = [*tunegraph, "materialize", recipe, f"--output-dir={dagster_home / 'out'}"]

    dagster_s, _ = _timed(materialize, dagster_home, args.work / "dagster.log")
    direct_s, direct_out = _timed([sys.executable, __file__, "_direct", recipe,
                                   str(direct_home / "out")], direct_home, args.work / "direct.log")
    again_s, again_out = _timed(materialize, dagster_home, args.work / "again.log")
    flags = cache_flags(again_out)
    not_cached = sorted(name for name, flag in flags.items() if flag == "False")
    extra = dagster_s / direct_s - 1
    print(f"O2: Dagster {dagster_s:.1f} s, direct {direct_s:.1f} s: +{extra:.1%} "
          f"(pass <= 10%) [{direct_out.strip()}]")
    print(f"O1: again, nothing changed: {again_s:.1f} s (pass < 5 s); cache flags {flags}; "
          f"not cached: {not_cached or 'none'}")

    device = f"CPU: {os.cpu_count()} cores (this workplace's machine)"
    command = "python " + shlex.join([str(Path(sys.argv[0]))] + sys.argv[1:])
    write_results(args.results / "O2.json", bench_id="O2", device=device, command=command,
                  rows=[_row("quickstart, every asset, from nothing", "direct ops", direct_s),
                        _row("quickstart, every asset, from nothing", "tunegraph", dagster_s)],
                  summary={"best_peer": "direct ops",
                           "speedup_vs_best_peer": round(direct_s / dagster_s, 3),
                           "mem_ratio_vs_best_peer": None},
                  extra_wall_fraction=round(extra, 4), passes=extra <= 0.10)
    write_results(args.results / "O1.json", bench_id="O1", device=device, command=command,
                  rows=[_row("quickstart re-materialized, nothing changed", "tunegraph", again_s,
                             cache_flags=flags)],
                  summary={"best_peer": None, "speedup_vs_best_peer": None,
                           "mem_ratio_vs_best_peer": None},
                  training_ran=bool(not_cached), passes=again_s < 5 and not not_cached)


if __name__ == "__main__":
    main()
