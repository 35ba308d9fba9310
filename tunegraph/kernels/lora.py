"""LoRA layers with hand-derived backwards: a linear (o_proj), q/k/v from one input, the LoRA MLP.

    from tunegraph.kernels.lora import LoRAWeights, lora_linear, lora_projections, lora_mlp
    w = LoRAWeights(weight, bias, lora_a, lora_b, scaling, dropout=0.0)   # one PEFT lora.Linear
    y = lora_linear(x, w)                            # x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ
    q, k, v = lora_projections(x, [w_q, w_k, w_v])   # one input, dX accumulated once
    y = lora_mlp(x, w_gate, w_up, w_down, gelu=False)   # down(act(gate(x)) * up(x)), all LoRA
    apply_lora_kernels(model, options)               # tunegraph.kernels.lora_patch: a PEFT model

The base weights are frozen: the backward computes dX, dA and dB (and a trainable base bias's
gradient), never dW. PEFT's formula, per projection (s = scaling, rslora's alpha/sqrt(r) too):

    forward   xa = drop(x) Aᵀ           y  = x Wᵀ + b + s xa Bᵀ
    backward  dB = s dyᵀ xa   dyb = s dy B   dA = dybᵀ drop(x)   dX = dy W + dyb A (via drop)

What is hand-written, and why (bytes counted at K3's 8192 tokens, H 4096, I 14336, bf16; one
N x I pass = 235 MB, ~55 us on an H200):
- GEMMs stay in cuBLAS (torch.mm / addmm): the base products are 99% of the FLOPs and cuBLAS
  runs them at ~790 TFLOP/s. The LoRA terms ride on them: the rank-r product s xa Bᵀ is written
  first and the base product adds onto it in its epilogue (addmm_, beta = 1), where PEFT writes
  base, lora_B, the scaled copy and the sum (four passes over y); the scale is the addmm alpha.
  In the backward dyb = s dy B is one product per projection, dA = dybᵀ x one product for all
  projections sharing x, and dX = dyb A first, then += dy W for each projection: one dX buffer,
  no separate LoRA dX and no add (PEFT: five passes over dX for q/k/v).
- The MLP's middle is two Triton kernels (`_lora_glu_fwd_kernel`, `_lora_glu_bwd_kernel`) that
  read cuBLAS's base outputs and add gate's and up's rank-r terms themselves (a tl.dot with K = r),
  so g and u are never written: forward reads gate and up, writes h and accumulates h A_downᵀ
  (3 passes over N x I, where PEFT makes ~18); backward adds dy's rank-r term to dh, recomputes
  g, u and act(g) (swiglu.py's `_activation`), writes d gate and d up over the saved base
  outputs, and reduces dA_down, dB_gate, dB_up and gate/up's dyb in the same pass (5 passes,
  PEFT ~22).
- Saved between forward and backward: x (or its dropout per projection), xa (N x r), and for the
  MLP the base gate and up outputs and h A_downᵀ: no act(g), no h (PEFT keeps g, act(g), u, h).
- Dropout (PEFT's lora_dropout) is torch's, drawn in PEFT's order (q, k, v; gate, up, down), so a
  seeded run draws PEFT's masks: on x outside the autograd Function (autograd carries it), on h
  inside as aten.native_dropout, whose keep mask the backward kernel applies.

Under torch.compile (lora_patch falls back to PEFT's modules then) and without Triton the MLP
runs `lora_mlp_reference`; the projections are torch products on any device. Tests:
tests/kernels/test_lora.py; benchmark K3: benchmarks/k3_lora.py; notes: benchmarks/NOTES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunegraph.kernels import INTERPRET, tl, triton, use_triton
from tunegraph.kernels.swiglu import _activation, glu_reference

# MLP middle tiles: BLOCK_N rows (tl.dot's smallest M) by BLOCK_I columns. Forward: one program
# per 16 rows walks all I columns (h A_downᵀ is a sum over I, kept in registers; 512 programs at
# 8192 tokens). Backward: one program per 128 columns and a run of rows (dA_down, dB_gate, dB_up
# are sums over rows, kept in registers); 8 warps hold a 16 x 128 fp32 tile in 8 registers per
# thread, ~10 tiles live. Triton's interpreter pays per operation, not per element: 64 rows there.
BLOCK_N = 64 if INTERPRET else 16
MAX_BLOCK_I = 128


@dataclass(frozen=True)
class LoRAWeights:
    """One PEFT lora.Linear's tensors: base `weight` [out, in] and `bias`, `lora_a` [r, in],
    `lora_b` [out, r], `scaling` (PEFT's scaling[adapter]) and the dropout probability in effect
    (0 when the dropout module is in eval mode)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout: float = 0.0


# ---------------------------------------------------------------- references (CPU fallback, oracle)

def lora_linear_reference(x: torch.Tensor, w: LoRAWeights, lora_x: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """PEFT's lora.Linear forward: base(x) + lora_B(lora_A(drop(x))) * scaling, where `lora_x`
    is drop(x) (x itself when None)."""
    lora_x = x if lora_x is None else lora_x
    return (F.linear(x, w.weight, w.bias)
            + F.linear(F.linear(lora_x, w.lora_a), w.lora_b) * w.scaling)


def lora_mlp_reference(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, *,
                       gelu: bool = False, lora_x_gate: torch.Tensor | None = None,
                       lora_x_up: torch.Tensor | None = None,
                       down_keep: torch.Tensor | None = None) -> torch.Tensor:
    """HF's down_proj(act_fn(gate_proj(x)) * up_proj(x)) with PEFT LoRA layers. Dropout: the
    gate/up LoRA inputs are given (`lora_x_*`); the down projection's keep mask is given, or
    drawn as PEFT draws it (F.dropout of h) when `down.dropout` > 0 and `down_keep` is None."""
    h = glu_reference(lora_linear_reference(x, gate, lora_x_gate),
                      lora_linear_reference(x, up, lora_x_up), gelu=gelu)
    if down_keep is not None:
        h_lora = h * down_keep / (1.0 - down.dropout)
    elif down.dropout > 0:
        h_lora = F.dropout(h, down.dropout, True)
    else:
        h_lora = h
    return lora_linear_reference(h, down, h_lora)


# ---------------------------------------------------------------- Triton: the MLP's middle

@triton.jit
def _dot(a, b, INTERPRETER: tl.constexpr, IEEE: tl.constexpr):
    """a @ b, fp32 accumulation. In Triton's interpreter the bf16 tl.dot is wrong (2.7e10 off at
    40x16x16, triton 3.9); bf16 products are exact in fp32, so fp32 operands give the same sums.
    IEEE for fp32 operands on a GPU (the default, tf32, would cost ~3e-4 relative)."""
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 x rounded to `dtype` (to nearest, ties to even), in `dtype`. The interpreter's fp32 ->
    bf16 cast truncates (2^-7 relative, biased; a GPU rounds to 2^-8), so there the rounding is
    done on the bits first and the cast only drops zeros."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _lora_glu_fwd_kernel(G, U, XA, BG, BU, AD, H, HA, num_rows, num_cols, rank_g, rank_u, rank_d,
                         stride_g, stride_u, stride_xa, stride_bg, stride_bu, stride_ad, stride_h,
                         stride_ha, scale_g, scale_u, GELU: tl.constexpr, FUSE_HA: tl.constexpr,
                         INTERPRETER: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_I: tl.constexpr, RG: tl.constexpr, RU: tl.constexpr,
                         RD: tl.constexpr):
    dtype = H.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    row_mask = rows < num_rows
    kg = tl.arange(0, RG)
    ku = tl.arange(0, RU)
    kd = tl.arange(0, RD)
    # xa = [x A_gateᵀ | x A_upᵀ] for these rows; the padding to RG/RU columns loads zeros.
    xa_g = tl.load(XA + rows * stride_xa + kg[None, :], mask=row_mask & (kg[None, :] < rank_g),
                   other=0.0)
    xa_u = tl.load(XA + rows * stride_xa + rank_g + ku[None, :],
                   mask=row_mask & (ku[None, :] < rank_u), other=0.0)
    ha = tl.full([BLOCK_N, RD], 0.0, tl.float32)
    for first in range(0, num_cols, BLOCK_I):
        cols = first + tl.arange(0, BLOCK_I)
        col_mask = cols < num_cols
        mask = row_mask & col_mask[None, :]
        bg_t = tl.load(BG + cols[None, :] * stride_bg + kg[:, None],
                       mask=col_mask[None, :] & (kg[:, None] < rank_g), other=0.0)  # [RG, BLOCK_I]
        bu_t = tl.load(BU + cols[None, :] * stride_bu + ku[:, None],
                       mask=col_mask[None, :] & (ku[:, None] < rank_u), other=0.0)
        g = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # gate_proj(x) and up_proj(x) as HF sees them (rounded to the dtype), then its act * up.
        g = g + scale_g * _dot(xa_g, bg_t, INTERPRETER, IEEE)
        u = u + scale_u * _dot(xa_u, bu_t, INTERPRETER, IEEE)
        g = _round(g, dtype, INTERPRETER).to(tl.float32)
        u = _round(u, dtype, INTERPRETER).to(tl.float32)
        act, _ = _activation(g, GELU)
        h = _round(_round(act, dtype, INTERPRETER).to(tl.float32) * u, dtype, INTERPRETER)
        tl.store(H + rows * stride_h + cols[None, :], h, mask=mask)
        if FUSE_HA:
            ad_t = tl.load(AD + kd[None, :] * stride_ad + cols[:, None],
                           mask=col_mask[:, None] & (kd[None, :] < rank_d), other=0.0)
            ha += _dot(h, ad_t, INTERPRETER, IEEE)
    if FUSE_HA:
        tl.store(HA + rows * stride_ha + kd[None, :], _round(ha, dtype, INTERPRETER),
                 mask=row_mask & (kd[None, :] < rank_d))


@triton.jit
def _lora_glu_bwd_kernel(DH, G, U, XA, BG, BU, AD, DYB, KEEP, DXA_PART, DA_PART, DBG_PART,
                         DBU_PART, num_rows, num_cols, rows_per_program, rank_g, rank_u, rank_d,
                         stride_dh, stride_g, stride_u, stride_xa, stride_bg, stride_bu,
                         stride_ad, stride_dyb, stride_keep, scale_g, scale_u, keep_scale,
                         GELU: tl.constexpr, DROPOUT: tl.constexpr, INTERPRETER: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                         RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr):
    dtype = G.dtype.element_ty
    pid_col = tl.program_id(0)
    pid_row = tl.program_id(1)
    cols = pid_col * BLOCK_I + tl.arange(0, BLOCK_I)
    col_mask = cols < num_cols
    kg = tl.arange(0, RG)
    ku = tl.arange(0, RU)
    kd = tl.arange(0, RD)
    bg_t = tl.load(BG + cols[None, :] * stride_bg + kg[:, None],
                   mask=col_mask[None, :] & (kg[:, None] < rank_g), other=0.0)      # [RG, BLOCK_I]
    bu_t = tl.load(BU + cols[None, :] * stride_bu + ku[:, None],
                   mask=col_mask[None, :] & (ku[:, None] < rank_u), other=0.0)
    ad = tl.load(AD + kd[:, None] * stride_ad + cols[None, :],
                 mask=col_mask[None, :] & (kd[:, None] < rank_d), other=0.0)         # [RD, BLOCK_I]
    da = tl.full([RD, BLOCK_I], 0.0, tl.float32)
    dbg = tl.full([BLOCK_I, RG], 0.0, tl.float32)
    dbu = tl.full([BLOCK_I, RU], 0.0, tl.float32)
    row_start = pid_row.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    for first in range(row_start, row_end, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)[:, None]
        row_mask = rows < row_end
        mask = row_mask & col_mask[None, :]
        # dh = dy W_down (cuBLAS, given) + (s dy B_down) A_down, through the dropout's mask.
        dyb = tl.load(DYB + rows * stride_dyb + kd[None, :],
                      mask=row_mask & (kd[None, :] < rank_d), other=0.0)
        dh_lora = _dot(dyb, ad, INTERPRETER, IEEE)
        if DROPOUT:
            keep = tl.load(KEEP + rows * stride_keep + cols[None, :], mask=mask,
                           other=0).to(tl.float32) * keep_scale
            dh_lora = dh_lora * keep
        dh = tl.load(DH + rows * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = dh + dh_lora
        # The forward's g, u, act(g) and h again, from the saved base outputs and xa.
        xa_g = tl.load(XA + rows * stride_xa + kg[None, :],
                       mask=row_mask & (kg[None, :] < rank_g), other=0.0)
        xa_u = tl.load(XA + rows * stride_xa + rank_g + ku[None, :],
                       mask=row_mask & (ku[None, :] < rank_u), other=0.0)
        g = tl.load(G + rows * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = g + scale_g * _dot(xa_g, bg_t, INTERPRETER, IEEE)
        u = u + scale_u * _dot(xa_u, bu_t, INTERPRETER, IEEE)
        g = _round(g, dtype, INTERPRETER).to(tl.float32)
        u = _round(u, dtype, INTERPRETER).to(tl.float32)
        act, dact = _activation(g, GELU)
        act = _round(act, dtype, INTERPRETER).to(tl.float32)
        h = _round(act * u, dtype, INTERPRETER).to(tl.float32)
        if DROPOUT:
            h = h * keep
        dg = _round(dh * u * dact, dtype, INTERPRETER)
        du = _round(dh * act, dtype, INTERPRETER)
        # Written over the saved base outputs: each element was read above, in this program.
        tl.store(G + rows * stride_g + cols[None, :], dg, mask=mask)
        tl.store(U + rows * stride_u + cols[None, :], du, mask=mask)
        # dA_down = dybᵀ drop(h); dB_gate = s dgᵀ xa_g (s applied at the end); dB_up alike.
        da += _dot(tl.trans(dyb), _round(h, dtype, INTERPRETER), INTERPRETER, IEEE)
        dbg += _dot(tl.trans(dg), xa_g, INTERPRETER, IEEE)
        dbu += _dot(tl.trans(du), xa_u, INTERPRETER, IEEE)
        # s (dg B_gate | du B_up), summed over columns: this column block's share, fp32.
        rank = rank_g + rank_u
        part = DXA_PART + pid_col.to(tl.int64) * num_rows * rank + rows * rank
        dxa_g = scale_g * _dot(dg, tl.trans(bg_t), INTERPRETER, IEEE)
        dxa_u = scale_u * _dot(du, tl.trans(bu_t), INTERPRETER, IEEE)
        tl.store(part + kg[None, :], dxa_g, mask=row_mask & (kg[None, :] < rank_g))
        tl.store(part + rank_g + ku[None, :], dxa_u, mask=row_mask & (ku[None, :] < rank_u))
    tl.store(DA_PART + pid_row * rank_d * num_cols + kd[:, None] * num_cols + cols[None, :], da,
             mask=col_mask[None, :] & (kd[:, None] < rank_d))
    tl.store(DBG_PART + pid_row * num_cols * rank_g + cols[:, None] * rank_g + kg[None, :],
             scale_g * dbg, mask=col_mask[:, None] & (kg[None, :] < rank_g))
    tl.store(DBU_PART + pid_row * num_cols * rank_u + cols[:, None] * rank_u + ku[None, :],
             scale_u * dbu, mask=col_mask[:, None] & (ku[None, :] < rank_u))


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs K >= 16 and power-of-two aranges


def _block_i(num_cols: int) -> int:
    return min(MAX_BLOCK_I, max(16, triton.next_power_of_2(num_cols)))


def lora_glu_forward(gate: torch.Tensor, up: torch.Tensor, xa: torch.Tensor,
                     lora_b_gate: torch.Tensor, lora_b_up: torch.Tensor, scale_gate: float,
                     scale_up: float, gelu: bool,
                     lora_a_down: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h = act(gate + s_g xa_g B_gᵀ) * (up + s_u xa_u B_uᵀ) and, given A_down, h A_downᵀ.
    gate/up [N, I]: the base products; xa [N, r_g + r_u] = [x A_gᵀ | x A_uᵀ]."""
    num_rows, num_cols = gate.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1 and xa.stride(1) == 1  # rows of unit stride
    lora_b_gate, lora_b_up = lora_b_gate.contiguous(), lora_b_up.contiguous()
    lora_a_down = None if lora_a_down is None else lora_a_down.contiguous()
    rank_g, rank_u = lora_b_gate.shape[1], lora_b_up.shape[1]
    h = torch.empty_like(gate)
    rank_d = 0 if lora_a_down is None else lora_a_down.shape[0]
    ha = None if lora_a_down is None else gate.new_empty(num_rows, rank_d)
    _lora_glu_fwd_kernel[(triton.cdiv(num_rows, BLOCK_N),)](
        gate, up, xa, lora_b_gate, lora_b_up, gate if lora_a_down is None else lora_a_down, h,
        h if ha is None else ha, num_rows, num_cols, rank_g, rank_u, rank_d, gate.stride(0),
        up.stride(0), xa.stride(0), lora_b_gate.stride(0), lora_b_up.stride(0),
        0 if lora_a_down is None else lora_a_down.stride(0), h.stride(0),
        0 if ha is None else ha.stride(0), scale_gate, scale_up, GELU=gelu,
        FUSE_HA=lora_a_down is not None, INTERPRETER=INTERPRET, IEEE=gate.dtype == torch.float32,
        BLOCK_N=BLOCK_N, BLOCK_I=_block_i(num_cols), RG=_rank_block(rank_g),
        RU=_rank_block(rank_u), RD=_rank_block(max(rank_d, 1)), num_warps=4)
    return h, ha


def lora_glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, xa: torch.Tensor,
                      lora_b_gate: torch.Tensor, lora_b_up: torch.Tensor,
                      lora_a_down: torch.Tensor, dyb_down: torch.Tensor, scale_gate: float,
                      scale_up: float, gelu: bool, keep: torch.Tensor | None, keep_scale: float
                      ) -> tuple[torch.Tensor, ...]:
    """From dh = dy W_down and dyb_down = s_d dy B_down: (d gate, d up) written over `gate` and
    `up`, then fp32 [N, r_g + r_u] s (d gate B_g | d up B_u), dA_down [r_d, I], dB_gate [I, r_g],
    dB_up [I, r_u]. `keep`: the down projection's dropout mask (bool [N, I]), kept / (1 - p)."""
    num_rows, num_cols = gate.shape
    assert all(t.stride(1) == 1 for t in (dh, gate, up, xa, dyb_down))
    assert keep is None or keep.is_contiguous()
    lora_b_gate, lora_b_up = lora_b_gate.contiguous(), lora_b_up.contiguous()
    lora_a_down = lora_a_down.contiguous()
    rank_g, rank_u, rank_d = lora_b_gate.shape[1], lora_b_up.shape[1], lora_a_down.shape[0]
    block_i = _block_i(num_cols)
    num_col_blocks = triton.cdiv(num_cols, block_i)
    row_blocks = triton.cdiv(num_rows, BLOCK_N)
    if gate.is_cuda:  # ~4 programs per SM in all; each sums its rows' dA/dB in registers
        sms = torch.cuda.get_device_properties(gate.device).multi_processor_count
        num_row_programs = max(1, min(row_blocks, triton.cdiv(4 * sms, num_col_blocks)))
    else:
        num_row_programs = min(row_blocks, 2)  # the interpreter pays per program; 2 tests the sum
    rows_per_program = triton.cdiv(row_blocks, num_row_programs) * BLOCK_N
    num_row_programs = triton.cdiv(num_rows, rows_per_program)
    f32 = dict(dtype=torch.float32, device=gate.device)
    dxa_part = torch.empty(num_col_blocks, num_rows, rank_g + rank_u, **f32)
    da_part = torch.empty(num_row_programs, rank_d, num_cols, **f32)
    dbg_part = torch.empty(num_row_programs, num_cols, rank_g, **f32)
    dbu_part = torch.empty(num_row_programs, num_cols, rank_u, **f32)
    _lora_glu_bwd_kernel[(num_col_blocks, num_row_programs)](
        dh, gate, up, xa, lora_b_gate, lora_b_up, lora_a_down, dyb_down,
        gate if keep is None else keep, dxa_part, da_part, dbg_part, dbu_part, num_rows, num_cols,
        rows_per_program, rank_g, rank_u, rank_d, dh.stride(0), gate.stride(0), up.stride(0),
        xa.stride(0), lora_b_gate.stride(0), lora_b_up.stride(0), lora_a_down.stride(0),
        dyb_down.stride(0), 0 if keep is None else keep.stride(0), scale_gate, scale_up,
        keep_scale, GELU=gelu, DROPOUT=keep is not None, INTERPRETER=INTERPRET,
        IEEE=gate.dtype == torch.float32, BLOCK_N=BLOCK_N, BLOCK_I=block_i,
        RG=_rank_block(rank_g), RU=_rank_block(rank_u), RD=_rank_block(rank_d), num_warps=8)
    return (gate, up, dxa_part.sum(0), da_part.sum(0), dbg_part.sum(0), dbu_part.sum(0))


# ---------------------------------------------------------------- autograd Functions

def _lora_up(xa: torch.Tensor, lora_b: torch.Tensor, scaling: float,
             bias: torch.Tensor | None) -> torch.Tensor:
    """s xa Bᵀ (+ bias) into a fresh [N, out] buffer, which the base product then adds onto in
    its epilogue (addmm_ with beta = 1): y is written once and read once, not four times."""
    if bias is not None:
        return torch.addmm(bias, xa, lora_b.t(), alpha=scaling)
    out = xa.new_empty(xa.shape[0], lora_b.shape[0])
    return out.addmm_(xa, lora_b.t(), beta=0, alpha=scaling)  # beta 0: out's garbage is ignored


class _LoRAProjections(torch.autograd.Function):
    """y_p = x W_pᵀ + b_p + s_p (x_p A_pᵀ) B_pᵀ for projections p of one input x [N, K];
    x_p is x, or its dropout when `has_lora_x` (then given after the weights, one each)."""

    @staticmethod
    def forward(ctx, x, scalings, has_lora_x, *tensors):
        num = len(scalings)
        weights, biases, lora_as, lora_bs = (tensors[i:4 * num:4] for i in range(4))
        ranks = [a.shape[0] for a in lora_as]
        if has_lora_x:
            lora_xs = tensors[4 * num:]
            xa = torch.cat([lx @ a.t() for lx, a in zip(lora_xs, lora_as, strict=True)], dim=1)
        else:  # one product reads x once for every projection's A
            lora_xs = (x,)
            xa = x @ (torch.cat(lora_as) if num > 1 else lora_as[0]).t()
        outputs = []
        xas = xa.split(ranks, dim=1)
        for weight, bias, lora_b, xa_p, scaling in zip(weights, biases, lora_bs, xas, scalings,
                                                       strict=True):
            outputs.append(_lora_up(xa_p, lora_b, scaling, bias).addmm_(x, weight.t()))
        ctx.scalings, ctx.ranks, ctx.has_lora_x = scalings, ranks, has_lora_x
        ctx.bias_shapes = [None if b is None else b.shape for b in biases]
        ctx.save_for_backward(xa, *lora_xs, *weights, *lora_as, *lora_bs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        num, ranks = len(ctx.scalings), ctx.ranks
        xa, *rest = ctx.saved_tensors
        num_x = num if ctx.has_lora_x else 1
        lora_xs, rest = rest[:num_x], rest[num_x:]
        weights, lora_as, lora_bs = rest[:num], rest[num:2 * num], rest[2 * num:]
        needs = ctx.needs_input_grad
        dys = [None if g is None else g if g.stride(-1) == 1 else g.contiguous() for g in grads]
        dyb = xa.new_empty(xa.shape[0], sum(ranks))
        lora_grads = []
        for p, (dy, lora_b, xa_p, dyb_p, scaling) in enumerate(zip(
                dys, lora_bs, xa.split(ranks, dim=1), dyb.split(ranks, dim=1), ctx.scalings,
                strict=True)):
            if dy is None:
                dyb_p.zero_()
                lora_grads.append((None, None))
                continue
            dyb_p.addmm_(dy, lora_b, beta=0, alpha=scaling)  # s dy B, in dyb's columns for p
            d_bias = dy.sum(0) if needs[3 + 4 * p + 1] else None
            d_lora_b = (torch.empty_like(lora_b).addmm_(dy.t(), xa_p, beta=0, alpha=scaling)
                        if needs[3 + 4 * p + 3] else None)
            lora_grads.append((d_bias, d_lora_b))
        live = [(dy, w) for dy, w in zip(dys, weights, strict=True) if dy is not None]
        d_lora_xs: list[torch.Tensor | None] = []
        if ctx.has_lora_x:
            dybs = dyb.split(ranks, 1)
            d_lora_as = [dyb_p.t() @ lx for dyb_p, lx in zip(dybs, lora_xs, strict=True)]
            d_lora_xs = [dyb_p @ a if needs[3 + 4 * num + p] else None
                         for p, (dyb_p, a) in enumerate(zip(dybs, lora_as, strict=True))]
            dx = None
            if needs[0] and live:
                dx = live[0][0] @ live[0][1]
                for dy, weight in live[1:]:
                    dx.addmm_(dy, weight)
        else:
            d_lora_as = list((dyb.t() @ lora_xs[0]).split(ranks, dim=0))
            dx = None
            if needs[0]:  # the rank-r term first; each base product adds onto dx in its epilogue
                dx = dyb @ (torch.cat(lora_as) if num > 1 else lora_as[0])
                for dy, weight in live:
                    dx.addmm_(dy, weight)
        per_projection = []
        for p in range(num):
            d_bias, d_lora_b = lora_grads[p]
            d_lora_a = d_lora_as[p] if needs[3 + 4 * p + 2] else None
            per_projection += [None, d_bias, d_lora_a, d_lora_b]
        return (dx, None, None, *per_projection, *d_lora_xs)


_MLP_TENSORS = 6  # _LoRAMLP.forward's first tensor argument after ctx (for needs_input_grad)


class _LoRAMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)), each projection LoRA-adapted, x [N, H]. Tensors: gate's, up's
    and down's (weight, bias, lora_a, lora_b), then gate's and up's dropped x when `has_lora_x`."""

    @staticmethod
    def forward(ctx, x, gelu, scalings, down_dropout, down_dropout_dtype, has_lora_x, *tensors):
        (w_g, b_g, a_g, bb_g, w_u, b_u, a_u, bb_u, w_d, b_d, a_d, bb_d) = tensors[:12]
        s_g, s_u, s_d = scalings
        if has_lora_x:
            lora_xs = tensors[12:14]
            xa = torch.cat([lora_xs[0] @ a_g.t(), lora_xs[1] @ a_u.t()], dim=1)
        else:
            lora_xs = (x,)
            xa = x @ torch.cat([a_g, a_u]).t()
        gate = x @ w_g.t() if b_g is None else torch.addmm(b_g, x, w_g.t())
        up = x @ w_u.t() if b_u is None else torch.addmm(b_u, x, w_u.t())
        keep = None
        if down_dropout > 0:  # PEFT's F.dropout(h cast to lora_A's dtype) draws through this op
            h, _ = lora_glu_forward(gate, up, xa, bb_g, bb_u, s_g, s_u, gelu, None)
            h_drop, keep = torch.ops.aten.native_dropout(h.to(down_dropout_dtype), down_dropout,
                                                         True)
            ha = h_drop.to(h.dtype) @ a_d.t()
            del h_drop
        else:
            h, ha = lora_glu_forward(gate, up, xa, bb_g, bb_u, s_g, s_u, gelu, a_d)
        y = _lora_up(ha, bb_d, s_d, b_d).addmm_(h, w_d.t())
        ctx.gelu, ctx.scalings, ctx.has_lora_x = gelu, scalings, has_lora_x
        ctx.down_dropout = down_dropout
        ctx.save_for_backward(gate, up, xa, ha, keep, *lora_xs, w_g, w_u, w_d, a_g, a_u, a_d,
                              bb_g, bb_u, bb_d)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, xa, ha, keep, *rest = ctx.saved_tensors
        lora_xs, (w_g, w_u, w_d, a_g, a_u, a_d, bb_g, bb_u, bb_d) = rest[:-9], rest[-9:]
        s_g, s_u, s_d = ctx.scalings
        rank_g = a_g.shape[0]
        needs = ctx.needs_input_grad
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dyb_d = torch.empty_like(ha).addmm_(dy, bb_d, beta=0, alpha=s_d)
        d_bb_d = torch.empty_like(bb_d).addmm_(dy.t(), ha, beta=0, alpha=s_d)
        d_b_d = dy.sum(0) if needs[_MLP_TENSORS + 9] else None
        dh = dy @ w_d
        keep_scale = 1.0 / (1.0 - ctx.down_dropout) if keep is not None else 1.0
        d_gate, d_up, dxa, d_a_d, d_bb_g, d_bb_u = lora_glu_backward(
            dh, gate, up, xa, bb_g, bb_u, a_d, dyb_d, s_g, s_u, ctx.gelu, keep, keep_scale)
        del dh
        # gate and up now hold their gradients: a second backward through them must fail.
        torch.autograd.graph.increment_version((gate, up))
        dxa = dxa.to(gate.dtype)
        dxa_g, dxa_u = dxa[:, :rank_g], dxa[:, rank_g:]
        d_lora_xs: list[torch.Tensor | None] = []
        if ctx.has_lora_x:
            d_a_g, d_a_u = dxa_g.t() @ lora_xs[0], dxa_u.t() @ lora_xs[1]
            d_lora_xs = [dxa_g @ a_g, dxa_u @ a_u]
            dx = d_gate @ w_g if needs[0] else None
        else:
            d_a_g, d_a_u = (dxa.t() @ lora_xs[0]).split([rank_g, a_u.shape[0]], dim=0)
            dx = dxa @ torch.cat([a_g, a_u]) if needs[0] else None
            if dx is not None:
                dx.addmm_(d_gate, w_g)
        if dx is not None:
            dx.addmm_(d_up, w_u)
        d_b_g = d_gate.sum(0) if needs[_MLP_TENSORS + 1] else None
        d_b_u = d_up.sum(0) if needs[_MLP_TENSORS + 5] else None
        cast = gate.dtype
        return (dx, None, None, None, None, None,
                None, d_b_g, d_a_g, d_bb_g.to(cast), None, d_b_u, d_a_u, d_bb_u.to(cast),
                None, d_b_d, d_a_d.to(cast), d_bb_d, *d_lora_xs)


# ---------------------------------------------------------------- public ops

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's products run in: autocast's when it is on (as F.linear would), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _lora_input(x: torch.Tensor, w: LoRAWeights, dtype: torch.dtype) -> torch.Tensor | None:
    """PEFT's dropout(x cast to lora_A's dtype), or None without dropout."""
    if w.dropout <= 0:
        return None
    return F.dropout(x.to(w.lora_a.dtype), w.dropout, True).to(dtype)


def _flat(w: LoRAWeights, dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [w.weight.to(dtype), None if w.bias is None else w.bias.to(dtype),
            w.lora_a.to(dtype), w.lora_b.to(dtype)]


def lora_projections(x: torch.Tensor, projections: list[LoRAWeights]) -> tuple[torch.Tensor, ...]:
    """PEFT's lora.Linear forward for each projection of one input x [..., in] (q, k, v): one
    autograd node, x read once for every A, dX accumulated in one buffer."""
    dtype = _compute_dtype(x)
    lora_xs = [_lora_input(x, w, dtype) for w in projections]  # PEFT's order of dropout draws
    x_c = x.to(dtype)
    has_lora_x = any(lx is not None for lx in lora_xs)
    rows = x_c.reshape(-1, x.shape[-1])
    flat_xs = ([(x_c if lx is None else lx).reshape(rows.shape) for lx in lora_xs]
               if has_lora_x else [])
    tensors = [t for w in projections for t in _flat(w, dtype)]
    with torch.autocast(x.device.type, enabled=False):
        outputs = _LoRAProjections.apply(rows, tuple(float(w.scaling) for w in projections),
                                         has_lora_x, *tensors, *flat_xs)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def lora_linear(x: torch.Tensor, w: LoRAWeights) -> torch.Tensor:
    """PEFT's lora.Linear forward (one projection), with the hand-derived backward."""
    return lora_projections(x, [w])[0]


def lora_mlp(x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, *,
             gelu: bool = False) -> torch.Tensor:
    """HF's gated MLP over PEFT LoRA projections: down(act(gate(x)) * up(x)), act silu or (gelu)
    gelu_pytorch_tanh. The Triton middle on CUDA (or the interpreter), the reference elsewhere."""
    dtype = _compute_dtype(x)
    lora_x_gate, lora_x_up = _lora_input(x, gate, dtype), _lora_input(x, up, dtype)
    if not use_triton(x) or torch.compiler.is_compiling():
        with torch.autocast(x.device.type, enabled=False):
            ws = [LoRAWeights(*_flat(w, dtype), w.scaling, w.dropout) for w in (gate, up, down)]
            return lora_mlp_reference(x.to(dtype), *ws, gelu=gelu, lora_x_gate=lora_x_gate,
                                      lora_x_up=lora_x_up)
    x_c = x.to(dtype)
    rows = x_c.reshape(-1, x.shape[-1])
    has_lora_x = lora_x_gate is not None or lora_x_up is not None
    flat_xs = ([(x_c if lx is None else lx).reshape(rows.shape) for lx in (lora_x_gate, lora_x_up)]
               if has_lora_x else [])
    tensors = [t for w in (gate, up, down) for t in _flat(w, dtype)]
    with torch.autocast(x.device.type, enabled=False):
        scalings = (float(gate.scaling), float(up.scaling), float(down.scaling))
        y = _LoRAMLP.apply(rows, gelu, scalings, float(down.dropout), down.lora_a.dtype,
                           has_lora_x, *tensors,
                           *flat_xs)
    return y.view(*x.shape[:-1], y.shape[-1])
