"""A tiny LoRA recipe on disk, and its materialization with asset checks, for the Dagster tests
of schedules, sensors and checks: the whole graph materializes in seconds on a CPU."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from dagster import AssetKey, DagsterInstance

from tunegraph.config import load_recipe
from tunegraph.pipelines import assets_for, resources
from tunegraph.pipelines.backfill import RunsOutcome, materialize_in_order
from tunegraph.pipelines.builder import checks_for

OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "wet": "dry"}
TINY_RECIPE: dict[str, Any] = {
    "base_model": "tunegraph:tiny-llama",
    "tiny_model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400},
    "datasets": [{"path": "data/rows.jsonl", "type": "alpaca"}],
    "val_set_size": 8, "sequence_len": 64,
    "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
    # 8 steps at 1e-2 take the loss from 6.05 to 5.69 (measured), so the loss check passes.
    "micro_batch_size": 8, "max_steps": 8, "learning_rate": 0.01, "bf16": False,
    "eval_generation_rows": 2, "eval_max_new_tokens": 2,
}


def write_tiny_recipe(folder: Path, name: str = "tiny", **keys: Any) -> Path:
    """`<folder>/<name>.yaml` and its 48 Alpaca rows in `<folder>/data/rows.jsonl`; `keys`
    replace recipe keys (a None value removes one). Exports go to `<folder>/out`."""
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        word = rng.choice(sorted(OPPOSITES))
        rows.append({"instruction": "Give the opposite word.", "input": word,
                     "output": OPPOSITES[word]})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**TINY_RECIPE, "output_dir": str(folder / "out"), **keys}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    return path


def edit_recipe(path: Path, **keys: Any) -> None:
    """Change keys of a recipe file in place, as a user editing it would."""
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, **keys}))


def materialize_with_checks(recipe_path: Path, instance: DagsterInstance, artifacts: Path,
                            selection: Iterable[AssetKey] | None = None) -> RunsOutcome:
    """Materialize the recipe's assets (or `selection`) with their asset checks as `tunegraph
    materialize` does: the stages in one run, then eval_scores once per checkpoint, then the
    reports. A failed blocking check fails its run, so errors are not raised."""
    recipe = load_recipe(recipe_path)
    assets = assets_for([recipe])
    keys = list(selection) if selection else [k for a in assets for k in a.keys]
    return materialize_in_order(assets + checks_for([recipe]), instance,
                                resources(str(artifacts)), keys)


def materialized_keys(outcome: RunsOutcome) -> set[str]:
    return {e.asset_key.to_user_string() for result in outcome.results
            for e in result.get_asset_materialization_events()}


def schedule_tick(recipe_path: Path, instance: DagsterInstance, artifacts: Path):
    """Evaluate the recipe's schedule once against `instance`, as the daemon's tick would
    (with the repository, so partition keys of run requests are checked)."""
    from dagster import build_schedule_context

    from tunegraph.pipelines import build_definitions
    from tunegraph.resources import ArtifactStoreResource

    recipe = load_recipe(recipe_path)
    defs = build_definitions([recipe])
    schedule = defs.resolve_schedule_def(f"{recipe.name}_schedule")
    with build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                resources={"artifact_store": ArtifactStoreResource(
                                    root=str(artifacts))}) as context:
        return schedule.evaluate_tick(context)
