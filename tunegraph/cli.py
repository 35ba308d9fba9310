"""The `tunegraph` command.

    tunegraph validate RECIPE [--key value ...]     check a recipe, run nothing
    tunegraph plan RECIPE [--json]                  the asset keys and their dependencies
    tunegraph materialize RECIPE [--select KEY]     run the recipe's assets through Dagster
    tunegraph preprocess|train|merge-lora|evaluate RECIPE   one asset and what it needs
    tunegraph dev [--recipes DIR]                   Dagster UI + daemon on 127.0.0.1

Any recipe key can be overridden after the recipe: `--learning-rate 1e-4`, `--max-steps=10`.
Materializations go to the embedded instance (.tunegraph/dagster_home), so they show in the UI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

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
                           "pool": definition.op.pool, "code_version": spec.code_version})
    return {"recipe": recipe.name, "source": str(recipe.source_path), "assets": assets,
            "axolotl_keys_off": list(recipe.off_keys)}


def _asset_key(recipe: Recipe, name: str):
    from tunegraph.assets import base_model_key, recipe_key, trained_key

    if name in ("base_model", "base_models") or name.startswith("base_models/"):
        return base_model_key(recipe)
    name = name.removeprefix(f"{recipe.name}/")
    return trained_key(recipe) if name == "trained" else recipe_key(recipe, name)


def run_materialize(recipe: Recipe, select: tuple[str, ...], with_upstream: bool) -> bool:
    """Materialize the recipe's assets (or the selection) on the embedded instance."""
    from dagster import AssetSelection, materialize

    from tunegraph.pipelines import assets_for, embedded_instance, resources

    assets = assets_for([recipe])
    known = {k for a in assets for k in a.keys}
    selection = None
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
    result = materialize(assets, instance=embedded_instance(), resources=resources(),
                         selection=selection, raise_on_error=False, run_config=run_config)
    _print_summary(result)
    return result.success


def _print_summary(result) -> None:
    click.echo("\nasset".ljust(44) + "cached  artifact")
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        meta = mat.metadata
        cached = meta["cache_hit"].value if "cache_hit" in meta else "-"
        path = meta["path"].value if "path" in meta else ""
        click.echo(f"{mat.asset_key.to_user_string():<43} {str(cached):<7} {path}")
        if "scores" in meta:
            click.echo(meta["scores"].value)
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
@click.pass_context
def materialize(ctx: click.Context, recipe: str, select: tuple[str, ...],
                with_upstream: bool) -> None:
    """Materialize RECIPE's assets through Dagster (cached stages return at once)."""
    if not run_materialize(_load(recipe, ctx.args), select, with_upstream):
        sys.exit(1)


def _verb(name: str, target: str, doc: str) -> None:
    @main.command(name=name, context_settings=OVERRIDABLE, help=doc)
    @click.argument("recipe", type=click.Path())
    @click.pass_context
    def command(ctx: click.Context, recipe: str) -> None:
        loaded = _load(recipe, ctx.args)
        if target == "merged_model" and not loaded.is_lora:
            raise click.ClickException(f"recipe {loaded.name} is a full fine-tune (adapter is not "
                                       f"lora): there is no adapter to merge")
        if not run_materialize(loaded, (target,), with_upstream=True):
            sys.exit(1)


_verb("preprocess", "tokenized_dataset", "Materialize the tokenized dataset (and the base model).")
_verb("train", "trained", "Materialize the adapter or model, and what it needs.")
_verb("merge-lora", "merged_model", "Materialize the merged model, and what it needs.")
_verb("evaluate", "eval_scores", "Materialize the eval scores, and what they need.")


@main.command()
@click.option("--recipes", type=click.Path(file_okay=False), default=None,
              help="Folder of recipes (default: $TUNEGRAPH_RECIPES, ./recipes or ./examples).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
def dev(recipes: str | None, host: str, port: int) -> None:
    """Start the Dagster webserver and daemon on the embedded instance."""
    from tunegraph.pipelines import discover_recipes, ensure_dagster_home, recipes_dir

    folder = Path(recipes) if recipes else recipes_dir()
    try:
        discover_recipes(folder)  # fail here, with the recipe's message, not inside Dagster
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    env = dict(os.environ, DAGSTER_HOME=str(ensure_dagster_home()),
               TUNEGRAPH_RECIPES=str(folder.resolve()),
               TUNEGRAPH_HOME=os.environ.get("TUNEGRAPH_HOME", str(Path(".tunegraph").resolve())))
    command = [sys.executable, "-m", "dagster", "dev", "-m", "tunegraph.pipelines.definitions",
               "--host", host, "--port", str(port)]
    click.echo(f"Dagster UI on http://{host}:{port}  (instance {env['DAGSTER_HOME']})")
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
