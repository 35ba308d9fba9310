"""`<recipe>/eval_scores`, one partition per checkpoint: held-out loss, perplexity and
exact-match of the base model vs that checkpoint, as the partition's metadata.

Partitioned like `<recipe>/checkpoints`, so a user backfills evals across checkpoints from the
UI or with `tunegraph backfill-evals RECIPE`. The eval's content key includes the checkpoint's
identity (train key, step), so each checkpoint's scores are cached on their own. The code version
hashes the eval settings only: a new eval setting makes eval_scores stale and nothing upstream.
"""


from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    asset,
)

from tunegraph.assets.checkpoints import checkpoint_partitions, checkpoints_key
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
from tunegraph.ops.checkpoints import find_checkpoint
from tunegraph.ops.evaluate import EVAL_CODE_VERSION, flat_scores
from tunegraph.ops.hashing import hash_json, short
from tunegraph.ops.stages import eval_stage
from tunegraph.resources import ArtifactStoreResource


def _table(scores: dict) -> str:
    names = [k for k in ("heldout_loss", "perplexity", "exact_match") if k in scores["base"]]
    rows = [f"| {n} | {scores['base'][n]:.4f} | {scores['trained'][n]:.4f} |" for n in names]
    return "| metric | base | trained |\n|---|---|---|\n" + "\n".join(rows)


def eval_code_version(recipe: Recipe) -> str:
    return short(hash_json([EVAL_CODE_VERSION, recipe.concern_values(EvalConcern)]))


def eval_asset(recipe: Recipe) -> AssetsDefinition:
    @asset(key=recipe_key(recipe, "eval_scores"), group_name=recipe.name, pool="gpu",
           partitions_def=checkpoint_partitions(recipe),
           ins={"base_model": AssetIn(key=base_model_key(recipe)),
                "tokenized_dataset": AssetIn(key=recipe_key(recipe, "tokenized_dataset")),
                "trained": AssetIn(key=trained_key(recipe))},
           deps=[AssetDep(checkpoints_key(recipe))],
           code_version=eval_code_version(recipe), kinds={"pytorch"},
           description="Per checkpoint: held-out loss/perplexity (and exact-match where rows "
                       "have answers), base vs that checkpoint.")
    def _evals(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
               base_model: Artifact, tokenized_dataset: Artifact, trained: Artifact):
        # The training artifact holds every checkpoint; the partition says which one to score.
        checkpoint = find_checkpoint(trained, recipe.name, context.partition_key)
        result = eval_stage(recipe, artifact_store.store(), base_model, tokenized_dataset,
                            checkpoint, progress_logger(context))
        scores = result.metadata
        # Every number, eval_tasks and lm_eval results too: "trained/tasks/colors/score".
        flat = flat_scores(scores)
        return stage_output(result, {
            **flat, "heldout_loss_delta": scores["heldout_loss_delta"],
            "step": checkpoint.step, "final": checkpoint.final,
            "train_loss_at_step": checkpoint.loss, "checkpoint_key": checkpoint.key,
            "scores": MetadataValue.md(_table(scores)),
            "samples": json_md(scores["trained"].get("samples", []))})

    return _evals
