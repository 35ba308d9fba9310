"""Axolotl's own example recipes (shared/axolotl-configs): each validates and plans, or fails with
one RecipeError that names every key and value tunegraph does not run. And docs/
axolotl-compatibility.md is what scripts/axolotl_compat.py prints today (the date aside)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunegraph.cli import plan_of
from tunegraph.config import DatasetConfig, Recipe, RecipeError, load_recipe
from tunegraph.config.schema import (
    AXOLOTL_CHAT_TEMPLATES,
    AXOLOTL_DATASET_TYPES,
    AXOLOTL_LR_SCHEDULERS,
    AXOLOTL_OPTIMIZERS,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO.parent / "shared" / "axolotl-configs"
DOC = REPO / "docs" / "axolotl-compatibility.md"
SCRIPT = REPO / "scripts" / "axolotl_compat.py"
MISSING = f"no Axolotl example configs at {CONFIGS} (the shared checkout is not beside this repo)"
FILES = sorted(CONFIGS.glob("*.y*ml")) if CONFIGS.is_dir() else []
# Schema keys whose Axolotl-only values must be named in the error (key → Axolotl values).
AXOLOTL_VALUES = {"optimizer": AXOLOTL_OPTIMIZERS, "lr_scheduler": AXOLOTL_LR_SCHEDULERS,
                  "chat_template": AXOLOTL_CHAT_TEMPLATES, "adapter": ("qlora",)}


def is_off(value: Any) -> bool:
    """An Axolotl key whose value asks for nothing (the loader accepts and lists it)."""
    return value is None or value is False or value == "" or value == [] or value == {}


def unsupported(raw: dict[str, Any]) -> list[str]:
    """What the error must name: keys outside the schema that are not off, Axolotl-only values."""
    names = [k for k, v in raw.items() if k not in Recipe.model_fields and not is_off(v)]
    names += [f"'{v}'" for k, values in AXOLOTL_VALUES.items()
              if (v := raw.get(k)) in values]
    for i, entry in enumerate(raw.get("datasets") or []):
        names += [f"datasets[{i}].{k}" for k, v in entry.items()
                  if k not in DatasetConfig.model_fields and not is_off(v)]
        if entry.get("type") in AXOLOTL_DATASET_TYPES:
            names.append(f"'{entry['type']}'")
    return names


def test_configs_are_present():
    if not FILES:
        pytest.skip(MISSING)
    assert len(FILES) >= 30, [p.name for p in FILES]


@pytest.mark.parametrize("path", FILES or [pytest.param(None, marks=pytest.mark.skip(MISSING))],
                         ids=lambda p: p.name if p else "missing")
def test_config_validates_or_names_every_unsupported_key(path: Path):
    raw = yaml.safe_load(path.read_text())
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        message = str(exc)
        missing = [name for name in unsupported(raw) if name not in message]
        assert not missing, f"{path.name}: the error does not name {missing}:\n{message}"
        # Each problem line starts with the key it is about.
        assert all(":" in p.split(" ", 1)[0] for p in exc.problems), exc.problems
        return
    assert not unsupported(raw), f"{path.name} validated despite {unsupported(raw)}"
    assert plan_of(recipe)["assets"]
    assert set(recipe.off_keys) <= {k for k, v in raw.items() if is_off(v)} | {
        f"datasets[{i}].{k}" for i, e in enumerate(raw.get("datasets") or []) for k in e}


def load_script():
    spec = importlib.util.spec_from_file_location("axolotl_compat", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not FILES, reason=MISSING)
def test_committed_doc_is_what_the_script_writes():
    script = load_script()
    fresh = script.report(CONFIGS, date="DATE")
    committed = DOC.read_text()
    assert script.without_date(committed) == script.without_date(fresh), (
        f"{DOC.relative_to(REPO)} is stale: run `{script.COMMAND}`")
    assert f"`{script.COMMAND}` on " in committed


def test_problem_labels():
    script = load_script()
    assert script.problem_label("datasets[2].shards: known to Axolotl but not supported by "
                                "tunegraph yet") == ("datasets[].shards", "key not supported yet")
    assert script.problem_label("optimizer: 'adamw_8bit' is an Axolotl value that tunegraph does "
                                "not support yet (supported: sgd)") == (
        "optimizer: adamw_8bit", "value not supported yet")
    assert script.problem_label("datasets[0].type: datasets[].type: unknown value 'x' "
                                "(supported: alpaca)") == ("datasets[].type: x",
                                                           "value unknown to tunegraph")
    assert script.axolotl_area("sample_packing") == "packing"
    assert script.axolotl_area("datasets[].shards") == "source"


def test_script_writes_the_report(tmp_path):
    script = load_script()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ok.yml").write_text("base_model: tunegraph:tiny-llama\nlearning_rate: 0.001\n"
                                    "datasets:\n  - path: d.jsonl\n    type: alpaca\n"
                                    "load_in_8bit: false\n")
    (configs / "bad.yaml").write_text("base_model: x\nlearning_rate: 0.001\nsample_packing_sequentially: true\n"
                                      "datasets:\n  - path: d.jsonl\n    type: alpaca\n")
    out = tmp_path / "docs" / "compat.md"
    assert script.main(["--configs", str(configs), "--write", str(out)]) == 0
    text = out.read_text()
    assert "**1 of 2 files validate (50%).**" in text
    assert "| `sample_packing_sequentially` | key not supported yet | packing | 1 |" in text
    assert "| bad.yaml | fails | 1 | `sample_packing_sequentially` |" in text
    # No val_set_size, so no eval_scores: base model, tokenized data, model, checkpoints and the
    # raw_data source.
    assert "| ok.yml | validates (5 assets, 1 off keys) | 0 | |" in text
