"""The lm-evaluation-harness (`lm_eval_tasks:`) on a loaded model, tasks from local YAML files.

    results = run_lm_eval(recipe, model, tokenizer)   # {"colors_mc": {"acc": 0.75, "num_rows": 8}}

Tasks are looked up in `lm_eval_include_path` (lm-eval's TaskManager(include_path=...), without
scanning lm-eval's ~10,000 built-in task files unless a name is not found there). A task file
reads local rows with `dataset_path: json` (or csv, parquet, text, arrow) and
`dataset_kwargs: {data_files: ...}`; lm-eval would read a relative data file from the working
directory, so tunegraph reads it beside the task file instead, which lets a recipe folder carry
its tasks. The model runs through lm-eval's HF backend (`HFLM(pretrained=model)`), on the same
model object that the held-out loss uses.

Needs the `eval` extra (`pip install 'tunegraph[eval]'`).
"""

from __future__ import annotations

import difflib
import glob
import re
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunegraph.config import Recipe
from tunegraph.ops.eval_tasks import local_path

# `datasets` builders that read local files: their data_files are paths on this machine (a hub
# dataset's data_files are paths inside its repository and stay as written).
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("lm_eval_tasks: the lm-eval package is not installed: pip install "
                         "'tunegraph[eval]'")


def include_paths(recipe: Recipe) -> list[Path]:
    """The recipe's lm_eval_include_path folders, resolved."""
    value = recipe.lm_eval_include_path
    raw = [] if value is None else [value] if isinstance(value, str) else list(value)
    paths = []
    for index, path in enumerate(raw):
        key = "lm_eval_include_path" + (f"[{index}]" if isinstance(value, list) else "")
        found = local_path(recipe, path, key)
        if not found.is_dir():
            raise ValueError(f"{key}: '{path}' is a file; name the folder that holds the task "
                             f"YAML files")
        paths.append(found)
    return paths


def _named_in_builtin_tasks(names: list[str]) -> bool:
    """Whether any name occurs as a word in lm-eval's own task files: a text search of ~14,000
    files takes ~3 s where indexing them takes ~60 s on 2 cores, so a typo fails fast."""
    import importlib.util

    origin = importlib.util.find_spec("lm_eval").origin
    assert origin is not None
    pattern = re.compile("|".join(rf"(?<![\w-]){re.escape(n)}(?![\w-])" for n in names))
    return any(pattern.search(path.read_text(errors="ignore"))
               for path in (Path(origin).parent / "tasks").rglob("*.y*ml"))


def _task_manager(recipe: Recipe) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths(recipe)]
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    missing = [name for name in recipe.lm_eval_tasks if name not in manager.task_index]
    if missing and _named_in_builtin_tasks(missing):
        manager = TaskManager(include_path=paths or None, include_defaults=True)
        missing = [name for name in recipe.lm_eval_tasks if name not in manager.task_index]
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=1, cutoff=0.75)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = f"in {', '.join(paths)} or " if paths else ""
        raise ValueError(f"lm_eval_tasks: no task named '{missing[0]}' {where}among lm-eval's "
                         f"own tasks{hint}")
    return manager


def _resolved_data_files(value: Any, folder: Path) -> Any:
    """data_files (a str, a list, or {split: str | list}) with relative paths made absolute
    against `folder`, the task file's folder."""
    if isinstance(value, dict):
        return {split: _resolved_data_files(v, folder) for split, v in value.items()}
    if isinstance(value, list):
        return [_resolved_data_files(v, folder) for v in value]
    if isinstance(value, str) and not Path(value).expanduser().is_absolute():
        return str(folder / value)
    return value


def _local_config(name: str, yaml_path: Path, resolve_func: bool) -> dict[str, Any]:
    """A task's YAML (with its includes) whose local data_files point beside the file."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself uses

    config = load_yaml(yaml_path, resolve_func=resolve_func)
    kwargs = config.get("dataset_kwargs") or {}
    if config.get("dataset_path") in LOCAL_BUILDERS and "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _resolved_data_files(
            kwargs["data_files"], yaml_path.parent)}
    config["task"] = name
    return config


def _file_task_specs(recipe: Recipe, manager: Any, resolve_func: bool
                     ) -> list[str | dict[str, Any]]:
    """What to hand lm-eval per requested name: a task from a file as its resolved config, a
    group or tag (or a built-in task) by name."""
    from lm_eval.tasks._index import Kind

    specs: list[str | dict[str, Any]] = []
    for name in recipe.lm_eval_tasks:
        entry = manager.task_index[name]
        if entry.kind == Kind.TASK and entry.yaml_path is not None:
            specs.append(_local_config(name, Path(entry.yaml_path), resolve_func))
        else:
            specs.append(name)
    return specs


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task files without importing lm-eval (seconds) or the functions their
    `!function` tags name: those become plain strings."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_data_files(recipe: Recipe) -> list[Path]:
    """The local data files that the task files in lm_eval_include_path read, resolved as
    `run_lm_eval` resolves them (for the eval stage's key: a cache hit must not import lm-eval)."""
    files: list[Path] = []

    def collect(value: Any, folder: Path) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item, folder)
        elif isinstance(value, list):
            for item in value:
                collect(item, folder)
        elif isinstance(value, str):
            for match in sorted(glob.glob(str(folder / Path(value).expanduser()))):
                if Path(match).is_file() and Path(match) not in files:
                    files.append(Path(match))

    for folder in include_paths(recipe):
        for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
            try:
                config = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506
            except yaml.YAMLError as exc:
                raise ValueError(f"lm_eval_include_path: {path} is not valid YAML ({exc})") from None
            if isinstance(config, dict) and config.get("dataset_path") in LOCAL_BUILDERS:
                collect((config.get("dataset_kwargs") or {}).get("data_files"), path.parent)
    return files


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none": 0.75 -> "acc": 0.75; other filters keep their name
    ("exact_match,strict-match"); stderr is left out (tunegraph runs no bootstrap)."""
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


def run_lm_eval(recipe: Recipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                ) -> dict[str, dict[str, float]]:
    """`{task or group: {metric: value, "num_rows": n}}` for the recipe's lm_eval_tasks."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(recipe)
    specs = _file_task_specs(recipe, manager, resolve_func=True)
    batch_size = recipe.lm_eval_batch_size or recipe.eval_batch_size or recipe.micro_batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(model.device))
    # bootstrap_iters=0: no stderr, and no process pool (lm-eval bootstraps with multiprocessing).
    output = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager,
                                     limit=recipe.lm_eval_limit, bootstrap_iters=0,
                                     log_samples=False, random_seed=recipe.seed,
                                     numpy_random_seed=recipe.seed, torch_random_seed=recipe.seed,
                                     fewshot_random_seed=recipe.seed)
    assert output is not None, "simple_evaluate returns None only on non-zero ranks"
    counts = output.get("n-samples", {})
    results = {}
    for name, task_results in output["results"].items():
        results[name] = _metrics(task_results)
        if name in counts:
            results[name]["num_rows"] = counts[name]["effective"]
    return results
