"""GPU pools on the embedded instance (tunegraph/pipelines/instance.py): two processes that
materialize GPU-pool assets against one SQLite instance never overlap at limit 1 and do at
limit 2; a process killed while holding the slot does not hold it forever (the real
dagster-daemon's run monitoring ends the run at its max runtime, then frees the slot); the
embedded dagster.yaml's settings and the ways to set the limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import DagsterInstance, DagsterRunStatus

from tunegraph.pipelines import embedded_instance, ensure_dagster_home
from tunegraph.pipelines.instance import (
    DAGSTER_YAML,
    GPU_POOL,
    GPU_POOL_LIMIT_ENV,
    PREVIOUS_DAGSTER_YAMLS,
    set_gpu_pool_limit,
)

# A GPU-pool asset (as train, merge and eval are) that records when it ran. Every worker waits at a file barrier before
# materializing, so the runs start together whatever each process's import time was.
WORKER = '''
import json, sys, time
from pathlib import Path
from dagster import DagsterInstance, asset, materialize

home, name, folder, hold_s, workers = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])

@asset(name=name, pool="gpu")
def gpu_step():
    start = time.time()
    (folder / f"{name}.started").write_text(str(start))
    time.sleep(hold_s)
    (folder / f"{name}.json").write_text(json.dumps({"start": start, "end": time.time()}))

(folder / f"{name}.ready").touch()
while len(list(folder.glob("*.ready"))) < workers:
    time.sleep(0.05)
# The instance tunegraph's embedded dagster.yaml configures (the test wrote it); importing
# tunegraph.pipelines here would add torch's import time to every worker.
with DagsterInstance.from_config(str(Path(home) / "dagster_home")) as instance:
    tags = {"dagster/max_runtime": sys.argv[6]} if len(sys.argv) > 6 else {}
    result = materialize([gpu_step], instance=instance, tags=tags)
    (folder / f"{name}.run").write_text(result.run_id)
'''
HOLD_S = 4.0
# Dagster re-checks a blocked claim after 1 s, growing by 1.1x per attempt: a waiting step
# starts within about 2 s of the slot being freed.
TIMEOUT_S = 180


def _start(script: Path, home: Path, name: str, folder: Path, workers: int, *extra: str):
    return subprocess.Popen([sys.executable, str(script), str(home), name, str(folder),
                             str(HOLD_S), str(workers), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_two(tmp_path: Path, home: Path, label: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    folder = tmp_path / label
    folder.mkdir()
    # Create the SQLite storage first: two processes creating it at once race on its schema
    # version (alembic "more than one head").
    embedded_instance(home).dispose()
    workers = [_start(script, home, f"{label}_{i}", folder, 2) for i in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=TIMEOUT_S)
        assert worker.returncode == 0, output[-3000:]
    with DagsterInstance.from_config(str(ensure_dagster_home(home))) as instance:
        runs = []
        for i in range(2):
            times = json.loads((folder / f"{label}_{i}.json").read_text())
            record = instance.get_run_record_by_id((folder / f"{label}_{i}.run").read_text())
            runs.append({**times, "run_start": record.start_time})
    return sorted(runs, key=lambda r: r["start"])


def test_gpu_pool_limit_one_serializes_two_processes_and_two_lets_them_overlap(tmp_path: Path):
    home = tmp_path / ".tunegraph"
    first, second = _run_two(tmp_path, home, "limit1")
    # Both runs were in progress together (the second started before the first's step ended),
    # yet the GPU steps did not overlap: the second waited for the slot.
    assert second["run_start"] < first["end"], (first, second)
    assert second["start"] >= first["end"], (first, second)

    with embedded_instance(home) as instance:
        set_gpu_pool_limit(instance, 2)
    first, second = _run_two(tmp_path, home, "limit2")
    assert second["start"] < first["end"], (first, second)


def test_a_killed_run_does_not_hold_the_gpu_slot_forever(tmp_path: Path):
    """kill -9 mid-step leaves the run STARTED with the slot claimed; the real daemon's run
    monitoring fails it at its max runtime (tag dagster/max_runtime) and frees the slot."""
    home = tmp_path / ".tunegraph"
    dagster_home = ensure_dagster_home(home)
    # The embedded settings, with intervals a test can wait for (production: 60 s each).
    config = dagster_home / "dagster.yaml"
    config.write_text(config.read_text()
                      .replace("poll_interval_seconds: 60", "poll_interval_seconds: 1")
                      .replace("free_slots_after_run_end_seconds: 60",
                               "free_slots_after_run_end_seconds: 1"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    folder = tmp_path / "killed"
    folder.mkdir()
    embedded_instance(home).dispose()
    worker = _start(script, home, "doomed", folder, 1, "3")
    deadline = time.monotonic() + TIMEOUT_S
    while not (folder / "doomed.started").exists():
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()[-3000:]
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert len(info.claimed_slots) == 1
        run_id = info.claimed_slots[0].run_id
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED

        (tmp_path / "defs.py").write_text("from dagster import Definitions\ndefs = Definitions()\n")
        log = open(tmp_path / "daemon.log", "w")
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-f",
             str(tmp_path / "defs.py")], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, DAGSTER_HOME=str(dagster_home)), start_new_session=True)
        try:
            while instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(1)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)
            log.close()
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        assert "maximum runtime" in (tmp_path / "daemon.log").read_text()


def test_embedded_dagster_yaml_sets_pools_and_run_monitoring(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(GPU_POOL_LIMIT_ENV, raising=False)
    with embedded_instance(tmp_path / "a") as instance:
        pools = instance.get_concurrency_config().pool_config
        assert (pools.default_pool_limit, pools.pool_granularity.value) == (1, "op")
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit == 1
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds == 86400
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60

    monkeypatch.setenv(GPU_POOL_LIMIT_ENV, "3")
    with embedded_instance(tmp_path / "a") as instance:
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit == 3
    for bad, message in (("two", "is not a whole number"), ("0", "would let no GPU step run")):
        monkeypatch.setenv(GPU_POOL_LIMIT_ENV, bad)
        with pytest.raises(ValueError, match=f"{GPU_POOL_LIMIT_ENV}: .*{message}"):
            embedded_instance(tmp_path / "a")


def test_dagster_yaml_upgrades_only_unedited_files(tmp_path: Path):
    old = tmp_path / "old" / "dagster_home"
    old.mkdir(parents=True)
    (old / "dagster.yaml").write_text(PREVIOUS_DAGSTER_YAMLS[0])
    ensure_dagster_home(tmp_path / "old")
    assert (old / "dagster.yaml").read_text() == DAGSTER_YAML

    edited = tmp_path / "edited" / "dagster_home"
    edited.mkdir(parents=True)
    (edited / "dagster.yaml").write_text(PREVIOUS_DAGSTER_YAMLS[0] + "# mine\n")
    ensure_dagster_home(tmp_path / "edited")
    assert (edited / "dagster.yaml").read_text().endswith("# mine\n")


def test_dev_sets_the_gpu_pool_limit_before_starting_dagster(tmp_path: Path, monkeypatch):
    """`tunegraph dev --gpu-pool-limit 2` writes the limit into the instance the UI uses; only
    the final exec of `dagster dev` (tested in test_dev.py) is replaced here."""
    from tunegraph import cli

    started = []
    monkeypatch.setattr(cli.os, "execvpe", lambda *args: started.append(args))
    monkeypatch.delenv(GPU_POOL_LIMIT_ENV, raising=False)
    monkeypatch.setenv("TUNEGRAPH_HOME", str(tmp_path / ".tunegraph"))
    from tests_support import EXAMPLES

    result = CliRunner().invoke(cli.main, ["dev", "--recipes", str(EXAMPLES),
                                           "--gpu-pool-limit", "2"])
    assert result.exit_code == 0, result.output
    assert started  # dagster dev would start now
    with embedded_instance(tmp_path / ".tunegraph") as instance:
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).limit == 2

    result = CliRunner().invoke(cli.main, ["dev", "--recipes", str(EXAMPLES),
                                           "--gpu-pool-limit", "0"])
    assert result.exit_code != 0 and "would let no GPU step run" in result.output
