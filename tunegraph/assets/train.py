"""`<recipe>/adapter` (LoRA) or `<recipe>/model` (full fine-tune): the training run."""


from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, asset

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
from tunegraph.ops.stages import export, train_stage, training_key_values
from tunegraph.ops.train import TRAIN_CODE_VERSION
from tunegraph.resources import ArtifactStoreResource


def train_asset(recipe: Recipe) -> AssetsDefinition:
    code_version = short(hash_json([TRAIN_CODE_VERSION, training_key_values(recipe)]))
    what = "LoRA adapter" if recipe.is_lora else "fully fine-tuned model"

    @asset(key=trained_key(recipe), group_name=recipe.name, pool="gpu",
           ins={"base_model": AssetIn(key=base_model_key(recipe)),
                "tokenized_dataset": AssetIn(key=recipe_key(recipe, "tokenized_dataset"))},
           code_version=code_version, kinds={"pytorch"}, description=f"The {what}.")
    def _train(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
               base_model: Artifact, tokenized_dataset: Artifact):
        result = train_stage(recipe, artifact_store.store(), base_model, tokenized_dataset,
                             progress_logger(context))
        exported = export(recipe, result.artifact)
        metrics = result.metadata
        losses = metrics.get("losses", [])
        return stage_output(result, {
            "num_steps": metrics.get("num_steps"),
            "first_loss": metrics.get("first_loss"),
            "last_loss": metrics.get("last_loss"),
            "trainable_parameters": metrics.get("trainable_parameters"),
            "loss_curve": MetadataValue.md("| step | loss |\n|---|---|\n" + "\n".join(
                f"| {step} | {loss:.4f} |" for step, loss in losses)),
            "exported_to": MetadataValue.path(str(exported)),
        })

    return _train
