"""`tunegraph dev` starts Dagster's webserver and daemon on 127.0.0.1 with the embedded instance;
its GraphQL API lists the quickstart's assets, and a run launched through it materializes one.
Before it hands over to `dagster dev` it imports no torch (the code server does, once)."""

import os
import subprocess
import sys
from pathlib import Path

from dagster_server import dev_server, graphql, launch_assets, wait_for_run

from tests_support import EXAMPLES

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


def test_dev_lists_assets_and_materializes_from_graphql(tmp_path: Path):
    with dev_server(tmp_path, EXAMPLES) as port:
        nodes = graphql(port, "{ assetNodes { assetKey { path } groupName "
                              "dependencyKeys { path } } }")
        keys = {"/".join(n["assetKey"]["path"]): n for n in nodes["assetNodes"]}
        for name in ("tokenized_dataset", "adapter", "merged_model", "eval_scores"):
            assert f"quickstart/{name}" in keys
            assert keys[f"quickstart/{name}"]["groupName"] == "quickstart"
        base = next("/".join(d["path"]) for d in keys["quickstart/tokenized_dataset"]["dependencyKeys"]
                    if d["path"][0] == "base_models")
        assert base.startswith("base_models/tiny_llama_")

        run_id = launch_assets(port, [base.split("/"), ["quickstart", "tokenized_dataset"]])
        assert wait_for_run(port, run_id, timeout_s=300) == "SUCCESS", \
            (tmp_path / "dev.log").read_text()[-3000:]
    # The run wrote its artifacts to the instance's project folder.
    assert list((tmp_path / ".tunegraph" / "artifacts" / "tokenized").glob("*/manifest.json"))


def test_dev_checks_the_recipes_and_hands_over_without_importing_torch(tmp_path: Path):
    """The recipes are loaded and the instance made in `tunegraph dev` itself; the assets, and
    torch with them (15 s on a 2-core machine), are only imported by the code server it starts."""
    env = dict(os.environ, TUNEGRAPH_HOME=str(tmp_path / ".tunegraph"))
    done = subprocess.run([sys.executable, "-c", DEV_UNTIL_EXEC, str(EXAMPLES)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["-m dagster dev", "imported:"], done.stdout
    assert (tmp_path / ".tunegraph" / "dagster_home" / "dagster.yaml").is_file()
