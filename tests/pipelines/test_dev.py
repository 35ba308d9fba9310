"""`tunegraph dev` starts Dagster's webserver and daemon on 127.0.0.1 with the embedded instance.
On the shipped examples (and a tiny recipe beside them): its GraphQL API lists the quickstart's
assets, and a run launched through it materializes one; `tunegraph backfill-evals RECIPE --submit`
creates a Dagster asset backfill that the real `dagster-daemon` executes: one eval_scores run per
checkpoint partition, then the eval report, each run tagged with the backfill's id. Before it hands
over to `dagster dev`, `tunegraph dev` imports no torch (the code server does, once).

One server serves the module: the quickstart's run, launched as it starts, runs while the daemon
test trains and waits for the daemon's ticks (every 30 s).

    .venv/bin/python -m pytest tests/pipelines/test_dev.py
"""

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import AssetKey, AssetRecordsFilter, DagsterRun, RunsFilter
from dagster_server import (
    dev_server,
    graphql,
    launch_assets,
    stop_sensor,
    wait_for_backfill,
    wait_for_run,
)
from recipes_support import write_tiny_recipe

from tests_support import EXAMPLES
from tunegraph.cli import main
from tunegraph.pipelines import embedded_instance
from tunegraph.pipelines.checkpoint_sensor import SENSOR_NAME
from tunegraph.pipelines.instance import GPU_POOL, GPU_POOL_LIMIT_ENV

EVAL_SCORES = AssetKey(["tiny", "eval_scores"])
EVAL_REPORT = AssetKey(["tiny", "eval_report"])
ASSET_NODES = "{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }"

# `tunegraph dev` up to its exec of `dagster dev` (recorded instead), then the command it would
# exec and the heavy modules imported on the way.
DEV_UNTIL_EXEC = """
import sys
from click.testing import CliRunner
from tunegraph import cli
execs = []
cli.os.execvpe = lambda file, args, env: execs.append(args)
result = CliRunner().invoke(cli.main, ["dev", "--recipes", sys.argv[1]])
assert result.exit_code == 0, result.output
print(*execs[0][1:4])
print("imported:", *[m for m in ("torch", "transformers", "datasets") if m in sys.modules])
"""


