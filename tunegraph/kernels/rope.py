"""Rotary position embedding of q and k in one Triton launch, forward and backward.

    q_embed, k_embed = apply_rotary(q, k, cos, sin)    # HF's apply_rotary_pos_emb, GQA included

HF's convention (rotate_half): with x = [x1, x2] split at D/2,
    out = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
q is [B, Hq, T, D], k is [B, Hkv, T, D] (any strides with D contiguous: HF passes transposed
views of the projections), cos and sin are [B or 1, T, D]; `unsqueeze_dim=2` takes q and k as
[B, T, H, D], as HF's argument of that name. The output dtype is HF's: q's dtype promoted with
cos's.

One program per token (b, t), or per few tokens when heads are few and small: it loads the
tokens' cos/sin rows once and rotates every q head and every k head. The backward is the transposed rotation, dx = [c1 dy1 + s2 dy2,
c2 dy2 - s1 dy1] (rope with -sin when the two halves of cos/sin are equal, as HF's are); cos and
sin get no gradient (HF computes them under no_grad).

Bytes per call, the floor: read q and k, write them (2 x (Hq + Hkv) x T x D x size), plus cos
and sin once per token. ~3 FLOPs per element: memory-bound.
"""

from __future__ import annotations

import functools

import torch

from tunegraph.kernels import cdiv, is_dense, next_power_of_2, tl, triton, use_triton


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    """Forward: [x1 c1 - x2 s1, x2 c2 + x1 s2]; backward, the transpose."""
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    return y1, y2


