"""`<recipe>/merged_model`: the LoRA adapter merged into the base weights (PEFT merge_and_unload)."""


from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, asset

from tunegraph.assets.common import base_model_key, recipe_key, stage_output, trained_key
from tunegraph.config import Recipe
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.merge import MERGE_CODE_VERSION
from tunegraph.ops.stages import export, merge_stage
from tunegraph.resources import ArtifactStoreResource


def merged_asset(recipe: Recipe) -> AssetsDefinition:
    @asset(key=recipe_key(recipe, "merged_model"), group_name=recipe.name, pool="gpu",
           ins={"base_model": AssetIn(key=base_model_key(recipe)),
                "adapter": AssetIn(key=trained_key(recipe)),
                "tokenized_dataset": AssetIn(key=recipe_key(recipe, "tokenized_dataset"))},
           code_version=MERGE_CODE_VERSION, kinds={"pytorch"},
           description="Base model with the LoRA adapter merged in.")
    def _merged(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
                base_model: Artifact, adapter: Artifact, tokenized_dataset: Artifact):
        result = merge_stage(recipe, artifact_store.store(), base_model, adapter,
                             tokenized_dataset)
        exported = export(recipe, result.artifact, "merged")
        context.log.info(f"merged model exported to {exported}")
        return stage_output(result, dict(result.metadata))

    return _merged
