"""The `tunegraph` command.

    tunegraph validate RECIPE [--key value ...]     check a recipe, run nothing
    tunegraph plan RECIPE [--json]                  the asset keys and their dependencies
    tunegraph materialize RECIPE [--select KEY]     run the recipe's assets through Dagster
        [--launcher torchrun --num-processes 2]     train on 2 processes (FSDP/DeepSpeed keys)
    tunegraph preprocess|train|merge-lora|evaluate RECIPE   one asset and what it needs
    tunegraph backfill-evals RECIPE [--checkpoints KEY ...] [--submit]   evals per checkpoint
    tunegraph dev [--recipes DIR]                   Dagster UI + daemon on 127.0.0.1
    tunegraph stage preprocess|... RECIPE --out DIR one stage without Dagster (dvc.yaml runs these)

Any recipe key can be overridden after the recipe: `--learning-rate 1e-4`, `--max-steps=10`.
Materializations go to the embedded instance (.tunegraph/dagster_home), so they show in the UI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tunegraph.cli_stages import stage
from tunegraph.config import Recipe, load_recipe, parse_overrides

OVERRIDABLE = {"ignore_unknown_options": True, "allow_extra_args": True}


def _load(recipe_path: str, extra_args: list[str]) -> Recipe:
    try:
        return load_recipe(recipe_path, parse_overrides(extra_args))
    except ValueError as exc:  # RecipeError included: the message names every key at fault
        raise click.ClickException(str(exc)) from None


def plan_of(recipe: Recipe) -> dict:
    """The recipe's assets and dependencies, from the same factories Dagster loads."""
    from tunegraph.pipelines import assets_for

    assets = []
    for definition in assets_for([recipe]):
        for key in definition.keys:
            spec = definition.specs_by_key[key]
            assets.append({"key": key.to_user_string(), "group": spec.group_name,
                           "deps": sorted(d.asset_key.to_user_string() for d in spec.deps),
                           # checkpoints: declared only (training materializes it), no op
                           "pool": definition.op.pool if definition.is_executable else None,
                           "code_version": spec.code_version,
                           "partitions": spec.partitions_def.name if spec.partitions_def else None})
    return {"recipe": recipe.name, "source": str(recipe.source_path), "assets": assets,
            "axolotl_keys_off": list(recipe.off_keys)}


def _asset_key(recipe: Recipe, name: str):
    from tunegraph.assets import base_model_key, recipe_key, trained_key

    if name in ("base_model", "base_models") or name.startswith("base_models/"):
        return base_model_key(recipe)
    name = name.removeprefix(f"{recipe.name}/")
    return trained_key(recipe) if name == "trained" else recipe_key(recipe, name)


def launch_options(command):
    """--launcher / --num-processes: how training runs (the Dagster `launcher` resource)."""
    command = click.option("--num-processes", type=click.IntRange(1), default=None,
                           help="Processes (GPUs) to train on; more than 1 implies "
                                "--launcher torchrun. Default $TUNEGRAPH_NUM_PROCESSES or 1.")(command)
    return click.option("--launcher", type=click.Choice(["python", "torchrun", "accelerate"]),
                        default=None, help="Train in this process (python) or on several "
                                           "(torchrun, accelerate launch). Default "
                                           "$TUNEGRAPH_LAUNCHER or python.")(command)


def _launcher(launcher: str | None, num_processes: int | None):
    from tunegraph.resources import LauncherResource

    settings = {k: v for k, v in (("launcher", launcher), ("num_processes", num_processes))
                if v is not None}
    try:
        resource = LauncherResource(**settings)
        resource.spec()  # a bad launcher/process count fails here, named
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return resource


