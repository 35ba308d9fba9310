"""Load a recipe: YAML → key checks (unknown, Axolotl-only) → CLI overrides → pydantic.

Every problem in a recipe is reported at once, each line naming its key, in one `RecipeError`.
A key Axolotl knows but tunegraph does not run is an error, except where its value asks for nothing
(`load_in_8bit: false`, an empty `wandb_project:`): such a key is accepted and listed in
`Recipe.off_keys` so the plan can show it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunegraph.config.axolotl_keys import AXOLOTL_DATASET_KEYS, AXOLOTL_KEYS
from tunegraph.config.schema import DatasetConfig, EvalTaskConfig, Recipe, TinyModelConfig

# Messages for Axolotl keys whose absence in tunegraph has a reason worth saying.
WHY_UNSUPPORTED = {
    "dataset_prepared_path": "tunegraph caches tokenized data, content-addressed, in its artifact "
                             "store (.tunegraph/artifacts)",
    "resume_from_checkpoint": "checkpoint resume arrives with checkpoint partitions",
    "sample_packing": "packing arrives with the data issue",
    "rl": "preference and RL training arrive in a later release",
    "load_in_4bit": "quantized (QLoRA) loading needs bitsandbytes, not supported yet",
    "load_in_8bit": "quantized loading needs bitsandbytes, not supported yet",
}


class RecipeError(ValueError):
    """A recipe the user can fix: the message lists every problem, each naming its key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"recipe {source} is invalid:\n{lines}")


def recipe_name_for(path: Path) -> str:
    """The asset-key prefix for a recipe file: its stem, reduced to Dagster-safe characters."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    return f"r_{name}" if name[0].isdigit() else name


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


def _did_you_mean(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(raw: dict[str, Any], known: list[str], axolotl: dict[str, str], where: str
               ) -> tuple[dict[str, Any], list[str], list[str]]:
    """Split a mapping into the keys tunegraph runs, problems, and Axolotl keys that are off."""
    kept: dict[str, Any] = {}
    problems: list[str] = []
    off: list[str] = []
    for key, value in raw.items():
        label = f"{where}{key}"
        if not isinstance(key, str):
            problems.append(f"{label}: keys must be strings")
        elif key in known:
            if value is not None:  # an empty value means "not set", as in Axolotl
                kept[key] = value
        elif key in axolotl:
            if _is_off(value):
                off.append(label)
            else:
                why = WHY_UNSUPPORTED.get(key)
                problems.append(f"{label}: known to Axolotl but not supported by tunegraph yet"
                                + (f" ({why})" if why else ""))
        else:
            problems.append(f"{label}: unknown key{_did_you_mean(key, known + list(axolotl))}")
    return kept, problems, off


def _pydantic_problems(error: ValidationError) -> list[str]:
    """One line per pydantic error, naming the key once (validators already name it)."""
    problems = []
    for item in error.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in item["loc"])
        loc = loc.replace(".[", "[")
        message = item["msg"].removeprefix("Value error, ")
        if entry := re.match(r"datasets\[\d+\]", loc):
            message = message.replace("datasets[]", entry.group(0))
        if not loc or message.startswith(loc) or message.split(":", 1)[0] in loc:
            problems.append(message)
        else:
            problems.append(f"{loc}: {message}")
    return problems


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--learning-rate", "1e-4", "--adapter=lora"]` → `{"learning_rate": 1e-4, "adapter": "lora"}`.

    Values are parsed as YAML, so `--lora-target-modules '[q_proj, v_proj]'` gives a list."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"override '{arg}' must look like --key value or --key=value")
        if "=" in arg:
            flag, text = arg[2:].split("=", 1)
            index += 1
        else:
            if index + 1 >= len(args):
                raise ValueError(f"override {arg} has no value")
            flag, text = arg[2:], args[index + 1]
            index += 2
        value = yaml.safe_load(text)
        if isinstance(value, str):
            value = _number_or_text(value)
        overrides[flag.replace("-", "_")] = value
    return overrides


def _number_or_text(text: str) -> Any:
    # YAML 1.1 reads "1e-4" as a string; a user typing it on the command line means a number.
    try:
        return float(text) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", text) else text
    except ValueError:
        return text


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(str(path), [f"file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(path), [f"not valid YAML{where}: {problem}"]) from None
    if raw is None:
        raise RecipeError(str(path), ["the file is empty"])
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [f"top level must be a mapping of keys, got "
                                      f"{type(raw).__name__}"])
    return raw


def recipe_from_mapping(raw: dict[str, Any], source: str, name: str,
                        source_path: Path | None = None) -> Recipe:
    top_known = list(Recipe.model_fields)
    kept, problems, off = check_keys(raw, top_known, AXOLOTL_KEYS, "")
    if isinstance(kept.get("datasets"), list):
        datasets = []
        for i, entry in enumerate(kept["datasets"]):
            if isinstance(entry, dict):
                entry, more, more_off = check_keys(entry, list(DatasetConfig.model_fields),
                                                   AXOLOTL_DATASET_KEYS, f"datasets[{i}].")
                problems += more
                off += more_off
            datasets.append(entry)
        kept["datasets"] = datasets
    if isinstance(kept.get("tiny_model"), dict):
        kept["tiny_model"], more, _ = check_keys(kept["tiny_model"],
                                                 list(TinyModelConfig.model_fields), {},
                                                 "tiny_model.")
        problems += more
    if isinstance(kept.get("eval_tasks"), list):
        kept["eval_tasks"] = list(kept["eval_tasks"])  # a copy: the raw mapping stays as read
        for i, entry in enumerate(kept["eval_tasks"]):
            if isinstance(entry, dict):
                kept["eval_tasks"][i], more, _ = check_keys(
                    entry, list(EvalTaskConfig.model_fields), {}, f"eval_tasks[{i}].")
                problems += more
    try:
        recipe = Recipe.model_validate(kept)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
        recipe = None
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    return recipe.bind_source(name, source_path, tuple(off))


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, check and validate a recipe file; `overrides` replace top-level keys."""
    path = Path(path)
    raw = read_yaml(path)
    raw.update(overrides or {})
    return recipe_from_mapping(raw, str(path), recipe_name_for(path), path.resolve())
