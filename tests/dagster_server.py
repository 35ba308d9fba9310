"""A real `tunegraph dev` (Dagster webserver + daemon) for tests, GraphQL helpers (runs,
backfills, sensors), and the quickstart recipe shrunk for them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

from tests_support import EXAMPLES

STARTUP_TIMEOUT_S = 300
# How often the waits below ask again: a GraphQL query costs the webserver milliseconds, while a
# coarser poll adds half its interval, on average, to every wait.
POLL_S = 1
# Backfill statuses after which the daemon launches nothing more (Dagster's BulkActionStatus).
BACKFILL_DONE = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")


def write_tiny_quickstart(folder: Path, schedule: str | None = None) -> Path:
    """The quickstart recipe and data in `folder`, trained for 20 steps instead of 360, with a
    checkpoint at step 10 (partitions quickstart__step-000010 and quickstart__final); with
    `schedule` (a cron string) the recipe gets that `schedule:` key (`quickstart_schedule`)."""
    (folder / "data").mkdir(parents=True)
    shutil.copy(EXAMPLES / "data" / "quickstart.jsonl", folder / "data")
    recipe = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    recipe.update(max_steps=20, save_steps=10, eval_generation_rows=8,
                  output_dir=str(folder / "outputs"))
    if schedule is not None:
        recipe["schedule"] = schedule
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


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
                    time.sleep(POLL_S)
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
        time.sleep(POLL_S)
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


def repository_selector(port: int) -> dict[str, str]:
    """The server's (first) repository, as GraphQL selectors name it."""
    repos = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                          "location { name } } } } }")["repositoriesOrError"]["nodes"]
    return {"repositoryLocationName": repos[0]["location"]["name"],
            "repositoryName": repos[0]["name"]}


# Run config for Dagster's in-process executor: the run's steps execute one after another in the
# run's own process. The default (multiprocess) executor spawns an interpreter per step, which
# imports tunegraph.pipelines.definitions (torch, transformers) again: 15-20 s on a 2-core machine
# for steps that then take about a second. Runs the daemon launches (backfills), and runs launched
# without this config (tests/pipelines/test_dev.py), keep the default executor.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def launch_assets(port: int, asset_paths: list[list[str]], partition: str | None = None,
                  run_config: dict | None = None) -> str:
    """Launch a run materializing the given assets (one partition of them, if given), as the UI's
    Materialize button does (with `run_config`, as its launchpad does with that config)."""
    params = {"selector": {**repository_selector(port), "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": p} for p in asset_paths]},
              "runConfigData": run_config or {}}
    if partition:
        params["executionMetadata"] = {"tags": [{"key": "dagster/partition", "value": partition}]}
    launched = graphql(port, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


LAUNCH_BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""


def launch_backfill(port: int, asset_paths: list[list[str]],
                    partitions: Sequence[str] | None = None, title: str | None = None) -> str:
    """Start an asset backfill of the given (partitioned) assets over `partitions`, or over all
    their partitions, as the UI's Materialize dialog does; the daemon launches its runs.
    Returns the backfill id."""
    params: dict = {"assetSelection": [{"path": p} for p in asset_paths]}
    if title:
        params["title"] = title
    if partitions is None:
        params["allPartitions"] = True
    else:
        params["partitionNames"] = list(partitions)
    launched = graphql(port, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      partitionNames
      assetBackfillData {
        assetBackfillStatuses {
          ... on AssetPartitionsStatusCounts {
            assetKey { path } numPartitionsTargeted numPartitionsInProgress
            numPartitionsMaterialized numPartitionsFailed
          }
          ... on UnpartitionedAssetStatus { assetKey { path } inProgress materialized failed }
        }
      }
      runs { runId status tags { key value } }
    }
    ... on PythonError { message }
    ... on BackfillNotFoundError { message }
  }
}"""


def backfill_state(port: int, backfill_id: str) -> dict:
    """The backfill's status, partition names, per-asset counts and runs (with their tags)."""
    state = graphql(port, BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
    assert state["__typename"] == "PartitionBackfill", state
    return state


def wait_for_backfill(port: int, backfill_id: str, timeout_s: float = 900) -> dict:
    """Poll a backfill until the daemon is done with it and none of its runs is still going;
    returns its last `backfill_state`."""
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = backfill_state(port, backfill_id)
        if state["status"] in BACKFILL_DONE and all(
                r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in state["runs"]):
            return state
        time.sleep(POLL_S)
    raise TimeoutError(f"backfill {backfill_id} still {state and state['status']} after "
                       f"{timeout_s} s: {state}")


SENSOR = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { id status } }
  }
}"""
STOP_SENSOR = """
mutation Stop($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
  }
}"""


def stop_sensor(port: int, name: str) -> None:
    """Switch a sensor off, as its toggle under Automation does (a test that launches its own
    runs keeps a sensor from launching the same ones)."""
    sensor = graphql(port, SENSOR, {"selector": {**repository_selector(port),
                                                 "sensorName": name}})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    stopped = graphql(port, STOP_SENSOR, {"id": sensor["sensorState"]["id"]})["stopSensor"]
    assert stopped["__typename"] == "StopSensorMutationResult", stopped
    assert stopped["instigationState"]["status"] == "STOPPED", stopped


REPOSITORY_AUTOMATIONS = """
query Automations($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) {
    ... on Repository {
      schedules { name scheduleState { id status } }
      sensors { name sensorState { id status } }
    }
  }
}"""
STOP_SCHEDULE = """
mutation Stop($id: String!) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on PythonError { message }
  }
}"""


def automations(port: int) -> dict[str, tuple[str, str]]:
    """{schedule or sensor name: (its instigation state id, RUNNING or STOPPED)}, as the
    Automation page lists them."""
    repo = graphql(port, REPOSITORY_AUTOMATIONS,
                   {"selector": repository_selector(port)})["repositoryOrError"]
    return {**{s["name"]: (s["scheduleState"]["id"], s["scheduleState"]["status"])
               for s in repo["schedules"]},
            **{s["name"]: (s["sensorState"]["id"], s["sensorState"]["status"])
               for s in repo["sensors"]}}


def stop_schedule(port: int, name: str) -> None:
    """Switch a schedule off, as its toggle under Automation does."""
    stopped = graphql(port, STOP_SCHEDULE, {"id": automations(port)[name][0]})
    assert stopped["stopRunningSchedule"].get("scheduleState") == {"status": "STOPPED"}, stopped
