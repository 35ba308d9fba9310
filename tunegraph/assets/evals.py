"""`<recipe>/eval_scores`: held-out loss, perplexity and exact-match, base vs trained."""


from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, asset

from tunegraph.assets.common import (
    base_model_key,
    json_md,
    progress_logger,
    recipe_key,
    stage_output,
    trained_key,
)
from tunegraph.config import Recipe
from tunegraph.config.schema import EvalConcern
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.evaluate import EVAL_CODE_VERSION
from tunegraph.ops.hashing import hash_json, short
from tunegraph.ops.stages import eval_stage
from tunegraph.resources import ArtifactStoreResource


def _table(scores: dict) -> str:
    names = [k for k in ("heldout_loss", "perplexity", "exact_match") if k in scores["base"]]
    rows = [f"| {n} | {scores['base'][n]:.4f} | {scores['trained'][n]:.4f} |" for n in names]
    return "| metric | base | trained |\n|---|---|---|\n" + "\n".join(rows)


def eval_asset(recipe: Recipe) -> AssetsDefinition:
    model_key = recipe_key(recipe, "merged_model") if recipe.is_lora else trained_key(recipe)
    code_version = short(hash_json([EVAL_CODE_VERSION, recipe.concern_values(EvalConcern)]))

    @asset(key=recipe_key(recipe, "eval_scores"), group_name=recipe.name, pool="gpu",
           ins={"base_model": AssetIn(key=base_model_key(recipe)),
                "tokenized_dataset": AssetIn(key=recipe_key(recipe, "tokenized_dataset")),
                "trained_model": AssetIn(key=model_key)},
           code_version=code_version, kinds={"pytorch"},
           description="Held-out loss/perplexity (and exact-match where rows have answers), "
                       "base vs trained.")
    def _evals(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
               base_model: Artifact, tokenized_dataset: Artifact, trained_model: Artifact):
        result = eval_stage(recipe, artifact_store.store(), base_model, tokenized_dataset,
                            trained_model, progress_logger(context))
        scores = result.metadata
        flat = {f"{who}/{name}": value for who in ("base", "trained")
                for name, value in scores[who].items() if isinstance(value, (int, float))}
        return stage_output(result, {**flat, "heldout_loss_delta": scores["heldout_loss_delta"],
                                     "scores": MetadataValue.md(_table(scores)),
                                     "samples": json_md(scores["trained"].get("samples", []))})

    return _evals
