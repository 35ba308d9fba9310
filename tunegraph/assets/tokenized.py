"""`<recipe>/tokenized_dataset`: rows → input_ids and labels, split into train and validation."""


import json

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, asset

from tunegraph.assets.common import base_model_key, progress_logger, recipe_key, stage_output
from tunegraph.config import Recipe
from tunegraph.config.schema import DataConcern, TokenizerConcern
from tunegraph.ops.artifacts import Artifact
from tunegraph.ops.hashing import hash_json, short
from tunegraph.ops.stages import tokenized_stage
from tunegraph.ops.tokenize import TOKENIZE_CODE_VERSION
from tunegraph.resources import ArtifactStoreResource


def tokenized_asset(recipe: Recipe) -> AssetsDefinition:
    code_version = short(hash_json([TOKENIZE_CODE_VERSION,
                                    recipe.concern_values(DataConcern, TokenizerConcern)]))

    @asset(key=recipe_key(recipe, "tokenized_dataset"), group_name=recipe.name,
           ins={"base_model": AssetIn(key=base_model_key(recipe))}, code_version=code_version,
           kinds={"parquet"}, description="Tokenized training and held-out rows with label masks.")
    def _tokenized(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
                   base_model: Artifact):
        result = tokenized_stage(recipe, artifact_store.store(), base_model,
                                 progress_logger(context))
        samples_file = result.artifact.path / "samples.json"
        samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
        return stage_output(result, {
            **{k: v for k, v in result.metadata.items() if isinstance(v, (int, float))},
            "samples": MetadataValue.md("\n\n---\n\n".join(f"```\n{s}\n```" for s in samples)),
        })

    return _tokenized
