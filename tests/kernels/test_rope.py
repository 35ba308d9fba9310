"""RoPE kernels (tunegraph/kernels/rope.py) against a float64 reference and HF's
apply_rotary_pos_emb with cos/sin from LlamaRotaryEmbedding: both outputs and both gradients,
GQA (fewer k heads), cos/sin per batch or broadcast, HF's transposed layout and contiguous
[B, T, H, D] (unsqueeze_dim=2), odd sizes. On CPU through Triton's interpreter at small sizes;
`gpu` tests at real sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tunegraph.kernels.rope import apply_rotary, apply_rotary_reference

# fp32: two products and a sum per element in fp32, measured ~4e-8 against float64; 1e-5
# leaves room for FMA contraction on a GPU while a sign or half swapped is off by ~1.
FP32_TOL = 1e-5
# bf16: the kernel rounds once (the output) where HF rounds three times (q*cos, rotate*sin,
# the sum), each at most 2^-8 relative; measured 3.2e-3 against float64. 4 x 2^-8 is margin
# over HF's three roundings.
BF16_TOL = 4 * 2**-8
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# (batch, q heads, k heads, tokens, head dim): GQA; a prime token count; an odd half head dim
# (9: masked lanes); MHA with cos/sin per batch row; and 13 + 3 heads of 126, enough per token
# for the one-token 2-d tiles (masked heads and lanes) that 7B-size attention takes.
SHAPES = [(2, 6, 2, 11, 18), (1, 4, 4, 7, 8), (3, 8, 1, 5, 64), (2, 13, 3, 7, 126)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


def inputs(shape, dtype, device, seed, cos_batch=1, hf_layout=True):
    """q, k (HF's layout: [B, T, H, D] projections transposed to [B, H, T, D]), random cos/sin
    whose two halves differ (so the backward's transpose is checked in general), and dq, dk."""
    batch, q_heads, k_heads, tokens, dim = shape
    gen = torch.Generator().manual_seed(seed)

    def heads(num):
        if hf_layout:
            return torch.randn(batch, tokens, num, dim, generator=gen).transpose(1, 2)
        return torch.randn(batch, num, tokens, dim, generator=gen)
    q, k, dq, dk = heads(q_heads), heads(k_heads), heads(q_heads), heads(k_heads)
    cos, sin = (torch.randn(cos_batch, tokens, dim, generator=gen) for _ in range(2))
    return [t.to(dtype).to(device) for t in (q, k, cos, sin, dq, dk)]


def grads(fn, q, k, cos, sin, dq, dk, **kwargs):
    """(q_embed, k_embed, dq, dk); the output gradients are cloned (in-place backward)."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_embed, k_embed = fn(q * 1, k * 1, cos, sin, **kwargs)  # * 1: fresh projections
    torch.autograd.backward((q_embed, k_embed), (dq.clone(), dk.clone()))
    return q_embed, k_embed, q.grad, k.grad


def float64(q, k, cos, sin, dq, dk, unsqueeze_dim=1):
    return grads(apply_rotary_reference, *(t.double() for t in (q, k, cos, sin, dq, dk)),
                 unsqueeze_dim=unsqueeze_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cos_batch", ["1", "B"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, cos_batch, dtype, device):
    tensors = inputs(shape, dtype, device, seed=sum(shape),
                     cos_batch=1 if cos_batch == "1" else shape[0])
    got = grads(apply_rotary, *tensors)
    for name, a, b in zip(("q", "k", "dq", "dk"), got, float64(*tensors), strict=True):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], name
    # The outputs keep the inputs' layout (HF's transposed views), as HF's elementwise ops do.
    assert got[0].stride() == tensors[0].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_hf_apply_rotary_pos_emb(dtype, device):
    batch, q_heads, k_heads, tokens, dim = 2, 8, 2, 13, 32
    config = LlamaConfig(hidden_size=q_heads * dim, num_attention_heads=q_heads,
                         num_key_value_heads=k_heads, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config).to(device)
    q, k, _, _, dq, dk = inputs((batch, q_heads, k_heads, tokens, dim), dtype, device, seed=3)
    positions = torch.arange(3, 3 + tokens, device=device).expand(batch, -1)
    cos, sin = rotary(q.transpose(1, 2), positions)  # HF: cos/sin in the activations' dtype
    got = grads(apply_rotary, q, k, cos, sin, dq, dk, inplace_backward=True)
    hf = grads(apply_rotary_pos_emb, q, k, cos, sin, dq, dk)
    for name, a, b, c in zip(("q", "k", "dq", "dk"), got, hf, float64(q, k, cos, sin, dq, dk), strict=True):
        assert rel_err(a, b) < TOL[dtype], f"{name} vs HF"
        assert rel_err(a, c) < TOL[dtype], f"{name} vs float64"


def test_contiguous_heads_layout_with_unsqueeze_dim_2(device):
    """q, k as [B, T, H, D] (unsqueeze_dim=2), as HF's argument of that name."""
    q, k, cos, sin, dq, dk = inputs((2, 4, 2, 9, 16), torch.float32, device, seed=4)
    as_bthd = [t.transpose(1, 2) for t in (q, k, dq, dk)]
    got = grads(apply_rotary, as_bthd[0], as_bthd[1], cos, sin, as_bthd[2], as_bthd[3],
                unsqueeze_dim=2)
    want = float64(as_bthd[0], as_bthd[1], cos, sin, as_bthd[2], as_bthd[3], unsqueeze_dim=2)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < FP32_TOL


def test_inplace_backward_gives_the_same_gradients(device):
    tensors = inputs((2, 6, 2, 11, 18), torch.bfloat16, device, seed=5)
    for a, b in zip(grads(apply_rotary, *tensors),
                    grads(apply_rotary, *tensors, inplace_backward=True), strict=True):
        assert torch.equal(a, b)


def test_inplace_backward_with_one_shared_gradient(device):
    """q_embed + k_embed (MHA) hands both outputs the same gradient tensor: the in-place
    backward must not write dq over the buffer it still has to read dk from."""
    q, k, cos, sin, dq, _ = inputs((1, 4, 4, 7, 8), torch.float32, device, seed=6)
    results = []
    for inplace in (False, True):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        q_embed, k_embed = apply_rotary(ql * 1, kl * 1, cos, sin, inplace_backward=inplace)
        ((q_embed + k_embed) * dq).pow(2).sum().backward()
        results.append((ql.grad, kl.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_arguments_are_errors(device):
    q, k, cos, sin, _, _ = inputs((1, 2, 2, 5, 8), torch.float32, device, seed=7)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rotary(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rotary(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="requires grad"):
        apply_rotary(q, k, cos.clone().requires_grad_(), sin)


def test_under_torch_compile(device):
    """fullgraph torch.compile through the custom ops equals eager (CPU: aot_eager, see
    test_rms_norm.test_under_torch_compile)."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    tensors = inputs((2, 6, 2, 11, 18), torch.float32, device, seed=8)
    compiled = torch.compile(lambda q, k, c, s: apply_rotary(q, k, c, s, inplace_backward=True),
                             backend=backend, fullgraph=True)
    for a, b in zip(grads(compiled, *tensors), grads(apply_rotary, *tensors), strict=True):
        assert rel_err(a, b) < FP32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 8, 2048, 128), (1, 32, 8, 16384, 128),
                                   (2, 28, 4, 1023, 128), (1, 8, 1, 257, 256)])
def test_real_sizes_on_gpu(shape):
    for dtype in (torch.bfloat16, torch.float32):
        tensors = inputs(shape, dtype, "cuda", seed=shape[3])
        got = grads(apply_rotary, *tensors, inplace_backward=True)
        for a, b in zip(got, float64(*tensors), strict=True):
            assert rel_err(a, b) < TOL[dtype]