def run_materialize(recipe: Recipe, select: tuple[str, ...], with_upstream: bool,
                    checkpoints: tuple[str, ...] = (), launcher=None) -> bool:  # noqa: ANN001
    """Materialize the recipe's assets (or the selection) on the embedded instance: the
    unpartitioned ones, then eval_scores per checkpoint (all, or `checkpoints`), then reports."""
    from dagster import AssetSelection

    from tunegraph.assets.raw_data import report_raw_data
    from tunegraph.pipelines import assets_for, embedded_instance, resources
    from tunegraph.pipelines.backfill import asset_graph, materialize_in_order, resolve_checkpoints
    from tunegraph.pipelines.builder import checks_for

    assets = assets_for([recipe])
    known = {k for a in assets for k in a.keys}
    selection = AssetSelection.all()
    if select:
        keys = [_asset_key(recipe, name) for name in select]
        unknown = [k.to_user_string() for k in keys if k not in known]
        if unknown:
            raise click.ClickException(f"--select: no asset {', '.join(unknown)} in recipe "
                                       f"{recipe.name}; assets: "
                                       f"{', '.join(sorted(k.to_user_string() for k in known))}")
        selection = AssetSelection.assets(*keys)
        if with_upstream:
            selection = selection.upstream()
    # INFO shows each step's start, progress and end; DEBUG (TUNEGRAPH_LOG_LEVEL) every event.
    level = os.environ.get("TUNEGRAPH_LOG_LEVEL", "INFO").upper()
    run_config = {"loggers": {"console": {"config": {"log_level": level}}}}
    instance = embedded_instance()
    try:  # the raw data's version now: what this run reads is what its assets will remember
        report_raw_data(instance, [recipe])
    except ValueError as exc:  # a dataset that is missing or unreadable, named
        raise click.ClickException(str(exc)) from None
    keys = selection.resolve(asset_graph(assets))
    try:
        # Checkpoints are resolved after the first run: it may be the training that makes them.
        chosen = (lambda: resolve_checkpoints(recipe, instance, checkpoints)) if checkpoints \
            else None
        # With the asset checks: a failed blocking check stops what is downstream of it.
        outcome = materialize_in_order(assets + checks_for([recipe]), instance,
                                       resources(launcher=launcher), keys, run_config, chosen)
    except ValueError as exc:  # nothing to evaluate yet, or an unknown --checkpoints key
        raise click.ClickException(str(exc)) from None
    for result in outcome.results:
        _print_summary(result)
    return outcome.success


def _print_summary(result) -> None:
    click.echo("\nasset".ljust(44) + "cached  artifact")
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        meta = mat.metadata
        cached = meta["cache_hit"].value if "cache_hit" in meta else "-"
        path = meta["path"].value if "path" in meta else ""
        name = mat.asset_key.to_user_string() + (f"[{mat.partition}]" if mat.partition else "")
        click.echo(f"{name:<43} {str(cached):<7} {path}")
        if "table" in meta:  # an eval report: scores vs training step
            click.echo(meta["table"].value)
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else (
            "WARNING" if evaluation.severity.value == "WARN" else "FAILED")
        name = evaluation.asset_check_key.to_user_string()
        click.echo(f"check {name}: {verdict}" + ("" if evaluation.passed else
                                                  f" ({evaluation.description})"))
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                error = event.step_failure_data.error
                click.echo(f"\nFAILED {event.step_key}: {error.message.strip() if error else ''}",
                           err=True)


@click.group()
@click.version_option(package_name="tunegraph")
def main() -> None:
    """LLM post-training from Axolotl-style recipes, every stage a Dagster asset."""