@triton.jit
def _rotate_heads(X, Y, x_st, x_sh, y_st, y_sh, tokens, token_mask, num_heads, c1, c2, s1, s2,
                  half_dim, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rotate a [tokens, heads, D] tile of X (at X, token `tokens` and head h at
    tokens * x_st + h * x_sh) into Y; c1..s2 are the tokens' [tokens, 1, D/2] cos/sin halves."""
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = token_mask & (heads < num_heads) & (dims < half_dim)
    x_ptrs = X + tokens * x_st + heads * x_sh + dims
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half_dim, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, c2, s1, s2, BACKWARD)
    y_ptrs = Y + tokens * y_st + heads * y_sh + dims
    # Y may be X (in-place backward): both halves were loaded above.
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + half_dim, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_token(X, Y, x_sh, y_sh, num_heads, c1, c2, s1, s2, half_dim,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate one token's [heads, D] tile (X, Y at that token); c1..s2 are [1, D/2]. A 2-d
    tile: Triton's 3-d layouts with a size-1 token dimension vectorized worse."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < half_dim)
    x_ptrs = X + heads * x_sh + dims
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half_dim, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, c2, s1, s2, BACKWARD)
    y_ptrs = Y + heads * y_sh + dims
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + half_dim, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin_halves(COS, SIN, offsets, mask, half_dim):
    """The two halves of cos and of sin at `offsets` (the first half's), in fp32."""
    c1 = tl.load(COS + offsets, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + offsets + half_dim, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + offsets, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + offsets + half_dim, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_tokens(Q, K, COS, SIN, QO, KO, seq_len,
                 q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                 cos_sb, cos_st, num_q_heads, num_k_heads, half_dim, BACKWARD: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """BLOCK_T tokens of one sequence: their cos/sin rows are loaded once for all heads."""
    pid = tl.program_id(0)
    blocks_per_seq = (seq_len + BLOCK_T - 1) // BLOCK_T  # not tl.cdiv: see tunegraph.kernels.row_sum
    b = (pid // blocks_per_seq).to(tl.int64)
    if BLOCK_T == 1:  # one token of many heads (7B-size attention): 2-d tiles
        t = (pid % blocks_per_seq).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        cs_mask = dims < half_dim
        c1, c2, s1, s2 = _cos_sin_halves(COS, SIN, b * cos_sb + t * cos_st + dims, cs_mask,
                                         half_dim)
        _rotate_token(Q + b * q_sb + t * q_st, QO + b * qo_sb + t * qo_st, q_sh, qo_sh,
                      num_q_heads, c1, c2, s1, s2, half_dim, BACKWARD, BLOCK_QH, BLOCK_HALF)
        _rotate_token(K + b * k_sb + t * k_st, KO + b * ko_sb + t * ko_st, k_sh, ko_sh,
                      num_k_heads, c1, c2, s1, s2, half_dim, BACKWARD, BLOCK_KH, BLOCK_HALF)
    else:  # a few heads: tokens stacked into one [tokens, heads, D/2] tile
        tokens = ((pid % blocks_per_seq).to(tl.int64) * BLOCK_T
                  + tl.arange(0, BLOCK_T)[:, None, None])
        token_mask = tokens < seq_len
        dims = tl.arange(0, BLOCK_HALF)[None, None, :]
        cs_mask = token_mask & (dims < half_dim)
        c1, c2, s1, s2 = _cos_sin_halves(COS, SIN, b * cos_sb + tokens * cos_st + dims,
                                         cs_mask, half_dim)
        _rotate_heads(Q + b * q_sb, QO + b * qo_sb, q_st, q_sh, qo_st, qo_sh, tokens,
                      token_mask, num_q_heads, c1, c2, s1, s2, half_dim, BACKWARD, BLOCK_QH,
                      BLOCK_HALF)
        _rotate_heads(K + b * k_sb, KO + b * ko_sb, k_st, k_sh, ko_st, ko_sh, tokens,
                      token_mask, num_k_heads, c1, c2, s1, s2, half_dim, BACKWARD, BLOCK_KH,
                      BLOCK_HALF)


@triton.jit
def _rope_fwd_kernel(Q, K, COS, SIN, QO, KO, seq_len,
                     q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                     cos_sb, cos_st, num_q_heads, num_k_heads, half_dim, BLOCK_T: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    _rope_tokens(Q, K, COS, SIN, QO, KO, seq_len, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                 qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st, cos_sb, cos_st, num_q_heads,
                 num_k_heads, half_dim, False, BLOCK_T, BLOCK_QH, BLOCK_KH, BLOCK_HALF)


@triton.jit
def _rope_bwd_kernel(DQO, DKO, COS, SIN, DQ, DK, seq_len,
                     q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st,
                     cos_sb, cos_st, num_q_heads, num_k_heads, half_dim, BLOCK_T: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    _rope_tokens(DQO, DKO, COS, SIN, DQ, DK, seq_len, q_sb, q_sh, q_st, k_sb, k_sh, k_st,
                 qo_sb, qo_sh, qo_st, ko_sb, ko_sh, ko_st, cos_sb, cos_st, num_q_heads,
                 num_k_heads, half_dim, True, BLOCK_T, BLOCK_QH, BLOCK_KH, BLOCK_HALF)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, unsqueeze_dim: int = 1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb (llama), line for line."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """For q, k as [B, H, T, D]."""
    batch, _, seq_len, head_dim = q.shape
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, "
                         f"sequence and head dims")
    if head_dim % 2:
        raise ValueError(f"rope: head dim {head_dim} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq_len, head_dim):
            raise ValueError(f"rope: {name} has shape {tuple(t.shape)}, expected "
                             f"({batch} or 1, {seq_len}, {head_dim})")
        if t.requires_grad:
            raise ValueError(f"rope: {name} requires grad, but the kernel gives cos and sin no "
                             f"gradient; use apply_rotary_reference")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=64)
def _launch_config(num_q_heads: int, num_k_heads: int, head_dim: int, seq_len: int
                   ) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_QH, BLOCK_KH, BLOCK_HALF, num_warps), cached per shape: the host path
    sets RoPE's time below ~16k tokens (benchmarks/NOTES.md, K1 outcome 2)."""
    block_qh, block_kh = next_power_of_2(num_q_heads), next_power_of_2(num_k_heads)
    block_half = next_power_of_2(head_dim // 2)
    per_token = (block_qh + block_kh) * block_half
    # One token per program from ~2K elements per half up (a 7B's 32+8 heads of 128); fewer
    # heads are stacked over tokens to that size (small models, and the interpreter).
    block_t = min(next_power_of_2(seq_len), 1 << max(0, (2048 // per_token).bit_length() - 1))
    # ~16 elements per thread: 4 warps for a 7B's 32+8 heads of 128 would be 40.
    num_warps = 8 if block_t * per_token * 2 >= 4096 else 4
    return block_t, block_qh, block_kh, block_half, num_warps


def _launch(kernel, q, k, cos, sin, q_out, k_out) -> None:
    """One program per (batch, block of tokens); q/k/q_out/k_out are [B, H, T, D], stride 1 on D."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    cos_sb = cos.stride(0) if cos.shape[0] > 1 else 0
    block_t, block_qh, block_kh, block_half, num_warps = _launch_config(
        num_q_heads, k.shape[1], head_dim, seq_len)
    kernel[(batch * cdiv(seq_len, block_t),)](
        q, k, cos, sin, q_out, k_out, seq_len,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        cos_sb, cos.stride(1), num_q_heads, k.shape[1], head_dim // 2,
        BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half,
        num_warps=num_warps)


def _out_dtype(x: torch.Tensor, cos: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, cos.dtype)


def rope_forward(q, k, cos, sin, checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_embed, k_embed), new tensors with q's and k's strides (`checked`: the caller ran
    _check already)."""
    if not checked:
        _check(q, k, cos, sin)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    q_out = torch.empty_like(q, dtype=_out_dtype(q, cos))
    k_out = torch.empty_like(k, dtype=_out_dtype(k, cos))
    _launch(_rope_fwd_kernel, q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def rope_backward(dq_out, dk_out, cos, sin, q_dtype: torch.dtype, k_dtype: torch.dtype,
                  inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) from the outputs' gradients; `inplace` writes them over dq_out and dk_out."""
    dq_out, dk_out = _last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out)
    if inplace:
        dq, dk = dq_out, dk_out
    else:
        dq, dk = torch.empty_like(dq_out, dtype=q_dtype), torch.empty_like(dk_out, dtype=k_dtype)
    _launch(_rope_bwd_kernel, dq_out, dk_out, cos, sin, dq, dk)
    return dq, dk


@torch.library.custom_op("tunegraph::rope_fwd", mutates_args=())
def _rope_fwd_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_forward(q, k, cos, sin)


@_rope_fwd_op.register_fake
def _(q, k, cos, sin):
    return (torch.empty_like(q, dtype=_out_dtype(q, cos)),
            torch.empty_like(k, dtype=_out_dtype(k, cos)))


@torch.library.custom_op("tunegraph::rope_bwd", mutates_args=())
def _rope_bwd_op(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_backward(dq_out, dk_out, cos, sin, q_dtype, k_dtype)


@_rope_bwd_op.register_fake
def _(dq_out, dk_out, cos, sin, q_dtype, k_dtype):
    return torch.empty_like(dq_out, dtype=q_dtype), torch.empty_like(dk_out, dtype=k_dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = (q.dtype, k.dtype)


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.tunegraph.rope_bwd(dq_out, dk_out, cos, sin, *ctx.dtypes)
    return dq, dk, None, None


_rope_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """No byte of `a` is a byte of `b` (both dense)."""
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + a.numel() * a.element_size()
    b_end = b_start + b.numel() * b.element_size()
    return a_end <= b_start or b_end <= a_start


class _RopeFunction(torch.autograd.Function):
    """The eager path (an autograd.Function: far less host time per call than a custom op's
    dispatch, benchmarks/host_overhead.py). `inplace`: the backward writes dq, dk over the
    outputs' gradients when those are dense, of q's and k's dtypes, and disjoint, as
    flash-attn's rotary does with inplace=True: no q/k-sized allocation in the backward. Only
    where those gradients reach nothing else (HF attention: they come from the attention's own
    backward). The forward writes new tensors: rotating q and k in place would need
    `mark_dirty` on two views, which autograd refuses, and the projections they replace are
    freed after it anyway."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes, ctx.inplace = (q.dtype, k.dtype), inplace
        return rope_forward(q, k, cos, sin, checked=True)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        inplace = (ctx.inplace and (dq_out.dtype, dk_out.dtype) == ctx.dtypes
                   and all(g.stride(-1) == 1 and is_dense(g) for g in (dq_out, dk_out))
                   and _disjoint(dq_out, dk_out))
        dq, dk = rope_backward(dq_out, dk_out, cos, sin, *ctx.dtypes, inplace=inplace)
        return dq, dk, None, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1, *, inplace_backward: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's apply_rotary_pos_emb through the Triton kernels (CUDA or the interpreter), else the
    reference. `inplace_backward` (eager; see `_RopeFunction` for when it is safe):
    the backward reuses the outputs' gradient buffers."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 ([B, H, T, D]) or 2 ([B, T, H, D]), "
                         f"got {unsqueeze_dim}")
    if not use_triton(q, k, cos, sin):
        return apply_rotary_reference(q, k, cos, sin, unsqueeze_dim)
    if q.dim() != 4:
        raise ValueError(f"rope: q must be 4-d, got shape {tuple(q.shape)}")
    if unsqueeze_dim == 2:  # [B, T, H, D]: the same kernel on the transposed views
        q_embed, k_embed = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin,
                                        inplace_backward=inplace_backward)
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    if torch.compiler.is_compiling():
        return torch.ops.tunegraph.rope_fwd(q, k, cos, sin)
    _check(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos, sin, inplace_backward)
