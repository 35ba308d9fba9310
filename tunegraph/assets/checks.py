"""Asset checks that gate quality; each reads the artifact its asset produced.

| asset             | check                        | blocking | fails when                                   |
|-------------------|------------------------------|----------|----------------------------------------------|
| tokenized_dataset | usable_tokens                | yes      | no training row or trained token; trainable  |
|                   |                              |          | share <= check_min_trainable_share; truncated|
|                   |                              |          | row share > check_max_truncated_share        |
| adapter / model   | loss_finite_and_decreasing   | yes      | a logged loss or gradient norm is NaN/inf;   |
|                   |                              |          | (check_loss_decrease) loss did not go down   |
| merged_model      | logits_match_unmerged        | yes      | max abs logit difference, merged vs base +   |
|                   |                              |          | adapter > check_max_merge_logit_diff         |
| eval_scores       | no_regression_vs_base        | no: WARN | trained held-out loss > base + check_max_    |
|                   |                              |          | heldout_loss_increase, or exact-match lower  |

A blocking check that fails stops the assets downstream of its asset in the same run (Dagster
skips them) and fails the run, so a broken tokenization never trains and `tunegraph materialize`
launches no eval runs after a failed gate. eval_scores' check runs per checkpoint partition. Because
stages are cached by content, the next run finds the same artifact and the same failure: it stays
blocked until the inputs or the threshold (a recipe key no stage hashes) change.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    AssetsDefinition,
    PartitionsDefinition,
    asset_check,
)

from tunegraph.assets.common import recipe_key, trained_key
from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact

CheckFn = Callable[[Recipe, Artifact], AssetCheckResult]
# Checks with a partitions_def are "preview" in Dagster 1.13; they are how a check of
# eval_scores runs per checkpoint partition, in the same run as the partition it checks.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec",
                        category=Warning)


def _read(artifact: Artifact, name: str) -> dict[str, Any]:
    path = artifact.path / name
    if not path.is_file():
        raise ValueError(f"{artifact.kind}/{artifact.key}: {name} is missing from the artifact "
                         f"({artifact.path}); materialize the asset again")
    return json.loads(path.read_text())


def _result(problems: list[str], metadata: dict[str, Any],
            severity: AssetCheckSeverity = AssetCheckSeverity.ERROR) -> AssetCheckResult:
    return AssetCheckResult(passed=not problems, severity=severity, metadata=metadata,
                            description="; ".join(problems) if problems else "passed")


def usable_tokens(recipe: Recipe, artifact: Artifact) -> AssetCheckResult:
    stats = _read(artifact, "stats.json")
    rows_read = stats["num_rows"] + stats.get("num_dropped_no_trainable", 0)
    truncated_share = stats["num_truncated"] / rows_read if rows_read else 0.0
    problems = []
    if stats.get("num_train_rows", stats["num_rows"]) == 0 or stats["num_trainable_tokens"] == 0:
        problems.append("no training row with a trained token")
    if stats["trainable_share"] <= recipe.check_min_trainable_share:
        problems.append(f"trainable share {stats['trainable_share']:.4f} <= "
                        f"check_min_trainable_share {recipe.check_min_trainable_share}")
    if truncated_share > recipe.check_max_truncated_share:
        problems.append(f"{truncated_share:.1%} of rows truncated at sequence_len "
                        f"{recipe.sequence_len} > check_max_truncated_share "
                        f"{recipe.check_max_truncated_share}: raise sequence_len or the threshold")
    return _result(problems, {"num_rows": stats["num_rows"],
                              "num_trainable_tokens": stats["num_trainable_tokens"],
                              "trainable_share": stats["trainable_share"],
                              "truncated_share": truncated_share,
                              "num_dropped_no_trainable": stats.get("num_dropped_no_trainable", 0)})


def loss_finite_and_decreasing(recipe: Recipe, artifact: Artifact) -> AssetCheckResult:
    metrics = _read(artifact, "metrics.json")
    losses = [float(loss) for _, loss in metrics.get("losses", [])]
    problems = []
    bad = [step for step, loss in metrics.get("losses", []) if not math.isfinite(float(loss))]
    # transformers logs a NaN step's loss as the running mean (logging_nan_inf_filter), which
    # reads 0.0 once the weights are NaN (measured: learning_rate 100 logs 6.05, 6.08, 6.01, 0.0,
    # 0.0, ...); the gradient norm of such a step is NaN, so log.json's history shows it.
    history = _read(artifact, "log.json").get("history", []) if (
        artifact.path / "log.json").is_file() else []
    bad += [entry["step"] for entry in history if entry.get("grad_norm") is not None
            and not math.isfinite(float(entry["grad_norm"])) and entry["step"] not in bad]
    if not losses:
        problems.append("no training loss was logged")
    if bad:
        problems.append(f"non-finite loss or gradient norm at step(s) "
                        f"{', '.join(map(str, sorted(bad)[:10]))}")
    # Single steps are noisy (one batch each): compare the means of the first and last tenth.
    window = max(1, len(losses) // 10)
    first = sum(losses[:window]) / window if losses else float("nan")
    last = sum(losses[-window:]) / window if losses else float("nan")
    if recipe.check_loss_decrease and losses and not bad:
        if len(losses) < 2:
            problems.append("one logged loss cannot show a decrease: log more steps, or set "
                            "check_loss_decrease: false")
        elif not last < first:
            problems.append(f"loss did not go down: mean of the last {window} logged step(s) "
                            f"{last:.4f} >= first {window} {first:.4f}")
    return _result(problems, {"num_logged_losses": len(losses), "first_window_loss": first,
                              "last_window_loss": last, "window": window})


def logits_match_unmerged(recipe: Recipe, artifact: Artifact) -> AssetCheckResult:
    diff = float(_read(artifact, "checks.json")["max_logit_diff_vs_unmerged"])
    problems = []
    if not diff <= recipe.check_max_merge_logit_diff:  # `not <=` also catches NaN
        problems.append(f"merged logits differ from base+adapter by {diff:.3g} > "
                        f"check_max_merge_logit_diff {recipe.check_max_merge_logit_diff:g}")
    return _result(problems, {"max_logit_diff_vs_unmerged": diff,
                              "tolerance": recipe.check_max_merge_logit_diff})


def no_regression_vs_base(recipe: Recipe, artifact: Artifact) -> AssetCheckResult:
    scores = _read(artifact, "scores.json")
    base, trained = scores["base"], scores["trained"]
    allowed = recipe.check_max_heldout_loss_increase
    problems = []
    if not trained["heldout_loss"] <= base["heldout_loss"] + allowed:
        problems.append(f"held-out loss {trained['heldout_loss']:.4f} > base "
                        f"{base['heldout_loss']:.4f} + check_max_heldout_loss_increase {allowed}")
    if "exact_match" in trained and trained["exact_match"] < base["exact_match"]:
        problems.append(f"exact-match {trained['exact_match']:.4f} < base "
                        f"{base['exact_match']:.4f}")
    metadata = {f"{who}/{name}": scores[who][name] for who in ("base", "trained")
                for name in ("heldout_loss", "exact_match") if name in scores[who]}
    return _result(problems, metadata, AssetCheckSeverity.WARN)


@dataclass(frozen=True)
class CheckSpec:
    asset: str                 # the asset's last key part; "trained" is the adapter or model
    fn: CheckFn
    blocking: bool
    keys: tuple[str, ...]      # the recipe keys (thresholds) it reads
    description: str


SPECS = (
    CheckSpec("tokenized_dataset", usable_tokens, True,
              ("check_min_trainable_share", "check_max_truncated_share"),
              "Rows remain, some tokens are trained, few rows were cut at sequence_len."),
    CheckSpec("trained", loss_finite_and_decreasing, True, ("check_loss_decrease",),
              "Every logged training loss and gradient norm is finite, and the loss went down."),
    CheckSpec("merged_model", logits_match_unmerged, True, ("check_max_merge_logit_diff",),
              "The merged model's logits equal base+adapter's."),
    CheckSpec("eval_scores", no_regression_vs_base, False, ("check_max_heldout_loss_increase",),
              "The trained model scores no worse than the base model (a warning, not a gate)."),
)
# Metadata entry holding the thresholds a check ran with: schedules re-run a failed gate whose
# thresholds changed since (tunegraph.pipelines.schedules).
THRESHOLDS = "thresholds"


def spec_asset_key(recipe: Recipe, spec: CheckSpec) -> AssetKey:
    return trained_key(recipe) if spec.asset == "trained" else recipe_key(recipe, spec.asset)


def thresholds(recipe: Recipe, spec: CheckSpec) -> str:
    return json.dumps({key: getattr(recipe, key) for key in spec.keys}, sort_keys=True)


def gates(recipe: Recipe) -> dict[AssetKey, tuple[AssetCheckKey, str]]:
    """{asset key: (its blocking check's key, the thresholds it would run with now)}."""
    return {spec_asset_key(recipe, spec): (AssetCheckKey(spec_asset_key(recipe, spec),
                                                         spec.fn.__name__),
                                           thresholds(recipe, spec))
            for spec in SPECS if spec.blocking}


def _check(recipe: Recipe, spec: CheckSpec, partitions_def: PartitionsDefinition | None
           ) -> AssetChecksDefinition:
    @asset_check(asset=spec_asset_key(recipe, spec), name=spec.fn.__name__,
                 blocking=spec.blocking, description=spec.description,
                 partitions_def=partitions_def)
    def _run(artifact: Artifact) -> AssetCheckResult:
        result = spec.fn(recipe, artifact)
        return AssetCheckResult(passed=result.passed, severity=result.severity,
                                description=result.description,
                                metadata={**result.metadata, THRESHOLDS: thresholds(recipe, spec)})

    return _run


def recipe_checks(recipe: Recipe, assets: Sequence[AssetsDefinition]
                  ) -> list[AssetChecksDefinition]:
    """The checks of the recipe's assets (`recipe_assets(recipe)`), each partitioned as its asset
    is (eval_scores per checkpoint: the check runs per partition)."""
    by_key = {key: definition for definition in assets for key in definition.keys}
    return [_check(recipe, spec, by_key[spec_asset_key(recipe, spec)].partitions_def)
            for spec in SPECS if spec_asset_key(recipe, spec) in by_key]
