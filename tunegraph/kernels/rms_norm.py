"""RMSNorm forward and backward in Triton, in Hugging Face's two conventions.

    y = rms_norm(x, weight, eps)                # LlamaRMSNorm (Mistral, Qwen2, Qwen3 alike)
    y = rms_norm(x, weight, eps, gemma=True)    # GemmaRMSNorm (Gemma 1-3): scale is 1 + weight

    llama: y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)     fp32 norm, cast, then scale
    gemma: y = (x * rsqrt(mean(x^2) + eps) * (1 + w)).to(x.dtype)   fp32 norm and scale, then cast

Forward: one program per row (per few rows when rows are narrower than 2048), the whole row in
registers; it stores y and 1/rms (4 bytes per row, for the backward). Backward: with xhat = x/rms and g = dy * scale,
dx = (g - xhat * mean(g * xhat)) / rms; the weight gradient sum(dy * xhat) over rows is reduced
by a few programs per SM, each summing a contiguous chunk of rows into its own fp32 partial row,
and the host sums those (programs x hidden floats: 2 MB at 528 x 4096, against 128 MB of x).

Bytes moved per call, the floor on a GPU: forward reads x and writes y (2 x rows x hidden x
element size); backward reads x and dy and writes dx (3x). FLOPs are ~4 per element: the op is
memory-bound on any GPU.
"""

from __future__ import annotations

import functools

import torch

from tunegraph.kernels import (
    cdiv,
    next_power_of_2,
    num_programs_for_reduction,
    row_sum,
    tl,
    triton,
    use_triton,
    warps_for,
)

# One row lives in registers: 64K elements (fp32: 256 KB per program) is past any LLM's hidden
# size (16K at most today) and near where register spills would make a looped kernel faster.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, num_rows, num_cols, eps,
                         GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows) & (cols < num_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < num_cols, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(row_sum(x * x, 1) / num_cols + eps)[:, None]
    xhat = x * rstd
    if GEMMA:
        y = xhat * (1.0 + w)
    else:
        # HF casts the normalised row to the input dtype before the weight multiply.
        y = xhat.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < num_rows)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         num_rows, num_cols, rows_per_program,
                         GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    col_mask = cols < num_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = 1.0 + w if GEMMA else w
    dw = tl.full([BLOCK_M, BLOCK], 0.0, tl.float32)  # not tl.zeros: see row_sum
    # int64 bounds make the row indices int64 (row * stride may pass 2^31).
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)[:, None]
        mask = (rows < row_end) & col_mask
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
        xhat = x * rstd
        if GEMMA:
            dw += dy * xhat
        else:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * scale
        dx = (g - xhat * (row_sum(g * xhat, 1)[:, None] / num_cols)) * rstd
        # Written after the whole rows were read: DX may be DY (in-place backward).
        tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * num_cols + cols, row_sum(dw, 0)[None, :], mask=col_mask)