def test_dev_checks_the_recipes_and_hands_over_without_importing_torch(tmp_path: Path):
    """The recipes are loaded and the instance made in `tunegraph dev` itself; the assets, and
    torch with them (15 s on a 2-core machine), are only imported by the code server it starts."""
    env = dict(os.environ, TUNEGRAPH_HOME=str(tmp_path / ".tunegraph"))
    done = subprocess.run([sys.executable, "-c", DEV_UNTIL_EXEC, str(EXAMPLES)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["-m dagster dev", "imported:"], done.stdout
    assert (tmp_path / ".tunegraph" / "dagster_home" / "dagster.yaml").is_file()


@dataclass
class Served:
    """The module's `tunegraph dev`, and the run launched when it started."""

    port: int
    folder: Path       # its working folder: .tunegraph/ (instance, artifacts) and dev.log
    recipes: Path      # a copy of examples/, plus tiny.yaml (tests/recipes_support.py)
    nodes: list[dict]  # GraphQL's asset nodes, as the server first listed them
    run_id: str        # the quickstart's base model and tokenized dataset

    @property
    def home(self) -> Path:
        return self.folder / ".tunegraph"

    def log(self) -> str:
        return (self.folder / "dev.log").read_text()[-3000:]


def quickstart_base(nodes: list[dict]) -> list[str]:
    """The base-model asset the quickstart's tokenized dataset reads."""
    [tokenized] = [n for n in nodes if n["assetKey"]["path"] == ["quickstart", "tokenized_dataset"]]
    return next(d["path"] for d in tokenized["dependencyKeys"] if d["path"][0] == "base_models")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("dev")
    recipes = folder / "recipes"
    shutil.copytree(EXAMPLES, recipes)
    # 8 steps, a checkpoint at step 4: partitions tiny__step-000004 and tiny__final. The smallest
    # recipe the tests have: the daemon test's time goes to the daemon's ticks and run processes.
    write_tiny_recipe(recipes, save_steps=4)
    with pytest.MonkeyPatch.context() as env:
        env.delenv(GPU_POOL_LIMIT_ENV, raising=False)  # it would replace the limit below
        # Two GPU slots, so the daemon launches both checkpoints' eval runs on one tick rather
        # than the second when the first's eval step ends (a spawned step imports torch: ~15 s).
        with dev_server(folder, recipes, ("--gpu-pool-limit", "2")) as port:
            nodes = graphql(port, ASSET_NODES)["assetNodes"]
            # As the Materialize button does, with Dagster's default executor (a process per step).
            run_id = launch_assets(port, [quickstart_base(nodes), ["quickstart", "tokenized_dataset"]])
            yield Served(port, folder, recipes, nodes, run_id)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow  # the daemon ticks every 30 s and each run starts a process
def test_daemon_runs_a_submitted_eval_backfill(served: Served, monkeypatch):
    monkeypatch.setenv("TUNEGRAPH_HOME", str(served.home))  # the server's instance and artifacts
    monkeypatch.chdir(served.folder)
    recipe = str(served.recipes / "tiny.yaml")
    # Off before training, so that the runs that evaluate the checkpoints are the backfill's.
    stop_sensor(served.port, SENSOR_NAME)
    _cli("train", recipe)
    output = _cli("backfill-evals", recipe, "--submit")
    with embedded_instance(served.home) as instance:
        [backfill] = instance.get_backfills()
    assert backfill.backfill_id in output
    state = wait_for_backfill(served.port, backfill.backfill_id)
    assert state["status"] == "COMPLETED_SUCCESS", (state, served.log())

    with embedded_instance(served.home) as instance:
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit == 2
        checkpoints = instance.get_dynamic_partitions("tiny__checkpoints")
        assert checkpoints == ["tiny__step-000004", "tiny__final"]
        backfill_runs = {r.run_id: r for r in instance.get_runs(
            RunsFilter(tags=DagsterRun.tags_for_backfill_id(backfill.backfill_id)))}
        assert {r.status.value for r in backfill_runs.values()} == {"SUCCESS"}
        # One run per checkpoint, then the report's run.
        assert sorted(r.tags.get("dagster/partition", "") for r in backfill_runs.values()) == \
            sorted(["", *checkpoints])
        evals = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=EVAL_SCORES), limit=100).records
        scored = {r.partition_key: r.asset_materialization.metadata for r in evals
                  if r.run_id in backfill_runs}
        assert sorted(scored) == sorted(checkpoints)
        for partition, metadata in scored.items():
            assert math.isfinite(metadata["trained/heldout_loss"].value), partition
            assert math.isfinite(metadata["base/heldout_loss"].value), partition
            assert metadata["final"].value == partition.endswith("__final")
        [report] = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=EVAL_REPORT), limit=1).records
        assert report.run_id in backfill_runs
        assert report.asset_materialization.metadata["num_checkpoints_evaluated"].value == 2


def test_dev_lists_assets_and_materializes_from_graphql(served: Served):
    keys = {"/".join(n["assetKey"]["path"]): n for n in served.nodes}
    for name in ("tokenized_dataset", "adapter", "merged_model", "eval_scores"):
        assert f"quickstart/{name}" in keys
        assert keys[f"quickstart/{name}"]["groupName"] == "quickstart"
    assert "/".join(quickstart_base(served.nodes)).startswith("base_models/tiny_llama_")

    assert wait_for_run(served.port, served.run_id, timeout_s=300) == "SUCCESS", served.log()
    # The run wrote its artifacts to the instance's project folder.
    with embedded_instance(served.home) as instance:
        event = instance.get_latest_materialization_event(
            AssetKey(["quickstart", "tokenized_dataset"]))
    assert event.run_id == served.run_id
    tokenized = Path(event.asset_materialization.metadata["path"].value)
    assert tokenized.parent.resolve() == (served.home / "artifacts" / "tokenized").resolve()
    assert (tokenized / "manifest.json").is_file()
