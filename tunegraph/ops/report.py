"""Eval reports: score vs training step, as a table (markdown) and a plot (PNG, matplotlib).

    report_stage(store, "quickstart", {"quickstart__step-000050": eval_artifact, ...})
    combined_report_stage(store, {"quickstart": report_artifact, "chat": report_artifact})

A recipe's report has one row per evaluated checkpoint, plus the base model as step 0 (what
training starts from: a fresh LoRA adapter adds zero), and every numeric score the eval wrote
(held-out loss, perplexity, exact-match, and whatever eval suites add), flattened to
`name` or `suite/name`. The report across recipes draws each recipe's curve on shared axes. Both
are content-addressed artifacts (`reports/<key>`: report.json, report.md, score_vs_step.png):
the same evals give the same report without drawing it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunegraph.ops.artifacts import Artifact, ArtifactStore
from tunegraph.ops.hashing import hash_json, short
from tunegraph.ops.stages import StageResult

REPORT_CODE_VERSION = "1"
PLOT = "score_vs_step.png"
# Shown first, in this order; other scores follow by name. Counts (num_*) are not scores.
LEADING = ("heldout_loss", "perplexity", "exact_match")
MAX_PLOTTED_SCORES = 6  # one panel each; more would be unreadable at UI width


def numeric_scores(scores: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in a model's scores, nested names joined with '/', counts left out."""
    flat: dict[str, float] = {}
    for name, value in scores.items():
        if isinstance(value, Mapping):
            flat.update(numeric_scores(value, f"{prefix}{name}/"))
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and not name.startswith("num_")):
            flat[f"{prefix}{name}"] = float(value)
    return flat


def score_names(rows: list[dict[str, Any]]) -> list[str]:
    names = {n for row in rows for n in row["scores"]}
    return [n for n in LEADING if n in names] + sorted(names - set(LEADING))


def report_rows(evals: Mapping[str, Artifact]) -> list[dict[str, Any]]:
    """{partition: eval artifact} -> rows by step: the base model (step 0), then each checkpoint."""
    rows, base = [], None
    for partition, artifact in evals.items():
        scores = json.loads((artifact.path / "scores.json").read_text())
        checkpoint = artifact.manifest["checkpoint"]
        rows.append({"checkpoint": partition, "step": checkpoint["step"],
                     "final": checkpoint["final"], "train_loss": checkpoint["loss"],
                     "eval_key": artifact.key, "scores": numeric_scores(scores["trained"])})
        base = base or numeric_scores(scores["base"])
    rows.sort(key=lambda r: (r["step"], r["final"]))
    if base is not None:
        rows.insert(0, {"checkpoint": "base model", "step": 0, "final": False, "train_loss": None,
                        "eval_key": None, "scores": base})
    return rows


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = score_names(rows)
    header = ["step", "checkpoint", "train_loss", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["step"]), row["checkpoint"], _cell(row["train_loss"]),
                 *(_cell(row["scores"].get(n)) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scores(curves: Mapping[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """One panel per score, one line per curve (recipe), score against training step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    names = score_names([r for rows in curves.values() for r in rows])[:MAX_PLOTTED_SCORES]
    if not names:
        raise ValueError(f"{title}: the evals hold no numeric scores to plot")
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for label, rows in curves.items():
            points = [(r["step"], r["scores"][name]) for r in rows if name in r["scores"]]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
        if name == "heldout_loss" and len(curves) == 1:
            rows = next(iter(curves.values()))
            trained = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
            if trained:
                axis.plot(*zip(*trained, strict=True), linestyle="--", label="train loss")
        axis.set_title(name)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)
    return path


def _store_report(store: ArtifactStore, inputs: dict[str, Any], title: str,
                  curves: Mapping[str, list[dict[str, Any]]], table: str) -> StageResult:
    key = short(hash_json(inputs))
    if found := store.get("reports", key):
        return StageResult(found, True, json.loads((found.path / "report.json").read_text()))
    report = {"title": title, "curves": dict(curves), "table": table}
    with store.write("reports", key, {"inputs": inputs}) as out:
        plot_scores(curves, out / PLOT, title)
        (out / "report.md").write_text(f"# {title}\n\n{table}\n\n![score vs step]({PLOT})\n")
        (out / "report.json").write_text(json.dumps(report, indent=2))
    artifact = store.get("reports", key)
    assert artifact is not None
    return StageResult(artifact, False, report)


def report_stage(store: ArtifactStore, recipe_name: str,
                 evals: Mapping[str, Artifact]) -> StageResult:
    """A recipe's report over its evaluated checkpoints ({partition: eval artifact})."""
    if not evals:
        raise ValueError(f"eval_report: no checkpoint of recipe {recipe_name} has eval scores "
                         f"yet; run `tunegraph backfill-evals` on the recipe first")
    rows = report_rows(evals)
    inputs = {"recipe": recipe_name, "evals": sorted((p, a.key) for p, a in evals.items()),
              "code": REPORT_CODE_VERSION}
    return _store_report(store, inputs, f"{recipe_name}: scores vs training step",
                         {recipe_name: rows}, markdown_table(rows))


def combined_report_stage(store: ArtifactStore, reports: Mapping[str, Artifact]) -> StageResult:
    """Every recipe's curve on shared axes; the table has each recipe's rows, recipe first."""
    curves = {name: json.loads((a.path / "report.json").read_text())["curves"][name]
              for name, a in sorted(reports.items())}
    rows = [{**row, "checkpoint": f"{name}: {row['checkpoint']}"}
            for name, recipe_rows in curves.items() for row in recipe_rows]
    inputs = {"reports": sorted((name, a.key) for name, a in reports.items()),
              "code": REPORT_CODE_VERSION}
    return _store_report(store, inputs, "all recipes: scores vs training step", curves,
                         markdown_table(rows))
