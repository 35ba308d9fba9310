"""tunegraph.ops.train.ProgressCallback: optimizer-step times, on the host clock without a GPU
and from CUDA events with one (apart from test_train.py, whose fixture hides the GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tunegraph.ops.train import ProgressCallback


def _time_steps(callback, work: Callable[[], Any], steps: int = 3) -> None:
    for _ in range(steps):
        callback.on_step_begin(None, None, None)
        work()
        callback.on_step_end(None, None, None)


def test_progress_callback_times_steps_on_the_host_clock_without_a_gpu():
    callback = ProgressCallback(None)
    _time_steps(callback, lambda: torch.randn(256, 256) @ torch.randn(256, 256))
    assert len(callback.step_seconds()) == 3 and all(s > 0 for s in callback.step_seconds())
    assert callback.median_step_s(warmup=1) == pytest.approx(sum(callback.step_seconds()[1:]) / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_progress_callback_times_gpu_steps_with_events_and_no_sync(monkeypatch):
    """On a GPU the steps are timed by CUDA events: no torch.cuda.synchronize at step
    boundaries, and the times cover the queued GPU work (not just its launch)."""
    callback = ProgressCallback(None)
    a = torch.randn(8192, 8192, device="cuda")
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append(args))
    _time_steps(callback, lambda: [a @ a for _ in range(20)])  # ~20 x 1.1 TFLOP: ~50 ms fp32
    assert syncs == []
    seconds = callback.step_seconds()
    assert len(seconds) == 3 and all(s > 0.005 for s in seconds), seconds
