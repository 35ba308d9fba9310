"""Names derived from a recipe: the shared base-model slug used in asset keys."""

from __future__ import annotations

import hashlib
import json
import re

from tunegraph.config.schema import TINY_LLAMA, Recipe


def base_model_slug(recipe: Recipe) -> str:
    """`base_models/<slug>`: one asset per distinct base model, shared by every recipe that uses it.

    A hub id or path becomes lowercase `org__name`; the local tiny model's slug hashes what builds
    it (shape, seed and the data its tokenizer is trained on), so recipes that would build the same
    model share one asset."""
    if recipe.base_model == TINY_LLAMA:
        assert recipe.tiny_model is not None
        spec = {"tiny_model": recipe.tiny_model.model_dump(), "seed": recipe.seed,
                "data": [(d.path, d.data_files, d.split, d.type) for d in recipe.datasets]}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return f"tiny_llama_{digest}"
    text = recipe.base_model.strip("/").replace("/", "__")
    if recipe.revision_of_model:
        text += f"__{recipe.revision_of_model}"
    return re.sub(r"[^a-z0-9_]", "_", text.lower())
