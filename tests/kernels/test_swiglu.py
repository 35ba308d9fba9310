"""SwiGLU / GeGLU kernels (tunegraph/kernels/swiglu.py) against a float64 reference and HF's MLP
activations (LlamaMLP's silu, GemmaMLP's gelu_pytorch_tanh): output and both gradients, fp32 and
bf16, sizes that are not multiples of the kernel's 2048-element block. On CPU through Triton's
interpreter at small sizes; `gpu` tests at real sizes."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from tunegraph.kernels.swiglu import geglu, glu_reference, swiglu

# fp32: fp32 arithmetic per element, measured ~6e-8 against float64; 1e-5 leaves room for
# another exp/sigmoid implementation (GPU's fast exp) while a wrong derivative is off by 1e-1.
FP32_TOL = 1e-5
# bf16: the forward rounds twice as HF does (the activation to bf16, then the product), each
# off by at most 2^-8 relative; the gradients round once. Measured 3e-3 to 6.3e-3 against
# float64; 4 x 2^-8 bounds two roundings with margin.
BF16_TOL = 4 * 2**-8
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# Elements: 1, a prime, a 2-d shape whose size is not a multiple of 2048, one past two blocks.
SHAPES = [(1,), (127,), (3, 5, 301), (4099,)]
KERNELS = {"silu": swiglu, "gelu_pytorch_tanh": geglu}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


def inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    gate, up, dc = (torch.randn(*shape, generator=gen).mul(2).to(dtype).to(device)
                    for _ in range(3))
    return gate, up, dc


def grads(fn, gate, up, dc, *, nonleaf=False, **kwargs):
    """(c, dgate, dup). `nonleaf` feeds fn projections' stand-ins (gate * 1), as an MLP does."""
    gate_leaf, up_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g, u = (gate_leaf * 1, up_leaf * 1) if nonleaf else (gate_leaf, up_leaf)
    c = fn(g, u, **kwargs)
    c.backward(dc)
    return c, gate_leaf.grad, up_leaf.grad


@pytest.mark.parametrize("act", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference_and_hf(shape, dtype, act, device):
    gate, up, dc = inputs(shape, dtype, device, seed=sum(shape))
    got = grads(KERNELS[act], gate, up, dc)
    gelu = act != "silu"
    want = grads(lambda g, u: glu_reference(g, u, gelu=gelu), gate.double(), up.double(),
                 dc.double())
    hf = grads(lambda g, u: ACT2FN[act](g) * u, gate, up, dc)  # LlamaMLP / GemmaMLP's middle
    for name, a, b, h in zip(("c", "dgate", "dup"), got, want, hf, strict=True):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], f"{name} vs float64"
        assert rel_err(a, h) < TOL[dtype], f"{name} vs HF"


@pytest.mark.parametrize("act", sorted(KERNELS))
def test_inplace_backward_gives_the_same_gradients(act, device):
    gate, up, dc = inputs((3, 301), torch.bfloat16, device, seed=5)
    plain = grads(KERNELS[act], gate, up, dc, nonleaf=True)
    inplace = grads(KERNELS[act], gate, up, dc, nonleaf=True, inplace_backward=True)
    for a, b in zip(plain, inplace, strict=True):
        assert torch.equal(a, b)


def test_inplace_backward_never_overwrites_leaves(device):
    """Leaves are the caller's tensors: they keep their values (the kernel allocates)."""
    gate, up, dc = inputs((301,), torch.float32, device, seed=6)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    swiglu(g, u, inplace_backward=True).backward(dc)
    assert torch.equal(g.detach(), gate) and torch.equal(u.detach(), up)


def test_inplace_backward_fails_loudly_when_gate_is_saved_elsewhere(device):
    """The in-place backward bumps gate's version: an op that saved gate for its own backward
    (and runs its backward later: it was recorded earlier) raises instead of reading gradients
    as activations."""
    gate, up, dc = inputs((301,), torch.float32, device, seed=7)
    leaf = gate.clone().requires_grad_()
    g = leaf * 1
    squares = (g * g).sum()  # saves g
    u = up.clone().requires_grad_() * 1
    loss = (swiglu(g, u, inplace_backward=True) * dc).sum() + squares
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mismatched_inputs_are_an_error(device):
    gate, up, _ = inputs((8,), torch.float32, device, seed=8)
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(gate, up[:7])


@pytest.mark.parametrize("act", sorted(KERNELS))
def test_under_torch_compile(act, device):
    """fullgraph torch.compile through the custom ops equals eager (CPU: aot_eager, see
    test_rms_norm.test_under_torch_compile)."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    gate, up, dc = inputs((5, 97), torch.float32, device, seed=9)
    fn = KERNELS[act]
    compiled = torch.compile(lambda g, u: fn(g, u, inplace_backward=True), backend=backend,
                             fullgraph=True)
    for a, b in zip(grads(compiled, gate, up, dc, nonleaf=True), grads(fn, gate, up, dc), strict=True):
        assert rel_err(a, b) < FP32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("act", sorted(KERNELS))
@pytest.mark.parametrize("shape", [(2048, 14336), (16384, 4096), (4097, 11008)])
def test_real_sizes_on_gpu(shape, act):
    for dtype in (torch.bfloat16, torch.float32):
        gate, up, dc = inputs(shape, dtype, "cuda", seed=shape[0])
        got = grads(KERNELS[act], gate, up, dc, nonleaf=True, inplace_backward=True)
        want = grads(lambda g, u: glu_reference(g, u, gelu=act != "silu"), gate.double(),
                     up.double(), dc.double())
        hf = grads(lambda g, u: ACT2FN[act](g) * u, gate, up, dc)
        for a, b, h in zip(got, want, hf, strict=True):
            assert rel_err(a, b) < TOL[dtype] and rel_err(a, h) < TOL[dtype]
