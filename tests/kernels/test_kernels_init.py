"""tunegraph/kernels/__init__.py: the host helpers every kernel call runs, and the eager path.

The host path sets the time of small kernel calls (benchmarks/NOTES.md, K1), so eager calls go
through autograd.Functions and host arithmetic avoids triton's constexpr functions; these tests
pin the arithmetic to triton's and the eager path to the Functions."""

from __future__ import annotations

import pytest
import torch
import triton

from tunegraph.kernels import (
    apply_rotary,
    cdiv,
    is_dense,
    next_power_of_2,
    rms_norm,
    swiglu,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 127, 128, 129, 4095, 4096, 65537])
def test_next_power_of_2_matches_triton(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize(("a", "b"), [(0, 4), (1, 4), (4, 4), (5, 4), (2048, 1024),
                                      (2049, 1024), (2**40 + 1, 7)])
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)


def test_is_dense():
    x = torch.empty(4, 6)
    assert is_dense(x) and is_dense(x.t()) and is_dense(x.view(2, 2, 6).transpose(0, 2))
    assert not is_dense(x[:, :3]) and not is_dense(torch.empty(6).expand(4, 6))


def test_eager_calls_use_the_autograd_functions(device):
    """Not the custom ops (those are for torch.compile): their dispatch costs the host more."""
    x = torch.randn(3, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    assert type(rms_norm(x, w).grad_fn).__name__ == "_RMSNormFunctionBackward"
    gate, up = (torch.randn(3, 64, device=device, requires_grad=True) for _ in range(2))
    assert type(swiglu(gate, up).grad_fn).__name__ == "_GLUFunctionBackward"
    q = torch.randn(1, 4, 5, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    cos, sin = torch.randn(1, 5, 8, device=device), torch.randn(1, 5, 8, device=device)
    q_out, _ = apply_rotary(q, k, cos, sin)
    assert "_RopeFunction" in type(q_out.grad_fn).__name__
