"""`tunegraph dev` starts Dagster's webserver and daemon on 127.0.0.1 with the embedded instance;
its GraphQL API lists the quickstart's assets, and a run launched through it materializes one."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests_support import REPO

STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/graphql",
                             json={"query": query, "variables": variables or {}}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture
def dev_server(tmp_path: Path):
    port = _free_port()
    env = dict(os.environ, TUNEGRAPH_HOME=str(tmp_path / ".tunegraph"))
    log = open(tmp_path / "dev.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tunegraph.cli", "dev", "--recipes", str(REPO / "examples"),
         "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            try:
                if _graphql(port, "{ version }"):
                    break
            except (requests.RequestException, AssertionError):
                if time.monotonic() > deadline:
                    raise TimeoutError((tmp_path / "dev.log").read_text()[-3000:]) from None
                time.sleep(2)
        yield port, tmp_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def test_dev_lists_assets_and_materializes_from_graphql(dev_server):
    port, tmp_path = dev_server
    nodes = _graphql(port, "{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }")
    keys = {"/".join(n["assetKey"]["path"]): n for n in nodes["assetNodes"]}
    for name in ("tokenized_dataset", "adapter", "merged_model", "eval_scores"):
        assert f"quickstart/{name}" in keys
        assert keys[f"quickstart/{name}"]["groupName"] == "quickstart"
    tokenized = keys["quickstart/tokenized_dataset"]
    base = "/".join(tokenized["dependencyKeys"][0]["path"])
    assert base.startswith("base_models/tiny_llama_")

    # Launch a run of base model + tokenized dataset, as the UI's "Materialize" button does.
    repos = _graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                           "location { name } } } } }")["repositoriesOrError"]["nodes"]
    params = {"selector": {"repositoryLocationName": repos[0]["location"]["name"],
                           "repositoryName": repos[0]["name"], "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": base.split("/")},
                                              {"path": ["quickstart", "tokenized_dataset"]}]},
              "runConfigData": {}}
    launched = _graphql(port, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = _graphql(port, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                          {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", (tmp_path / "dev.log").read_text()[-3000:]
    # The run wrote its artifacts to the instance's project folder.
    assert list((tmp_path / ".tunegraph" / "artifacts" / "tokenized").glob("*/manifest.json"))
