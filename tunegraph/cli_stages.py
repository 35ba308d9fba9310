"""`tunegraph stage ...`: one content-addressed stage without Dagster (what `dvc repro` runs).

    tunegraph stage base-model RECIPE --out DIR
    tunegraph stage preprocess RECIPE [--base-model DIR] --out DIR
    tunegraph stage train      RECIPE [--base-model DIR] [--tokenized DIR] --out DIR
    tunegraph stage merge      RECIPE [--base-model DIR] [--adapter DIR] [--tokenized DIR] --out DIR
    tunegraph stage evaluate   RECIPE [--base-model DIR] [--tokenized DIR] [--trained DIR]
                               [--checkpoint <recipe>__step-000050] --out DIR [--metrics FILE]

Each command calls the same function of `tunegraph.ops.stages` as the Dagster asset, so an
artifact's content key is the one Dagster gives it, and both share the artifact store
(`$TUNEGRAPH_HOME/artifacts`, default `.tunegraph/artifacts`): a stage done by either is a cache
hit for the other. `--out` gets a copy of the artifact folder (its files and `manifest.json`), where
DVC tracks it. Upstream artifacts come from such folders (`--base-model`, ...: DVC's deps), or,
when an option is left out, from their own stages in the store (cached or computed).
Recipe keys may be overridden after RECIPE, as for every `tunegraph` verb.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import click

from tunegraph.config import Recipe, base_model_slug, load_recipe, parse_overrides
from tunegraph.ops.artifacts import MANIFEST, Artifact, ArtifactStore, read_manifest

OVERRIDABLE = {"ignore_unknown_options": True, "allow_extra_args": True}
PROGRESS_EVERY_S = 10.0


def artifacts_root() -> Path:
    # The rule of tunegraph.resources.default_home, kept here so that this module imports no Dagster.
    return Path(os.environ.get("TUNEGRAPH_HOME", ".tunegraph")).expanduser().resolve() / "artifacts"


def artifact_from_dir(path: str | Path, option: str, kinds: tuple[str, ...]) -> Artifact:
    """The artifact copied into `path` by an earlier stage's `--out`, checked to be of `kinds`."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{option} {path}: not a tunegraph artifact folder ({MANIFEST} missing); "
                         f"pass the --out folder of the stage that made it")
    manifest = read_manifest(folder)
    kind = manifest.get("kind")
    if kind not in kinds or not manifest.get("key"):
        raise ValueError(f"{option} {path}: holds a '{kind}' artifact, expected "
                         f"{' or '.join(repr(k) for k in kinds)}")
    return Artifact(kind, manifest["key"], folder.resolve(), manifest)


def check_lineage(artifact: Artifact, option: str, **upstream: Artifact) -> None:
    """`artifact` was made from these upstream artifacts (its manifest's inputs name their keys)."""
    inputs = artifact.manifest.get("inputs", {})
    for name, expected in upstream.items():
        if name in inputs and inputs[name] != expected.key:
            raise ValueError(f"{option} {artifact.path}: was made from {name} {inputs[name]}, but "
                             f"this run's {name} is {expected.key} ({expected.path}); rerun the "
                             f"stages in order (dvc repro does)")


