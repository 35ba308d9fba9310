"""`<recipe>/adapter` (LoRA) or `<recipe>/model` (full fine-tune): the training run.

The step also registers the run's checkpoints as `<recipe>/checkpoints` partitions
(tunegraph.assets.checkpoints). It retries under a RetryPolicy; a retry resumes from the last
checkpoint the failed attempt saved (the train stage keeps them in a folder named by its key).
"""


from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Backoff,
    Failure,
    MetadataValue,
    RetryPolicy,
    asset,
)

from tunegraph.assets.checkpoints import register_checkpoints
from tunegraph.assets.common import (
    base_model_key,
    progress_logger,
    recipe_key,
    stage_output,
    trained_key,
)
from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.hashing import hash_json, short
from tunegraph.ops.launch import LaunchError
from tunegraph.ops.stages import export, train_stage, training_key_values
from tunegraph.ops.train import TRAIN_CODE_VERSION, LossWatchdogError
from tunegraph.resources import ArtifactStoreResource, LauncherResource

# For what goes away on its own: a preempted node, a lost GPU, a killed process. Mistakes in the
# recipe or data (ValueError) and a tripped loss watchdog would fail the same way again, so they
# bypass it (Failure(allow_retries=False)).
TRAIN_RETRY_POLICY = RetryPolicy(max_retries=2, delay=30, backoff=Backoff.EXPONENTIAL)


def train_asset(recipe: Recipe, retry_policy: RetryPolicy = TRAIN_RETRY_POLICY) -> AssetsDefinition:
    code_version = short(hash_json([TRAIN_CODE_VERSION, training_key_values(recipe)]))
    what = "LoRA adapter" if recipe.is_lora else "fully fine-tuned model"

    @asset(key=trained_key(recipe), group_name=recipe.name, pool="gpu",
           ins={"base_model": AssetIn(key=base_model_key(recipe)),
                "tokenized_dataset": AssetIn(key=recipe_key(recipe, "tokenized_dataset"))},
           code_version=code_version, kinds={"pytorch"}, retry_policy=retry_policy,
           description=f"The {what}; its checkpoints become `{recipe.name}/checkpoints` "
                       f"partitions.")
    def _train(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
               launcher: LauncherResource, base_model: Artifact, tokenized_dataset: Artifact):
        if context.retry_number:
            context.log.info(f"attempt {context.retry_number + 1}: resuming from the last "
                             f"checkpoint the failed attempt saved, if any")
        try:
            result = train_stage(recipe, artifact_store.store(), base_model, tokenized_dataset,
                                 progress_logger(context), launcher.for_asset(context))
        except (ValueError, LossWatchdogError) as exc:
            raise Failure(str(exc), allow_retries=False) from exc
        except LaunchError as exc:
            # A rank's recipe or data mistake fails the same way again; a killed rank may not.
            retry = exc.exception_type not in ("ValueError", "LossWatchdogError")
            raise Failure(str(exc), allow_retries=retry) from exc
        checkpoints = register_checkpoints(context, recipe, result.artifact)
        exported = export(recipe, result.artifact)
        metrics = result.metadata
        losses = metrics.get("losses", [])
        return stage_output(result, {
            "num_steps": metrics.get("num_steps"),
            "first_loss": metrics.get("first_loss"),
            "last_loss": metrics.get("last_loss"),
            "resumed_from_step": metrics.get("resumed_from_step"),
            "trainable_parameters": metrics.get("trainable_parameters"),
            "world_size": metrics.get("world_size", 1),  # processes that trained it
            "loss_curve": MetadataValue.md("| step | loss |\n|---|---|\n" + "\n".join(
                f"| {step} | {loss:.4f} |" for step, loss in losses)),
            "checkpoints": MetadataValue.md("\n".join(f"- `{c.partition}` (step {c.step})"
                                                      for c in checkpoints)),
            "exported_to": MetadataValue.path(str(exported)),
        })

    return _train
