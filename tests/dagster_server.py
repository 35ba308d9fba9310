"""A real `tunegraph dev` (Dagster webserver + daemon) for tests, and GraphQL helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/graphql",
                             json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


@contextmanager
def dev_server(workdir: Path, recipes: Path, extra_args: tuple[str, ...] = ()) -> Iterator[int]:
    """Run `tunegraph dev` in `workdir` (its .tunegraph/ lives there) until the block ends;
    yields the port once GraphQL answers."""
    port = free_port()
    env = dict(os.environ, TUNEGRAPH_HOME=str(workdir / ".tunegraph"))
    log_path = workdir / "dev.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tunegraph.cli", "dev", "--recipes", str(recipes),
             "--port", str(port), *extra_args], cwd=workdir, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert process.poll() is None, log_path.read_text()[-3000:]
                try:
                    if graphql(port, "{ version }"):
                        break
                except (requests.RequestException, AssertionError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(log_path.read_text()[-3000:]) from None
                    time.sleep(2)
            yield port
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def wait_for_run(port: int, run_id: str, timeout_s: float = 600) -> str:
    """Poll a run until it ends; returns its final status."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = graphql(port, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                         {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2)
    raise TimeoutError(f"run {run_id} still {status} after {timeout_s} s")


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


def launch_assets(port: int, asset_paths: list[list[str]], partition: str | None = None) -> str:
    """Launch a run materializing the given assets (one partition of them, if given), as the UI's
    Materialize button does."""
    repos = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                          "location { name } } } } }")["repositoriesOrError"]["nodes"]
    params = {"selector": {"repositoryLocationName": repos[0]["location"]["name"],
                           "repositoryName": repos[0]["name"], "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": p} for p in asset_paths]},
              "runConfigData": {}}
    if partition:
        params["executionMetadata"] = {"tags": [{"key": "dagster/partition", "value": partition}]}
    launched = graphql(port, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]
