"""`tunegraph dev` starts Dagster's webserver and daemon on 127.0.0.1 with the embedded instance;
its GraphQL API lists the quickstart's assets, and a run launched through it materializes one."""

from pathlib import Path

from dagster_server import dev_server, graphql, launch_assets, wait_for_run

from tests_support import EXAMPLES


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
