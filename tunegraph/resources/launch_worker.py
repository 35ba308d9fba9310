"""One training process of a distributed run (started by torchrun or accelerate launch).

    torchrun --nproc-per-node 2 -m tunegraph.resources.launch_worker OUT/_launch/job.json

Every rank runs `tunegraph.ops.train.train` on the job tunegraph.ops.launch wrote. Rank 0 alone
reports to Dagster through dagster-pipes when the launch came from an asset (the pipes context is
in its environment): progress as log lines, the final metrics as a custom message. A rank that
raises writes its traceback to `_launch/errors/rank-<N>.txt` first, so the launcher can say which
rank failed and why.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path

from tunegraph.ops.launch import LAUNCH_DIR, read_job

# Progress lines at most this often (in steps): enough to follow a run in the UI.
PROGRESS_EVERY = 10


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(job_file: str) -> None:
    rank = _rank()
    recipe, base_dir, tokenized_dir, out_dir = read_job(Path(job_file))
    pids = out_dir / LAUNCH_DIR / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank-{rank}").write_text(str(os.getpid()))  # which process is which rank
    try:
        with ExitStack() as stack:
            pipes = None
            if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
                from dagster_pipes import open_dagster_pipes

                pipes = stack.enter_context(open_dagster_pipes())

            reported: set[int] = set()

            def progress(stage: str, done: int, total: int) -> None:
                if pipes is not None and done not in reported and (
                        done % PROGRESS_EVERY == 0 or done == total):
                    reported.add(done)  # the Trainer logs the last step twice (loss, summary)
                    pipes.log.info(f"{stage}: step {done}/{total} "
                                   f"(world size {os.environ.get('WORLD_SIZE', '1')})")

            from tunegraph.ops.train import train

            metrics = train(recipe, base_dir, tokenized_dir, out_dir,
                            progress if rank == 0 else None)
            if pipes is not None:
                pipes.report_custom_message({"metrics": {k: v for k, v in metrics.items()
                                                         if k != "losses"}})
    except BaseException:
        errors = out_dir / LAUNCH_DIR / "errors"
        errors.mkdir(parents=True, exist_ok=True)
        (errors / f"rank-{rank}.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tunegraph.resources.launch_worker JOB_JSON")
    main(sys.argv[1])
