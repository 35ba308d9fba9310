"""RMSNorm kernels (tunegraph/kernels/rms_norm.py) against a float64 reference and HF's
LlamaRMSNorm / GemmaRMSNorm: output, input gradient and weight gradient, Llama and Gemma
conventions, fp32 and bf16, odd and prime hidden sizes. On CPU through Triton's interpreter at
small sizes; `gpu` tests at real sizes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunegraph.kernels.rms_norm import rms_norm, rms_norm_reference

# fp32: the kernel computes in fp32 like the reference's rounding-free float64 up to ~1e-7
# (measured); 1e-5 leaves room for another reduction order (GPU tree sums over 4K columns)
# while any wrong term in a formula is off by 1e-2 or more.
FP32_TOL = 1e-5
# bf16: each bf16 rounding is off by at most 2^-8 relative; HF's forward rounds twice (the
# normalised row cast to bf16, then the product), and HF's own backward rounds its bf16
# intermediates (dy * w) where the kernel keeps fp32. Measured 2e-3 to 6e-3 against float64;
# 4 x 2^-8 bounds two roundings with margin.
BF16_TOL = 4 * 2**-8
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# (leading shape, hidden): a single row, odd/prime hidden sizes below and above one 2048-wide
# tile (4099: an 8192-wide block, mostly masked), several leading dims.
SHAPES = [((1,), 8), ((3,), 127), ((2, 5), 96), ((3,), 4099)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


def inputs(lead, hidden, dtype, gemma, device, seed):
    """Fresh random x, weight (around 1 for Llama, around 0 for Gemma's 1 + w) and dy."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen).mul(3).to(dtype)
    weight = (torch.randn(hidden, generator=gen) * 0.2 + (0.0 if gemma else 1.0)).to(dtype)
    dy = torch.randn(*lead, hidden, generator=gen).to(dtype)
    return x.to(device), weight.to(device), dy.to(device)


def kernel_grads(x, weight, dy, gemma, **kwargs):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = rms_norm(x, weight, 1e-6, gemma=gemma, **kwargs)
    # dy is cloned: the in-place backward writes dx over it.
    y.backward(dy.clone())
    return y, x.grad, weight.grad


def reference_grads(x, weight, dy, gemma, dtype=torch.float64):
    x = x.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    y = rms_norm_reference(x, weight, 1e-6, gemma=gemma)
    y.backward(dy.to(y.dtype))
    return y, x.grad, weight.grad


def hf_grads(x, weight, dy, gemma):
    module = (GemmaRMSNorm(x.shape[-1], eps=1e-6) if gemma
              else LlamaRMSNorm(x.shape[-1], eps=1e-6)).to(x.device, weight.dtype)
    module.weight.data.copy_(weight)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_matches_float64_reference_and_hf(lead, hidden, dtype, gemma, device):
    x, weight, dy = inputs(lead, hidden, dtype, gemma, device, seed=hidden)
    got = kernel_grads(x, weight, dy, gemma)
    assert [t.dtype for t in got] == [dtype] * 3
    for name, a, b in zip(("y", "dx", "dweight"), got, reference_grads(x, weight, dy, gemma), strict=True):
        assert rel_err(a, b) < TOL[dtype], f"{name} vs float64"
    for name, a, b in zip(("y", "dx", "dweight"), got, hf_grads(x, weight, dy, gemma), strict=True):
        assert rel_err(a, b) < TOL[dtype], f"{name} vs HF"


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_inplace_backward_gives_the_same_gradients(gemma, device):
    x, weight, dy = inputs((4, 3), 127, torch.bfloat16, gemma, device, seed=1)
    plain, inplace = kernel_grads(x, weight, dy, gemma), kernel_grads(
        x, weight, dy, gemma, inplace_backward=True)
    for a, b in zip(plain, inplace, strict=True):
        assert torch.equal(a, b)


def test_llama_output_follows_hf_dtype_promotion(device):
    """bf16 activations with an fp32 weight (mixed precision): HF's `weight * h.to(bf16)` is
    fp32, and so is the kernel's output; the input gradient stays bf16."""
    x, weight, dy = inputs((5,), 64, torch.bfloat16, False, device, seed=2)
    weight = weight.float()
    got = kernel_grads(x, weight, dy.float(), False)
    want = hf_grads(x, weight, dy.float(), False)
    assert (got[0].dtype, got[1].dtype, got[2].dtype) == (torch.float32, torch.bfloat16,
                                                          torch.float32)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < BF16_TOL


def test_wrong_weight_shape_is_an_error(device):
    x, weight, _ = inputs((2,), 16, torch.float32, False, device, seed=3)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, weight[:15])


def test_under_torch_compile(device):
    """The custom ops trace under torch.compile (fullgraph: no graph break) and give the eager
    numbers. On CPU the aot_eager backend: dynamo and AOTAutograd with the ops' fake and autograd
    registrations, without Inductor's C++ build (30 s on this machine's two cores)."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    x, weight, dy = inputs((6,), 96, torch.float32, False, device, seed=4)
    compiled = torch.compile(lambda x, w: rms_norm(x, w, 1e-6), backend=backend, fullgraph=True)
    xc, wc = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = compiled(xc, wc)
    y.backward(dy)
    for a, b in zip((y, xc.grad, wc.grad), kernel_grads(x, weight, dy, False), strict=True):
        assert rel_err(a, b) < FP32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("rows,hidden", [(2048, 4096), (4097, 5120), (16384, 4096), (31, 8191)])
def test_real_sizes_on_gpu(rows, hidden, gemma):
    for dtype in (torch.bfloat16, torch.float32):
        x, weight, dy = inputs((rows,), hidden, dtype, gemma, "cuda", seed=rows)
        got = kernel_grads(x, weight, dy, gemma)
        for a, b in zip(got, reference_grads(x, weight, dy, gemma), strict=True):
            assert rel_err(a, b) < TOL[dtype]
        for a, b in zip(got, hf_grads(x, weight, dy, gemma), strict=True):
            assert rel_err(a, b) < TOL[dtype]
