"""Start training on several processes with torchrun or accelerate, and collect rank errors.

    spec = LaunchSpec(launcher="torchrun", num_processes=2)
    metrics = launch_training(spec, recipe, base_dir, tokenized_dir, out_dir)

The processes run `tunegraph.resources.launch_worker`, which calls the same `ops.train.train` an
in-process run calls; transformers/accelerate pick up torchrun's RANK/WORLD_SIZE and shard as the
recipe's `fsdp`/`deepspeed` keys say (gloo on CPUs, NCCL on GPUs). Rank 0 writes `log.json`
(read back here) and, under Dagster, reports through dagster-pipes (tunegraph.resources.launcher).

A failing rank fails the launch: each rank writes its traceback to `_launch/errors/rank-<N>.txt`,
torchrun stops the other ranks (`--max-restarts 0`), and `LaunchError` names the rank and its
error. A rank killed by a signal leaves no traceback; the error then quotes torchrun's report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunegraph.config import Recipe

LAUNCHERS = ("python", "torchrun", "accelerate")
WORKER_MODULE = "tunegraph.resources.launch_worker"
LAUNCH_DIR = "_launch"


class LaunchError(RuntimeError):
    """A distributed training run failed; the message names the failing rank and its error.

    `exception_type` is the failing rank's exception class name ("ValueError", ...), or None when
    no rank reported one (killed by a signal, a timeout)."""

    def __init__(self, message: str, exception_type: str | None = None):
        super().__init__(message)
        self.exception_type = exception_type


@dataclass(frozen=True)
class LaunchSpec:
    """How training runs: in this process ("python"), or N processes on this machine."""

    launcher: Literal["python", "torchrun", "accelerate"] = "python"
    num_processes: int = 1
    # Wall-clock limit for the whole launch; None: no limit (Dagster's max runtime still applies).
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher: unknown launcher '{self.launcher}' "
                             f"(supported: {', '.join(LAUNCHERS)})")
        if self.num_processes < 1:
            raise ValueError(f"num_processes: must be at least 1, got {self.num_processes}")
        if self.launcher == "python" and self.num_processes > 1:
            raise ValueError("num_processes > 1 needs launcher torchrun or accelerate")

    @property
    def distributed(self) -> bool:
        return self.launcher != "python"

    @property
    def world_size(self) -> int:
        return self.num_processes


def launch_command(spec: LaunchSpec, job_file: Path, log_dir: Path) -> list[str]:
    """The command line that starts `spec.num_processes` workers on `job_file`."""
    worker = ["-m", WORKER_MODULE, str(job_file)]
    if spec.launcher == "torchrun":
        # --standalone: a local rendezvous on a free port; --max-restarts 0: one failing rank
        # ends the run (the retry policy of the Dagster asset decides about retries).
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(spec.num_processes), "--max-restarts", "0",
                "--log-dir", str(log_dir), "--tee", "3", *worker]
    if spec.launcher == "accelerate":
        import torch

        # Precision and sharding come from the recipe through TrainingArguments; the explicit
        # flags below override what `accelerate config` may have saved on the machine.
        if not torch.cuda.is_available() and spec.num_processes > 1:
            # `accelerate launch --cpu` starts one process (several CPU processes need MPI).
            raise ValueError("launcher accelerate: several processes run on CUDA GPUs only; on "
                             "CPUs use --launcher torchrun (gloo)")
        where = ["--multi_gpu"] if spec.num_processes > 1 else []
        return [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes",
                str(spec.num_processes), "--num_machines", "1", "--dynamo_backend", "no",
                "--mixed_precision", "no", *worker]
    return [sys.executable, *worker]


def write_job(recipe: Recipe, base_dir: Path, tokenized_dir: Path, out_dir: Path) -> Path:
    """The job file workers read: the resolved recipe (overrides applied) and the folders."""
    launch_dir = out_dir / LAUNCH_DIR
    (launch_dir / "errors").mkdir(parents=True, exist_ok=True)
    for stale in [*(launch_dir / "errors").glob("rank-*.txt"), *(launch_dir / "pids").glob("rank-*")]:
        stale.unlink()  # a retry starts with no errors or processes of the failed attempt
    job = {"recipe": recipe.model_dump(mode="json", exclude_unset=True), "name": recipe.name,
           "source_path": str(recipe.source_path) if recipe.source_path else None,
           "off_keys": list(recipe.off_keys), "base_dir": str(base_dir),
           "tokenized_dir": str(tokenized_dir), "out_dir": str(out_dir)}
    job_file = launch_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    return job_file


def read_job(job_file: Path) -> tuple[Recipe, Path, Path, Path]:
    job = json.loads(Path(job_file).read_text())
    recipe = Recipe.model_validate(job["recipe"]).bind_source(
        job["name"], Path(job["source_path"]) if job["source_path"] else None,
        tuple(job["off_keys"]))
    return recipe, Path(job["base_dir"]), Path(job["tokenized_dir"]), Path(job["out_dir"])


def rank_errors(out_dir: Path) -> dict[int, str]:
    """Tracebacks the ranks wrote before exiting with an error, by rank."""
    errors = {}
    for path in sorted((out_dir / LAUNCH_DIR / "errors").glob("rank-*.txt")):
        errors[int(path.stem.split("-")[1])] = path.read_text()
    return errors


# torchrun's (torch.distributed.elastic) failure summary names the first rank that failed.
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _failure(out_dir: Path, returncode: int, tail: list[str]) -> LaunchError:
    errors = rank_errors(out_dir)
    quoted = "\n".join(tail)
    root = ROOT_CAUSE.search(quoted)
    if root and int(root.group(1)) not in errors:
        # The first rank to fail left no traceback: a signal (SIGKILL, the OOM killer) or a
        # crash below Python; the other ranks' errors ("connection reset by peer") follow it.
        rank, code = int(root.group(1)), int(root.group(2))
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        also = "".join(f"; then rank {r} failed: {errors[r].strip().splitlines()[-1]}"
                       for r in sorted(errors)[:1])
        return LaunchError(f"rank {rank} exited with {how} and no Python error (killed, or out "
                           f"of memory?){also}; the launcher's last lines:\n{quoted}")
    if errors:
        rank = int(root.group(1)) if root else min(errors)
        others = f" (ranks {', '.join(map(str, sorted(errors)))} failed)" if len(errors) > 1 else ""
        last = errors[rank].strip().splitlines()[-1]
        return LaunchError(f"rank {rank} failed{others}: {last}\n\n{errors[rank]}",
                           last.split(":")[0].split(".")[-1].strip())
    reason = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    return LaunchError(f"distributed training failed ({reason}) and no rank reported a Python "
                       f"error; the launcher's last lines:\n{quoted}")


def launch_training(spec: LaunchSpec, recipe: Recipe, base_dir: Path, tokenized_dir: Path,
                    out_dir: Path, env: Mapping[str, str] | None = None,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run training on `spec.num_processes` processes; returns rank 0's metrics (log.json)."""
    job_file = write_job(recipe, base_dir, tokenized_dir, out_dir)
    log_dir = out_dir / LAUNCH_DIR / "logs"
    command = launch_command(spec, job_file, log_dir)
    child_env = {**os.environ, **(env or {})}
    if spec.num_processes > 1:
        # One thread per rank unless asked otherwise (torchrun does this too, with a warning).
        child_env.setdefault("OMP_NUM_THREADS", "1")
    tail: deque[str] = deque(maxlen=60)
    with open(out_dir / LAUNCH_DIR / "launcher.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        # A session of its own, so a timeout stops the launcher and every rank it started.
        process = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        reader = threading.Thread(target=_pump, args=(process, log, tail, echo), daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise LaunchError(f"distributed training ran past the launcher's timeout "
                              f"({spec.timeout_s} s); every rank was stopped") from None
        except BaseException:
            _stop(process)
            raise
        finally:
            reader.join(timeout=10)
    if returncode != 0:
        raise _failure(out_dir, returncode, list(tail))
    log_file = out_dir / "log.json"
    if not log_file.is_file():
        raise LaunchError(f"distributed training exited 0 but rank 0 wrote no {log_file}")
    return json.loads(log_file.read_text())["metrics"]


def _pump(process: subprocess.Popen, log: Any, tail: deque[str],
          echo: Callable[[str], None] | None) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        log.flush()
        tail.append(line.rstrip("\n"))
        if echo:
            echo(line.rstrip("\n"))


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's process group, then SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return
            time.sleep(0.1)


@dataclass
class Launcher:
    """Runs the training of a train stage: in this process, or as `spec` says."""

    spec: LaunchSpec = LaunchSpec()
    echo: Callable[[str], None] | None = None

    def train(self, recipe: Recipe, base_dir: Path, tokenized_dir: Path, out_dir: Path,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        if not self.spec.distributed:
            from tunegraph.ops.train import train

            return train(recipe, base_dir, tokenized_dir, out_dir, progress)
        return launch_training(self.spec, recipe, base_dir, tokenized_dir, out_dir,
                               env=self.env(), echo=self.echo)

    def env(self) -> dict[str, str]:
        """Extra environment for the workers (the Dagster launcher adds the pipes context)."""
        return {}
