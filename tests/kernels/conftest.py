"""Kernel tests: on a machine without CUDA the Triton kernels run on CPU tensors through Triton's
interpreter. `TRITON_INTERPRET` must be set before triton and tunegraph.kernels are imported
(triton.jit reads it when a kernel is defined), so it is set here, at collection."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "tunegraph.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("tunegraph.kernels was imported before tests/kernels/conftest.py "
                                "set TRITON_INTERPRET=1: its kernels cannot run on the CPU; run "
                                "with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels_really_run():
    """Every test here runs the kernels, never only the reference they are compared with: skip
    without triton, fail if the kernels would fall back."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernels]')")
    from tunegraph.kernels import use_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert use_triton(torch.empty(1, device=device)), "the kernels would not run here"