def publish(artifact: Artifact, out: Path) -> Path:
    """Copy the artifact folder to `out`, replacing a previous artifact there (never other files)."""
    out = out.resolve()
    if out == artifact.path:
        return out
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                                or (out / MANIFEST).is_file())):
        raise ValueError(f"--out {out}: exists and is not a tunegraph artifact folder; "
                         f"refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(artifact.path, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_last_progress = [0.0]


def _progress(stage: str, done: int, total: int) -> None:
    now = time.monotonic()
    if done >= total or now - _last_progress[0] >= PROGRESS_EVERY_S:
        _last_progress[0] = now
        click.echo(f"{stage}: {done}/{total}", err=True)


class Upstream:
    """A recipe's upstream artifacts: from the folders given on the command line, else from their
    own stages in the store (a cache hit when done before, by Dagster or by this command).

    `given` maps "base_model", "tokenized", "trained" to (option name, folder or None)."""

    def __init__(self, recipe: Recipe, store: ArtifactStore,
                 given: dict[str, tuple[str, str | None]]):
        self.recipe, self.store, self.given = recipe, store, given
        self._done: dict[str, Artifact] = {}

    def _from_dir(self, name: str, kinds: tuple[str, ...]) -> tuple[str, Artifact | None]:
        option, path = self.given.get(name, ("", None))
        return option, artifact_from_dir(path, option, kinds) if path else None

    def base_model(self) -> Artifact:
        from tunegraph.ops.stages import base_model_stage

        if "base_model" not in self._done:
            _, given = self._from_dir("base_model", ("base_models",))
            self._done["base_model"] = given or base_model_stage(
                self.recipe, self.store, base_model_slug(self.recipe), _progress).artifact
        return self._done["base_model"]

    def tokenized(self) -> Artifact:
        from tunegraph.ops.stages import tokenized_stage

        if "tokenized" not in self._done:
            option, given = self._from_dir("tokenized", ("tokenized",))
            if given is None:
                given = tokenized_stage(self.recipe, self.store, self.base_model(),
                                        _progress).artifact
            else:
                check_lineage(given, option, base_model=self.base_model())
            self._done["tokenized"] = given
        return self._done["tokenized"]

    def trained(self) -> Artifact:
        from tunegraph.ops.stages import train_stage

        if "trained" not in self._done:
            kind = "adapters" if self.recipe.is_lora else "models"
            option, given = self._from_dir("trained", (kind,))
            if given is None:
                given = train_stage(self.recipe, self.store, self.base_model(), self.tokenized(),
                                    _progress).artifact
            else:
                check_lineage(given, option, base_model=self.base_model(),
                              tokenized=self.tokenized())
            self._done["trained"] = given
        return self._done["trained"]

    def checkpoint(self, partition: str | None):
        """A checkpoint of the training to score, named as its eval_scores partition key
        (default: the final adapter/model, `<recipe>__final`)."""
        from tunegraph.ops.checkpoints import find_checkpoint, list_checkpoints

        if partition is None:
            return list_checkpoints(self.trained(), self.recipe.name)[-1]
        return find_checkpoint(self.trained(), self.recipe.name, partition)


def _load(recipe_path: str, extra_args: list[str]) -> Recipe:
    return load_recipe(recipe_path, parse_overrides(extra_args))


def _report(recipe: Recipe, asset: str, result: Any, out: str | None) -> None:
    artifact = result.artifact
    where = publish(artifact, Path(out)) if out else artifact.path
    click.echo(f"{recipe.name}/{asset:<20} cached {str(result.cache_hit):<6} key {artifact.key}  "
               f"{where}")


def _run(body) -> None:
    """User mistakes (recipe, folders, options) become one-line errors, not tracebacks."""
    try:
        body()
    except ValueError as exc:  # RecipeError included: the message names every key at fault
        raise click.ClickException(str(exc)) from None


def _context(ctx: click.Context, recipe: str, **given: tuple[str, str | None]
             ) -> tuple[Recipe, Upstream]:
    loaded = _load(recipe, ctx.args)
    return loaded, Upstream(loaded, ArtifactStore(artifacts_root()), given)


def _out_option(function):
    return click.option("--out", type=click.Path(), default=None,
                        help="Copy the artifact folder here (where DVC tracks it).")(function)


@click.group(name="stage")
def stage() -> None:
    """Run one content-addressed stage without Dagster (what `dvc repro` runs)."""


@stage.command(name="base-model", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@_out_option
@click.pass_context
def base_model_command(ctx: click.Context, recipe: str, out: str | None) -> None:
    """The base model (built locally, or a reference to a hub/local model)."""
    def body() -> None:
        from tunegraph.ops.stages import base_model_stage

        loaded, up = _context(ctx, recipe)
        result = base_model_stage(loaded, up.store, base_model_slug(loaded), _progress)
        _report(loaded, "base_model", result, out)
    _run(body)


@stage.command(name="preprocess", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--base-model", "base_model", type=click.Path(), default=None,
              help="The base-model stage's --out folder.")
@_out_option
@click.pass_context
def preprocess_command(ctx: click.Context, recipe: str, base_model: str | None,
                       out: str | None) -> None:
    """The tokenized dataset."""
    def body() -> None:
        from tunegraph.ops.stages import tokenized_stage

        loaded, up = _context(ctx, recipe, base_model=("--base-model", base_model))
        result = tokenized_stage(loaded, up.store, up.base_model(), _progress)
        _report(loaded, "tokenized_dataset", result, out)
    _run(body)


@stage.command(name="train", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--base-model", "base_model", type=click.Path(), default=None)
@click.option("--tokenized", type=click.Path(), default=None,
              help="The preprocess stage's --out folder.")
@_out_option
@click.pass_context
def train_command(ctx: click.Context, recipe: str, base_model: str | None, tokenized: str | None,
                  out: str | None) -> None:
    """The LoRA adapter or fully fine-tuned model."""
    def body() -> None:
        from tunegraph.ops.stages import train_stage

        loaded, up = _context(ctx, recipe, base_model=("--base-model", base_model),
                              tokenized=("--tokenized", tokenized))
        result = train_stage(loaded, up.store, up.base_model(), up.tokenized(), _progress)
        _report(loaded, "adapter" if loaded.is_lora else "model", result, out)
    _run(body)


@stage.command(name="merge", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--base-model", "base_model", type=click.Path(), default=None)
@click.option("--adapter", type=click.Path(), default=None, help="The train stage's --out folder.")
@click.option("--tokenized", type=click.Path(), default=None)
@_out_option
@click.pass_context
def merge_command(ctx: click.Context, recipe: str, base_model: str | None, adapter: str | None,
                  tokenized: str | None, out: str | None) -> None:
    """The base model with the LoRA adapter merged in."""
    def body() -> None:
        from tunegraph.ops.stages import merge_stage

        loaded, up = _context(ctx, recipe, base_model=("--base-model", base_model),
                              trained=("--adapter", adapter), tokenized=("--tokenized", tokenized))
        if not loaded.is_lora:
            raise ValueError(f"adapter: recipe {loaded.name} is a full fine-tune (adapter is not "
                             f"lora): there is no adapter to merge")
        result = merge_stage(loaded, up.store, up.base_model(), up.trained(), up.tokenized())
        _report(loaded, "merged_model", result, out)
    _run(body)


@stage.command(name="evaluate", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--base-model", "base_model", type=click.Path(), default=None)
@click.option("--tokenized", type=click.Path(), default=None)
@click.option("--trained", type=click.Path(), default=None,
              help="The train stage's --out folder (adapter or fully fine-tuned model).")
@click.option("--checkpoint", default=None,
              help="Which checkpoint to score, as its partition key (`<recipe>__step-000050`); "
                   "default: the final one (`<recipe>__final`).")
@_out_option
@click.option("--metrics", type=click.Path(), default=None,
              help="Also write the numeric scores here as JSON (for `dvc metrics show`).")
@click.pass_context
def evaluate_command(ctx: click.Context, recipe: str, base_model: str | None,
                     tokenized: str | None, trained: str | None, checkpoint: str | None,
                     out: str | None, metrics: str | None) -> None:
    """Held-out loss/perplexity and exact-match, base model vs a checkpoint."""
    def body() -> None:
        from tunegraph.ops.stages import eval_stage

        loaded, up = _context(ctx, recipe, base_model=("--base-model", base_model),
                              tokenized=("--tokenized", tokenized), trained=("--trained", trained))
        result = eval_stage(loaded, up.store, up.base_model(), up.tokenized(),
                            up.checkpoint(checkpoint), _progress)
        _report(loaded, "eval_scores", result, out)
        if metrics:
            Path(metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics).write_text(json.dumps(numeric_scores(result.metadata), indent=2,
                                                sort_keys=True) + "\n")
    _run(body)


def numeric_scores(scores: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a scores dict, nested as they are (generated samples left out)."""
    kept: dict[str, Any] = {}
    for name, value in scores.items():
        if isinstance(value, dict):
            if inner := numeric_scores(value):
                kept[name] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[name] = value
    return kept
