"""`base_models/<slug>`: the base model, one asset per distinct model, shared across recipes."""


from dagster import AssetExecutionContext, AssetsDefinition, asset

from tunegraph.assets.common import BASE_MODELS_GROUP, base_model_key, progress_logger, stage_output
from tunegraph.assets.raw_data import raw_data_key
from tunegraph.config import TINY_LLAMA, Recipe, base_model_slug
from tunegraph.ops.stages import BASE_MODEL_CODE_VERSION, base_model_stage
from tunegraph.resources import ArtifactStoreResource


def base_model_asset(recipe: Recipe) -> AssetsDefinition:
    slug = base_model_slug(recipe)
    origin = "built locally (random weights, tokenizer trained on the recipe's data)" \
        if recipe.base_model == TINY_LLAMA else "from_pretrained"

    @asset(key=base_model_key(recipe), group_name=BASE_MODELS_GROUP,
           code_version=BASE_MODEL_CODE_VERSION, kinds={"pytorch"},
           # The tiny model's tokenizer learns from the data: new data, new base model.
           deps=[raw_data_key(recipe)] if recipe.base_model == TINY_LLAMA else [],
           description=f"Base model {recipe.base_model}, {origin}.")
    def _base_model(context: AssetExecutionContext, artifact_store: ArtifactStoreResource):
        result = base_model_stage(recipe, artifact_store.store(), slug, progress_logger(context))
        return stage_output(result, {"base_model": recipe.base_model})

    return _base_model