@main.command(context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.pass_context
def validate(ctx: click.Context, recipe: str) -> None:
    """Check RECIPE (and overrides) without running anything."""
    loaded = _load(recipe, ctx.args)
    plan = plan_of(loaded)
    click.echo(f"ok: {recipe} is valid (recipe '{loaded.name}', {len(plan['assets'])} assets)")
    if loaded.off_keys:
        click.echo(f"Axolotl keys set to off, accepted: {', '.join(loaded.off_keys)}")


@main.command(context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx: click.Context, recipe: str, as_json: bool) -> None:
    """Show RECIPE's asset keys and their dependencies, running nothing."""
    result = plan_of(_load(recipe, ctx.args))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for asset in result["assets"]:
        deps = ", ".join(asset["deps"]) or "-"
        click.echo(f"{asset['key']:<45} <- {deps}")


@main.command(context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--select", "select", multiple=True, help="Asset key (or its last part); repeat.")
@click.option("--with-upstream", is_flag=True, help="Also materialize what the selection needs.")
@launch_options
@click.pass_context
def materialize(ctx: click.Context, recipe: str, select: tuple[str, ...],
                with_upstream: bool, launcher: str | None, num_processes: int | None) -> None:
    """Materialize RECIPE's assets through Dagster (cached stages return at once)."""
    if not run_materialize(_load(recipe, ctx.args), select, with_upstream,
                           launcher=_launcher(launcher, num_processes)):
        sys.exit(1)


def _verb(name: str, target: str, doc: str) -> None:
    @main.command(name=name, context_settings=OVERRIDABLE, help=doc)
    @click.argument("recipe", type=click.Path())
    @launch_options
    @click.pass_context
    def command(ctx: click.Context, recipe: str, launcher: str | None,
                num_processes: int | None) -> None:
        loaded = _load(recipe, ctx.args)
        if target == "merged_model" and not loaded.is_lora:
            raise click.ClickException(f"recipe {loaded.name} is a full fine-tune (adapter is not "
                                       f"lora): there is no adapter to merge")
        if not run_materialize(loaded, (target,), with_upstream=True,
                               launcher=_launcher(launcher, num_processes)):
            sys.exit(1)


@main.command(context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--debug", is_flag=True, help="Show training rows token by token: trained tokens "
                                            "green, masked red (on a terminal; else «trained»).")
@click.option("--debug-num-examples", default=5, show_default=True, type=click.IntRange(1),
              help="How many rows --debug shows.")
@click.option("--stats-json", type=click.Path(dir_okay=False), default=None,
              help="Write num_rows, num_tokens, num_trainable_tokens, num_truncated, "
                   "packing_efficiency, num_packed_rows to this JSON file.")
@click.pass_context
def preprocess(ctx: click.Context, recipe: str, debug: bool, debug_num_examples: int,
               stats_json: str | None) -> None:
    """Materialize the tokenized dataset (and the base model)."""
    loaded = _load(recipe, ctx.args)
    if not run_materialize(loaded, ("tokenized_dataset",), with_upstream=True):
        sys.exit(1)
    if not (debug or stats_json):
        return
    from tunegraph.cli_stages import artifacts_root
    from tunegraph.config import base_model_slug
    from tunegraph.ops.artifacts import ArtifactStore
    from tunegraph.ops.base_model import load_tokenizer
    from tunegraph.ops.stages import base_model_stage, model_dir, tokenized_stage
    from tunegraph.ops.tokenize import debug_report, write_stats_json

    # Both stages were just materialized: these are cache hits that hand back the artifacts.
    store = ArtifactStore(artifacts_root())
    base = base_model_stage(loaded, store, base_model_slug(loaded)).artifact
    tokenized = tokenized_stage(loaded, store, base)
    if debug:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        tokenizer = load_tokenizer(loaded, model_dir(base))
        click.echo(debug_report(tokenized.artifact.path, tokenizer, debug_num_examples, color),
                   color=color)
    if stats_json:
        written = write_stats_json(tokenized.metadata, Path(stats_json))
        click.echo(f"stats: {json.dumps(written)} -> {stats_json}")
_verb("train", "trained", "Materialize the adapter or model, and what it needs.")
_verb("merge-lora", "merged_model", "Materialize the merged model, and what it needs.")


CHECKPOINTS_HELP = ("A checkpoint partition: its key, `final`, `step-000050` or `50`; repeat. "
                    "Default: all registered checkpoints.")


@main.command(context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--checkpoints", "checkpoints", multiple=True,
              help="As for backfill-evals; default: the final model only.")
@click.pass_context
def evaluate(ctx: click.Context, recipe: str, checkpoints: tuple[str, ...]) -> None:
    """Materialize the eval scores of the final model (or --checkpoints), what they need,
    and the recipe's eval report."""
    if not run_materialize(_load(recipe, ctx.args), ("eval_scores", "eval_report"),
                           with_upstream=True, checkpoints=checkpoints or ("final",)):
        sys.exit(1)


@main.command(name="backfill-evals", context_settings=OVERRIDABLE)
@click.argument("recipe", type=click.Path())
@click.option("--checkpoints", "checkpoints", multiple=True, help=CHECKPOINTS_HELP)
@click.option("--submit", is_flag=True,
              help="Create a Dagster backfill for the daemon of `tunegraph dev` to run (the UI's "
                   "Backfills page), instead of running here.")
@click.pass_context
def backfill_evals_command(ctx: click.Context, recipe: str, checkpoints: tuple[str, ...],
                           submit: bool) -> None:
    """Evaluate RECIPE's checkpoints (all registered ones, or --checkpoints), one run per
    checkpoint, then its eval report; training is not re-run."""
    from tunegraph.pipelines import assets_for, embedded_instance, resources
    from tunegraph.pipelines.backfill import backfill_evals, resolve_checkpoints, submit_backfill
    from tunegraph.pipelines.builder import checks_for

    loaded = _load(recipe, ctx.args)
    if loaded.val_set_size == 0:
        raise click.ClickException(f"val_set_size: recipe {loaded.name} holds out no rows, so "
                                   f"it has no evals to backfill")
    assets = assets_for([loaded])
    with embedded_instance() as instance:
        try:
            partitions = resolve_checkpoints(loaded, instance, checkpoints)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        if submit:
            backfill_id = submit_backfill(loaded, assets, instance, partitions)
            click.echo(f"backfill {backfill_id}: eval_scores over {len(partitions)} checkpoints, "
                       f"then the eval report; `tunegraph dev` runs it (UI: Backfills)")
            return
        level = os.environ.get("TUNEGRAPH_LOG_LEVEL", "INFO").upper()
        # With the asset checks, as `materialize` runs them (evals: no regression vs base).
        outcome = backfill_evals(loaded, assets + checks_for([loaded]), instance, resources(),
                                 partitions,
                                 {"loggers": {"console": {"config": {"log_level": level}}}})
    for result in outcome.results:
        _print_summary(result)
    if not outcome.success:
        sys.exit(1)


@main.command()
@click.option("--recipes", type=click.Path(file_okay=False), default=None,
              help="Folder of recipes (default: $TUNEGRAPH_RECIPES, ./recipes or ./examples).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.option("--gpu-pool-limit", type=int, default=None,
              help="GPU steps that may run at once (the GPU count); kept in the instance. "
                   "Default: $TUNEGRAPH_GPU_POOL_LIMIT, else the instance's setting (1 at first).")
def dev(recipes: str | None, host: str, port: int, gpu_pool_limit: int | None) -> None:
    """Start the Dagster webserver and daemon on the embedded instance."""
    from tunegraph.pipelines import (
        discover_recipes,
        embedded_instance,
        ensure_dagster_home,
        recipes_dir,
    )
    from tunegraph.pipelines.instance import set_gpu_pool_limit

    folder = Path(recipes) if recipes else recipes_dir()
    try:
        discover_recipes(folder)  # fail here, with the recipe's message, not inside Dagster
        with embedded_instance() as instance:  # applies $TUNEGRAPH_GPU_POOL_LIMIT
            if gpu_pool_limit is not None:
                set_gpu_pool_limit(instance, gpu_pool_limit, "--gpu-pool-limit")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    env = dict(os.environ, DAGSTER_HOME=str(ensure_dagster_home()),
               TUNEGRAPH_RECIPES=str(folder.resolve()),
               TUNEGRAPH_HOME=os.environ.get("TUNEGRAPH_HOME", str(Path(".tunegraph").resolve())))
    command = [sys.executable, "-m", "dagster", "dev", "-m", "tunegraph.pipelines.definitions",
               "--host", host, "--port", str(port)]
    click.echo(f"Dagster UI on http://{host}:{port}  (instance {env['DAGSTER_HOME']})")
    os.execvpe(command[0], command, env)


main.add_command(stage)  # `tunegraph stage ...`: the stages without Dagster (tunegraph/cli_stages.py)

if __name__ == "__main__":
    main()