@functools.lru_cache(maxsize=64)
def _blocks(num_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows per tile, BLOCK columns, warps): one row per tile from 2048 columns up;
    narrower rows are stacked to ~2048 elements per tile (small models, and the interpreter,
    which pays per program). Cached: it runs at every call."""
    block = next_power_of_2(num_cols)
    return max(1, 2048 // block), block, warps_for(max(block, 2048))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                       gemma: bool = False) -> torch.Tensor:
    """HF's LlamaRMSNorm (or GemmaRMSNorm with `gemma`), line for line. The arithmetic runs in
    fp32, or in float64 for float64 inputs (the tests' oracle)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.to(compute))).to(x.dtype)
    return weight * h.to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    num_cols = x.shape[-1]
    if weight.shape != (num_cols,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected "
                         f"({num_cols},) for x of shape {tuple(x.shape)}")
    if num_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {num_cols} is above the kernel's {MAX_HIDDEN}")
    return num_cols


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                     checked: bool = False, out_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, 1/rms per row): launches `_rms_norm_fwd_kernel` (`checked`: the caller ran _check).
    `out_dtype`: y is rounded to it in the kernel's store (see `rms_norm`)."""
    num_cols = x.shape[-1] if checked else _check(x, weight)
    x_rows = x.reshape(-1, num_cols)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    if out_dtype is None:
        out_dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.promote_types(
            x.dtype, weight.dtype)
    num_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    block_m, block, warps = _blocks(num_cols)
    _rms_norm_fwd_kernel[(cdiv(num_rows, block_m),)](
        x_rows, weight.contiguous(), y, rstd, x_rows.stride(0), num_cols, num_rows,
        num_cols, eps, GEMMA=gemma, BLOCK_M=block_m, BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, gemma: bool, dx: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight): launches `_rms_norm_bwd_kernel`, then sums the partial weight gradients.
    `dx` may be given (the in-place backward passes dy itself; contiguous)."""
    num_cols = x.shape[-1]
    x_rows = x.reshape(-1, num_cols)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    dy_rows = dy.reshape(-1, num_cols)
    if dy_rows.stride(-1) != 1:
        dy_rows = dy_rows.contiguous()
    if dx is None:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = x_rows.shape[0]
    rows_per_program = cdiv(num_rows, num_programs_for_reduction(x.device, num_rows))
    num_programs = cdiv(num_rows, rows_per_program)
    dw_partial = torch.empty((num_programs, num_cols), dtype=torch.float32, device=x.device)
    block_m, block, warps = _blocks(num_cols)
    _rms_norm_bwd_kernel[(num_programs,)](
        dy_rows, x_rows, weight.contiguous(), rstd, dx, dw_partial, dy_rows.stride(0),
        x_rows.stride(0), num_cols, num_rows, num_cols, rows_per_program,
        GEMMA=gemma, BLOCK_M=block_m, BLOCK=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


@torch.library.custom_op("tunegraph::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps, gemma)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, gemma):
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


@torch.library.custom_op("tunegraph::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, weight, rstd, gemma)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, gemma):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _, gemma = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.gemma = gemma


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.tunegraph.rms_norm_bwd(dy, x, weight, rstd, ctx.gemma)
    return dx, dw, None, None


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _RMSNormFunction(torch.autograd.Function):
    """The eager path: an autograd.Function costs the host a fraction of a custom op's dispatch
    (benchmarks/host_overhead.py), and small calls are host-bound. `inplace`: the backward
    writes dx over dy (Liger's default), saving one activation-sized buffer. Only for graphs
    where dy reaches nothing else: a norm whose output feeds linear layers (pre-norms), never a
    post-norm added to the residual, whose dy the residual shares."""

    @staticmethod
    def forward(ctx, x, weight, eps, gemma, inplace, out_dtype):
        y, rstd = rms_norm_forward(x, weight, eps, gemma, checked=True, out_dtype=out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.gemma, ctx.inplace = gemma, inplace
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        # dx takes dy's (contiguous) layout; autograd accepts any strides of x's shape.
        reuse = ctx.inplace and dy.dtype == x.dtype and dy.is_contiguous()
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.gemma, dx=dy if reuse else None)
        return dx, dw, None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
             inplace_backward: bool = False, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape). The Triton kernels on CUDA
    (or the interpreter); `rms_norm_reference` elsewhere. Eager calls go through an
    autograd.Function, compiled ones through the custom op. `inplace_backward` (eager only; see
    `_RMSNormFunction` for when it is safe) overwrites the output's gradient with dx.

    `out_dtype`: the output rounded to this dtype, as `.to(out_dtype)` after the norm would, but
    in the kernel's store (no second pass over memory, no cast op for the host to dispatch).
    For a norm that feeds linear layers under autocast, the autocast dtype gives the bits
    autocast's own cast of each layer's input would (tunegraph.kernels.patch)."""
    if not use_triton(x, weight):
        y = rms_norm_reference(x, weight, eps, gemma=gemma)
        return y if out_dtype is None else y.to(out_dtype)
    if torch.compiler.is_compiling():
        y = torch.ops.tunegraph.rms_norm_fwd(x, weight, eps, gemma)[0]
        return y if out_dtype is None else y.to(out_dtype)
    _check(x, weight)
    return _RMSNormFunction.apply(x, weight, eps, gemma, inplace_backward, out_dtype)
