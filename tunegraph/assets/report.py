"""`<recipe>/eval_report` and `reports/eval_report`: scores vs training step, a plot and a table.

The recipe's report reads every evaluated partition of its eval_scores (checkpoints not
evaluated yet are listed, not guessed); the report across recipes reads each recipe's report.
The plot is a PNG in the artifact store, shown inline in the UI as a markdown image (a data URI:
the UI renders markdown metadata, and no file server is needed).
"""


import base64

from dagster import AssetExecutionContext, AssetIn, AssetKey, AssetsDefinition, MetadataValue, asset

from tunegraph.assets.common import recipe_key, stage_output, trained_key
from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.report import PLOT, REPORT_CODE_VERSION, combined_report_stage, report_stage
from tunegraph.resources import ArtifactStoreResource

REPORTS_GROUP = "reports"
COMBINED_REPORT_KEY = AssetKey([REPORTS_GROUP, "eval_report"])
INPUT_SUFFIX = "__report"


def _plot_md(artifact: Artifact, title: str) -> MetadataValue:
    png = base64.b64encode((artifact.path / PLOT).read_bytes()).decode()
    return MetadataValue.md(f"![{title}](data:image/png;base64,{png})")


def _report_metadata(context: AssetExecutionContext, result, title: str) -> dict:
    context.log.info(f"report: {result.artifact.path / 'report.md'}")
    return {"plot": _plot_md(result.artifact, title),
            "table": MetadataValue.md(result.metadata["table"]),
            "plot_file": MetadataValue.path(str(result.artifact.path / PLOT))}


def eval_report_asset(recipe: Recipe) -> AssetsDefinition:
    @asset(key=recipe_key(recipe, "eval_report"), group_name=recipe.name,
           ins={"eval_scores": AssetIn(key=recipe_key(recipe, "eval_scores")),
                "trained": AssetIn(key=trained_key(recipe))},
           code_version=REPORT_CODE_VERSION, kinds={"matplotlib"},
           description="Scores vs training step over the evaluated checkpoints: plot and table.")
    def _report(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
                eval_scores: dict[str, Artifact], trained: Artifact):
        # Only evals of the current training: after a retrain, a partition's last eval may
        # still be of the previous run's checkpoint until it is evaluated again.
        current = {p: a for p, a in eval_scores.items()
                   if a.manifest["checkpoint"]["train_key"] == trained.key}
        wanted = context.asset_partition_keys_for_input("eval_scores")
        missing = [p for p in wanted if p not in current]
        if missing:
            context.log.warning(f"not evaluated for the current training yet, left out: "
                                f"{', '.join(missing)}")
        result = report_stage(artifact_store.store(), recipe.name, current)
        curve = result.metadata["curves"][recipe.name]
        return stage_output(result, {
            **_report_metadata(context, result, f"{recipe.name} scores vs step"),
            "num_checkpoints_evaluated": len(current),
            "not_evaluated": MetadataValue.md(", ".join(f"`{p}`" for p in missing) or "none"),
            "final_heldout_loss": next((r["scores"].get("heldout_loss") for r in reversed(curve)
                                        if r["final"]), None)})

    return _report


def combined_report_asset(recipes: list[Recipe]) -> AssetsDefinition:
    """One report across the recipes (those with eval_scores)."""
    # Input names get a suffix: a recipe may be called `context` or `artifact_store`.
    ins = {f"{recipe.name}{INPUT_SUFFIX}": AssetIn(key=recipe_key(recipe, "eval_report"))
           for recipe in recipes}

    @asset(key=COMBINED_REPORT_KEY, group_name=REPORTS_GROUP, ins=ins,
           code_version=REPORT_CODE_VERSION, kinds={"matplotlib"},
           description="Every recipe's scores vs training step on shared axes.")
    def _combined(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
                  **reports: Artifact):
        by_recipe = {name.removesuffix(INPUT_SUFFIX): a for name, a in reports.items()}
        result = combined_report_stage(artifact_store.store(), by_recipe)
        return stage_output(result, {**_report_metadata(context, result, "all recipes"),
                                     "recipes": MetadataValue.md(", ".join(sorted(by_recipe)))})

    return _combined
