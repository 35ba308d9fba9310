"""Training on 2 processes (torchrun, gloo on this CPU): the same losses as 1 process at the same
global batch, outputs that load as plain HF/PEFT checkpoints, a killed rank that fails the launch
cleanly (named, no hang), and a relaunch that resumes from the last checkpoint. (A rank that
raises: tests/resources/test_launcher.py, through Dagster.)

Each launch starts torchrun and two Python processes that import torch and transformers: about
15 s before the first step on the 2-core CI machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from peft import PeftModel
from train_support import (
    GOLDEN_RTOL,
    RUNS,
    make,
    prepare_training,
    stored_golden,
)
from transformers import AutoModelForCausalLM

from tunegraph.ops.launch import (
    LAUNCH_DIR,
    LaunchError,
    LaunchSpec,
    launch_command,
    launch_training,
)
from tunegraph.ops.train import train

TWO = LaunchSpec("torchrun", 2, timeout_s=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Any]:
    """The golden runs' tiny base model and tokenized data (tests/train_support.py)."""
    folder = tmp_path_factory.mktemp("launch")
    return prepare_training(folder, make(folder))


def launch(prepared: dict[str, Any], out: Path, spec: LaunchSpec = TWO, **keys: Any
           ) -> dict[str, Any]:
    recipe = make(prepared["folder"], **keys)
    return launch_training(spec, recipe, prepared["base_dir"], prepared["tokenized_dir"], out)


def losses(metrics: dict[str, Any]) -> list[float]:
    return [loss for _, loss in metrics["losses"]]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_processes_match_the_one_process_golden_run(prepared, tmp_path, name):
    """2 ranks x micro_batch_size 2 = the golden run's global batch of 4. The Trainer sums each
    rank's token losses and divides by the tokens of both ranks (average_tokens_across_devices),
    DDP averages gradients, and accelerate deals the golden run's batches out row by row, so the
    per-step losses are the golden ones; gloo sums in another order (measured 1e-7 relative)."""
    metrics = launch(prepared, tmp_path, **RUNS[name], micro_batch_size=2, save_steps=6)
    assert metrics["world_size"] == 2
    assert losses(metrics) == pytest.approx(stored_golden(name), rel=GOLDEN_RTOL, abs=0)
    # The outputs are ordinary HF / PEFT folders, written once (by rank 0).
    final = tmp_path / ("adapter" if name == "lora_tiny" else "model")
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-12", "checkpoint-6"]
    base = AutoModelForCausalLM.from_pretrained(prepared["base_dir"])
    if name == "lora_tiny":
        model = PeftModel.from_pretrained(base, final)
        assert any("lora_A" in n for n, _ in model.named_parameters())
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(prepared["base_dir"]),
                                  tmp_path / "checkpoints" / "checkpoint-6")
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
        changed = [n for n, p in model.state_dict().items()
                   if not p.equal(base.state_dict()[n])]
        assert changed, "the saved model equals the base model: training saved nothing"
        AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "checkpoint-6")


def test_fsdp_on_cpu_is_an_error_not_silent_ddp(prepared, tmp_path):
    """accelerate turns FSDP on for GPU back ends only; on CPUs it would quietly run DDP."""
    recipe = make(prepared["folder"], **RUNS["full_tiny"], fsdp=["full_shard", "auto_wrap"])
    with pytest.raises(ValueError, match="fsdp: sharded training runs on CUDA GPUs"):
        train(recipe, prepared["base_dir"], prepared["tokenized_dir"], tmp_path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_rank_fails_cleanly_and_a_relaunch_resumes(prepared, tmp_path):
    """SIGKILL rank 1 once a checkpoint exists: torchrun stops rank 0 and the launch fails at
    once (no rank left waiting in a collective until a timeout). Launching again into the same
    folder resumes from the last checkpoint, and the resumed run's losses are those of an
    uninterrupted one-process run at the same global batch."""
    keys = {**RUNS["lora_tiny"], "max_steps": 60, "save_steps": 5}
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["metrics"] = launch(prepared, tmp_path, **keys, micro_batch_size=2)
        except LaunchError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    pid_file = tmp_path / LAUNCH_DIR / "pids" / "rank-1"
    deadline = time.monotonic() + 120
    # A complete checkpoint (trainer_state.json is written last): a kill during its writing would
    # leave nothing to resume from (under load, saving takes long enough for that).
    while not (tmp_path / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file():
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    pids = {int(p.name.split("-")[1]): int(p.read_text())
            for p in (tmp_path / LAUNCH_DIR / "pids").iterdir()}
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the launch still runs 60 s after a rank was killed"
    assert time.monotonic() - killed_at < 30
    assert "error" in outcome, "training finished before the kill: nothing was tested"
    assert str(outcome["error"]).startswith("rank 1 exited with signal 9 and no Python error "
                                            "(killed, or out of memory?)"), str(outcome["error"])
    assert outcome["error"].exception_type is None
    assert not any(_alive(pid) for pid in pids.values()), "a rank outlived the failed launch"

    saved = sorted(int(p.parent.name.split("-")[1])
                   for p in (tmp_path / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    resumed = launch(prepared, tmp_path, **keys, micro_batch_size=2)
    assert resumed["resumed_from_step"] == saved[-1] < 60
    reference = train(make(prepared["folder"], **keys), prepared["base_dir"],
                      prepared["tokenized_dir"], tmp_path / "reference")
    assert losses(resumed) == pytest.approx(losses(reference), rel=GOLDEN_RTOL, abs=0)


def test_launch_spec_is_checked():
    with pytest.raises(ValueError, match="launcher: unknown launcher 'mpirun'"):
        LaunchSpec("mpirun", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_processes > 1 needs launcher torchrun"):
        LaunchSpec("python", 2)
    with pytest.raises(ValueError, match="launcher accelerate: .* on CUDA GPUs only"):
        launch_command(LaunchSpec("accelerate", 2), Path("job.json"), Path("logs"))


def test_a_half_written_checkpoint_is_neither_resumed_nor_kept(tmp_path):
    """A rank killed while saving leaves `checkpoint-N` without trainer_state.json (seen on the
    GPU machine: the retry then failed to resume from it). Resume from the last complete one,
    and remove the rest before the ranks start."""
    from tunegraph.ops.train import discard_incomplete_checkpoints, last_complete_checkpoint

    folder = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(folder) == str(folder / "checkpoint-10")
    assert discard_incomplete_checkpoints(folder) == ["checkpoint-15"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert last_complete_checkpoint(tmp_path / "none") is None
