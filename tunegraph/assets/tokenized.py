"""`<recipe>/tokenized_dataset`: rows → input_ids and labels, split into train and validation."""


import json

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, asset

from tunegraph.assets.common import base_model_key, progress_logger, recipe_key, stage_output
from tunegraph.assets.raw_data import raw_data_key
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
           deps=[raw_data_key(recipe)], kinds={"parquet"},
           description="Tokenized training and held-out rows with label masks.")
    def _tokenized(context: AssetExecutionContext, artifact_store: ArtifactStoreResource,
                   base_model: Artifact):
        result = tokenized_stage(recipe, artifact_store.store(), base_model,
                                 progress_logger(context))
        samples_file = result.artifact.path / "samples.json"
        samples = json.loads(samples_file.read_text()) if samples_file.is_file() else []
        stats = result.metadata
        extra = {}
        if stats.get("documents_per_row"):
            extra["documents_per_row"] = MetadataValue.md(
                "| documents in a row | rows |\n|---|---|\n" + "".join(
                    f"| {k} | {v} |\n" for k, v in stats["documents_per_row"].items()))
        if stats.get("invalid_row_examples"):
            extra["invalid_row_examples"] = MetadataValue.md(
                "\n".join(f"- {e}" for e in stats["invalid_row_examples"]))
        return stage_output(result, {
            **{k: v for k, v in stats.items() if isinstance(v, (int, float))},
            # Trained tokens are wrapped in «»; rows as training sees them, before packing.
            "samples": MetadataValue.md("\n\n".join(
                f"**dataset {s['dataset']}, row {s['row']}** ({s['num_tokens']} tokens)\n"
                f"```\n{s['text']}\n```" for s in samples)),
            **extra,
        })

    return _tokenized
