"""MoE experts as sorted, grouped GEMMs that gather and scatter inside the Triton kernels
(ScatterMoE's scheme), SwiGLU fused into their epilogues, LoRA on the expert weights fused in.

    from tunegraph.kernels.moe import moe_experts
    y_TH = moe_experts(x_TH, top_k_index_TK, top_k_weights_TK, gate_up_proj_E2IH, down_proj_EHI,
                       gate_up_lora=(A_ErH, B_E2Ir, scale), down_lora=(A_ErI, B_EHr, scale))

Computes what transformers 5's `<Model>Experts.forward(hidden_states, top_k_index, top_k_weights)`
computes (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3, GLM-4-MoE: weights stored as fused
3D parameters, gate_up_proj [E, 2I, H] with gate first, down_proj [E, H, I], silu):

    y[t] = sum_k w[t,k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),   e = index[t,k]

and, with LoRA on a weight W[e] (PEFT's `target_parameters`), W[e] + scale * B[e] @ A[e] in
place of W[e], without ever forming that sum. Patching HF models: tunegraph/kernels/moe_patch.py.
Tests: tests/kernels/test_moe.py; benchmark M1: benchmarks/m1_moe.py; numbers: benchmarks/NOTES.md.

How (T tokens, K picks each, TK = T * K rows; "sorted" = the TK (token, pick) rows ordered by
expert, a stable sort; one expert's rows are contiguous there):
1. Plan (`_Plan`): sort the flat expert indices, per-expert row offsets by binary search, and
   the tiles: each BLOCK_M-row tile of the sorted order belongs to one expert (an expert's last
   tile is partial). The grid is sized by the upper bound TK / BLOCK_M + E, so no host sync;
   programs past the real tiles return at once.
2. `_moe_up_fwd_kernel`: per tile, gathers x rows by token index, multiplies by the expert's
   gate and up rows (two accumulators), adds LoRA (x A^T, accumulated in the same K loop,
   then times B^T), writes gate_up (kept for the backward) and silu(gate) * up.
3. `_moe_scatter_kernel`: act @ down[e]^T (+ LoRA), each row written to its flat
   (token, pick) slot: the scatter.
4. `_moe_combine_fwd_kernel`: y[t] = sum_k w[t,k] out[t,k] in fp32: the routing weights are
   applied in the reduction (so the forward never writes a weighted copy).
Backward (dy):
5. `_moe_down_bwd_kernel`: g = dy[token] @ down[e] (+ LoRA), and in its epilogue d w[t,k] =
   g . act (= dy . out, so `out` is never stored), d act = w g, the SwiGLU backward into
   d gate_up, w * act for the down weight's gradient, and the gate_up LoRA's d gate_up @ B.
6. `_moe_scatter_kernel` again: d gate_up @ gate_up[e] (+ LoRA) to the flat slots; the K
   slots of a token are summed (torch) into dx.
7. `_moe_wgrad_bwd_kernel`: d W[e] = sum over the expert's rows of L^T R, one program per
   output tile, looping over the expert's rows (none: zeros); the same kernel gives LoRA's
   dA and dB (rank-wide tiles). Frozen experts (requires_grad False) skip d W entirely.

LoRA layout: the kernels read each B factor from a rank-major copy ([E, r, out] in memory,
`_rank_major`; PEFT's B has the expert index fastest), so its tiles load as contiguous rows;
gradients keep the caller's layout. LoRA and plain launches are autotuned separately.

Numerics follow HF's rounding points: gate_up, silu(gate), act and each expert's output are
rounded to the input dtype as HF's linear layers and activation round them; accumulation is fp32
in every product; the K-way combine is fp32 (HF eager accumulates it in bf16, grouped_mm in
fp32). Expert indices must lie in [0, E): expert-parallel sentinels are not supported.

The Triton path runs on CUDA tensors and on CPU tensors under TRITON_INTERPRET=1 (the tests);
elsewhere `moe_experts_reference` runs: the same math in PyTorch, one expert at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunegraph.kernels import (
    cdiv,
    is_dense,
    next_power_of_2,
    row_sum,
    tl,
    triton,
    use_triton,
)

# Tiles for the Triton interpreter (CPU tests): small enough that the tests' odd sizes span
# several row and column tiles (masked edges, per-column-block partial sums), large enough to
# keep the interpreter's per-op cost (~1 ms) affordable; K loops of two steps at H = 67.
INTERPRET_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}
# The weight-gradient kernel's grid is tiles x experts whatever the token count: wider tiles
# (still two per side at the tests' sizes), and 32-row steps so popular experts loop.
INTERPRET_WGRAD_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
# K loops skip their K masks when K is a multiple of every BLOCK_K the GPU configs use.
EVEN_K_MULTIPLE = 64

LoRA = tuple[torch.Tensor, torch.Tensor, float]  # (A [E, r, in], B [E, out, r], scale)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _silu_parts(gate):
    """(silu(gate), silu'(gate)) in fp32."""
    s = 1.0 / (1.0 + tl.exp(-gate))
    return gate * s, s * (1.0 + gate * (1.0 - s))


@triton.jit
def _tile(pid, num_cols, BLOCK_EXPERT, BLOCK_ROW, OFFSETS, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """(expert, rows, row mask, column block) of a token-tiled program; expert == -1 for the
    programs past the real tiles. Column blocks vary fastest: neighbouring programs share the
    tile's rows and walk the expert's weight."""
    num_n = (num_cols + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert = tl.load(BLOCK_EXPERT + pid_m)
    row_start = tl.load(BLOCK_ROW + pid_m)
    row_end = tl.load(OFFSETS + expert + 1)  # OFFSETS has E + 2 entries: padding tiles read TK
    rows = row_start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < row_end, pid_n


@triton.jit
def _moe_up_fwd_kernel(
        X, stride_x, TOKEN, BLOCK_EXPERT, BLOCK_ROW, OFFSETS,
        W, stride_we, stride_wn, stride_wk,
        LA, stride_lae, stride_lar, stride_lak,
        LB, stride_lbe, stride_lbn, stride_lbr,
        GATE_UP, ACT, XA, lora_scale, num_experts, hidden, inter, rank,
        HAS_LORA: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """gate_up[s] = x[token[s]] @ W[e]^T (+ scale (x A^T) B^T), act[s] = silu(gate) * up, for
    the sorted rows s of one tile and BLOCK_N columns of gate and of up; XA[s] = x A^T."""
    expert, rows, row_mask, pid_n = _tile(tl.program_id(0), inter, BLOCK_EXPERT, BLOCK_ROW,
                                          OFFSETS, BLOCK_M, BLOCK_N)
    if expert < num_experts:
        dtype = X.dtype.element_ty
        tokens = tl.load(TOKEN + rows, mask=row_mask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < inter
        ks = tl.arange(0, BLOCK_K)
        rs = tl.arange(0, BLOCK_R)
        e64 = expert.to(tl.int64)
        x_ptrs = X + tokens[:, None] * stride_x + ks[None, :]
        wg_ptrs = W + e64 * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        wu_ptrs = wg_ptrs + inter * stride_wn
        la_ptrs = LA + e64 * stride_lae + rs[None, :] * stride_lar + ks[:, None] * stride_lak
        acc_g = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        acc_u = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        xa = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
                wg = tl.load(wg_ptrs, mask=col_mask[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                k_mask = ks < hidden - k0
                x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
            if HAS_LORA:
                la = tl.load(la_ptrs, mask=(ks < hidden - k0)[:, None] & (rs < rank)[None, :],
                             other=0.0).to(dtype)
                xa = tl.dot(x, la, xa, input_precision=PRECISION)
                la_ptrs += BLOCK_K * stride_lak
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K * stride_wk
            wu_ptrs += BLOCK_K * stride_wk
        if HAS_LORA:
            # The low-rank product is rounded to the input dtype, as PEFT's lora_A output is.
            xa_in = xa.to(dtype)
            lb_ptrs = LB + e64 * stride_lbe + cols[None, :] * stride_lbn + rs[:, None] * stride_lbr
            lb_mask = (rs < rank)[:, None] & col_mask[None, :]
            lb_g = tl.load(lb_ptrs, mask=lb_mask, other=0.0).to(dtype)
            lb_u = tl.load(lb_ptrs + inter * stride_lbn, mask=lb_mask, other=0.0).to(dtype)
            # acc + s (xa B^T) as (acc / s + xa B^T) s: the dot accumulates in place, no second
            # [BLOCK_M, BLOCK_N] fp32 tile. With one, BLOCK_N 128 needed 255 registers and ptxas
            # kept an accumulator in local memory, reloaded and stored around every K step's
            # wgmma (sm_90a SASS); now 223, no spill. s != 0 (moe_experts); exact for
            # power-of-two s, else within two fp32 ulps.
            acc_g = tl.dot(xa_in, lb_g, acc_g * (1.0 / lora_scale),
                           input_precision=PRECISION) * lora_scale
            acc_u = tl.dot(xa_in, lb_u, acc_u * (1.0 / lora_scale),
                           input_precision=PRECISION) * lora_scale
            if pid_n == 0:
                tl.store(XA + rows[:, None].to(tl.int64) * rank + rs[None, :], xa_in,
                         mask=row_mask[:, None] & (rs < rank)[None, :])
        gate = acc_g.to(dtype)
        up = acc_u.to(dtype)
        out_mask = row_mask[:, None] & col_mask[None, :]
        gu_ptrs = GATE_UP + rows[:, None].to(tl.int64) * (2 * inter) + cols[None, :]
        tl.store(gu_ptrs, gate, mask=out_mask)
        tl.store(gu_ptrs + inter, up, mask=out_mask)
        silu, _ = _silu_parts(gate.to(tl.float32))
        # HF: act_fn(gate) * up, each op rounding to the input dtype.
        act = silu.to(dtype).to(tl.float32) * up.to(tl.float32)
        tl.store(ACT + rows[:, None].to(tl.int64) * inter + cols[None, :], act.to(dtype),
                 mask=out_mask)


@triton.jit
def _moe_scatter_kernel(
        A, stride_a, ORDER, BLOCK_EXPERT, BLOCK_ROW, OFFSETS,
        W, stride_we, stride_wn, stride_wk,
        LA, stride_lae, stride_lak, stride_lar,
        LB, stride_lbe, stride_lbr, stride_lbn,
        LOW, ROUTING, OUT, lora_scale, num_experts, num_cols, num_inner, rank,
        LORA: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """out[order[s]] = A[s] @ W[e]^T for the sorted rows s of one tile, written to their flat
    (token, pick) slots. W[e]'s element (n, k) is at stride_wn, stride_wk. LoRA:
    LORA == 1: low = A[s] @ LA[e] (the [K, r] view at stride_lak, stride_lar), accumulated in
               the K loop and stored (times the routing weight) to LOW (the forward's down_proj);
    LORA == 2: low = LOW[s] given (the backward's d gate_up @ B);
    then out += scale * low @ LB[e] ([r, N] at stride_lbr, stride_lbn)."""
    expert, rows, row_mask, pid_n = _tile(tl.program_id(0), num_cols, BLOCK_EXPERT, BLOCK_ROW,
                                          OFFSETS, BLOCK_M, BLOCK_N)
    if expert < num_experts:
        dtype = A.dtype.element_ty
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < num_cols
        ks = tl.arange(0, BLOCK_K)
        rs = tl.arange(0, BLOCK_R)
        e64 = expert.to(tl.int64)
        rows64 = rows.to(tl.int64)
        a_ptrs = A + rows64[:, None] * stride_a + ks[None, :]
        w_ptrs = W + e64 * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        la_ptrs = LA + e64 * stride_lae + ks[:, None] * stride_lak + rs[None, :] * stride_lar
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        low = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
        for k0 in range(0, num_inner, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                k_mask = ks < num_inner - k0
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if LORA == 1:
                la = tl.load(la_ptrs, mask=(ks < num_inner - k0)[:, None] & (rs < rank)[None, :],
                             other=0.0).to(dtype)
                low = tl.dot(a, la, low, input_precision=PRECISION)
                la_ptrs += BLOCK_K * stride_lak
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        slots = tl.load(ORDER + rows, mask=row_mask, other=0).to(tl.int64)
        if LORA != 0:
            low_mask = row_mask[:, None] & (rs < rank)[None, :]
            low_ptrs = LOW + rows64[:, None] * rank + rs[None, :]
            if LORA == 1:
                low_in = low.to(dtype)
                if pid_n == 0:
                    weight = tl.load(ROUTING + slots, mask=row_mask, other=0.0).to(tl.float32)
                    tl.store(low_ptrs, (low_in.to(tl.float32) * weight[:, None]).to(dtype),
                             mask=low_mask)
            else:
                low_in = tl.load(low_ptrs, mask=low_mask, other=0.0).to(dtype)
            lb = tl.load(LB + e64 * stride_lbe + rs[:, None] * stride_lbr + cols[None, :] * stride_lbn,
                         mask=(rs < rank)[:, None] & col_mask[None, :], other=0.0).to(dtype)
            # In place, as in _moe_up_fwd_kernel (182 -> 114 registers at BLOCK_N 128).
            acc = tl.dot(low_in, lb, acc * (1.0 / lora_scale), input_precision=PRECISION) * lora_scale
        tl.store(OUT + slots[:, None] * num_cols + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _moe_combine_fwd_kernel(OUT, ROUTING, Y, num_tokens, hidden, top_k,
                            BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t] = sum_k w[t,k] out[t*K + k], fp32 accumulation."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    acc = tl.full([BLOCK_T, BLOCK_H], 0.0, tl.float32)
    for k in range(0, top_k):
        slots = tokens.to(tl.int64) * top_k + k
        weight = tl.load(ROUTING + slots, mask=token_mask, other=0.0).to(tl.float32)
        out = tl.load(OUT + slots[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * out.to(tl.float32)
    tl.store(Y + tokens[:, None].to(tl.int64) * hidden + cols[None, :],
             acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _moe_down_bwd_kernel(
        DY, stride_dy, TOKEN, ORDER, BLOCK_EXPERT, BLOCK_ROW, OFFSETS,
        W, stride_we, stride_wk, stride_wn,
        LBD, stride_lbde, stride_lbdk, stride_lbdr,
        LAD, stride_lade, stride_ladr, stride_ladn,
        LBG, stride_lbge, stride_lbgn, stride_lbgr,
        ROUTING, GATE_UP, D_GATE_UP, WACT, DW_PART, DYB, DYB_GU_PART,
        lora_scale, num_experts, num_rows, hidden, inter, rank_d, rank_gu,
        DOWN_LORA: tl.constexpr, GATE_UP_LORA: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """g = dy[token[s]] @ W_down[e] (+ scale (dy B_d) A_d) for BLOCK_N intermediate columns,
    then the epilogue: d w (partial over these columns) = g . act, d act = w g, the SwiGLU
    backward into d gate_up, w * act, and (gate_up LoRA) d gate_up @ B_gu (partial)."""
    expert, rows, row_mask, pid_n = _tile(tl.program_id(0), inter, BLOCK_EXPERT, BLOCK_ROW,
                                          OFFSETS, BLOCK_M, BLOCK_N)
    if expert < num_experts:
        dtype = DY.dtype.element_ty
        tokens = tl.load(TOKEN + rows, mask=row_mask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < inter
        ks = tl.arange(0, BLOCK_K)
        rs = tl.arange(0, BLOCK_R)
        e64 = expert.to(tl.int64)
        rows64 = rows.to(tl.int64)
        dy_ptrs = DY + tokens[:, None] * stride_dy + ks[None, :]
        w_ptrs = W + e64 * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        lbd_ptrs = LBD + e64 * stride_lbde + ks[:, None] * stride_lbdk + rs[None, :] * stride_lbdr
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        dyb = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                dy = tl.load(dy_ptrs, mask=row_mask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
            else:
                k_mask = ks < hidden - k0
                dy = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
            if DOWN_LORA:
                lbd = tl.load(lbd_ptrs, mask=(ks < hidden - k0)[:, None] & (rs < rank_d)[None, :],
                              other=0.0).to(dtype)
                dyb = tl.dot(dy, lbd, dyb, input_precision=PRECISION)
                lbd_ptrs += BLOCK_K * stride_lbdk
            dy_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        if DOWN_LORA:
            dyb_in = dyb.to(dtype)
            lad = tl.load(LAD + e64 * stride_lade + rs[:, None] * stride_ladr + cols[None, :] * stride_ladn,
                          mask=(rs < rank_d)[:, None] & col_mask[None, :], other=0.0).to(dtype)
            acc += lora_scale * tl.dot(dyb_in, lad, input_precision=PRECISION)
            if pid_n == 0:
                tl.store(DYB + rows64[:, None] * rank_d + rs[None, :], dyb_in,
                         mask=row_mask[:, None] & (rs < rank_d)[None, :])
        slots = tl.load(ORDER + rows, mask=row_mask, other=0).to(tl.int64)
        weight = tl.load(ROUTING + slots, mask=row_mask, other=0.0).to(tl.float32)
        mask = row_mask[:, None] & col_mask[None, :]
        gu_ptrs = GATE_UP + rows64[:, None] * (2 * inter) + cols[None, :]
        gate = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        silu, dsilu = _silu_parts(gate)
        silu = silu.to(dtype).to(tl.float32)
        act = (silu * up).to(dtype).to(tl.float32)  # the forward's act, as rounded there
        # d w[t,k] = dy[t] . out[t,k] = (dy[t] @ W_down[e]) . act = g . act: partial over
        # this column block, summed over blocks on the host (deterministic, no atomics).
        tl.store(DW_PART + pid_n * num_rows + slots, row_sum(acc * act, 1), mask=row_mask)
        d_act = acc * weight[:, None]
        d_gate = d_act * up * dsilu
        d_up = d_act * silu
        dgu_ptrs = D_GATE_UP + rows64[:, None] * (2 * inter) + cols[None, :]
        tl.store(dgu_ptrs, d_gate.to(dtype), mask=mask)
        tl.store(dgu_ptrs + inter, d_up.to(dtype), mask=mask)
        tl.store(WACT + rows64[:, None] * inter + cols[None, :], (act * weight[:, None]).to(dtype),
                 mask=mask)
        if GATE_UP_LORA:
            lbg_ptrs = LBG + e64 * stride_lbge + cols[:, None] * stride_lbgn + rs[None, :] * stride_lbgr
            lbg_mask = col_mask[:, None] & (rs < rank_gu)[None, :]
            lbg = tl.load(lbg_ptrs, mask=lbg_mask, other=0.0).to(dtype)
            lbu = tl.load(lbg_ptrs + inter * stride_lbgn, mask=lbg_mask, other=0.0).to(dtype)
            part = tl.dot(d_gate.to(dtype), lbg, input_precision=PRECISION)
            part = tl.dot(d_up.to(dtype), lbu, part, input_precision=PRECISION)
            tl.store(DYB_GU_PART + (pid_n * num_rows + rows64)[:, None] * rank_gu + rs[None, :], part,
                     mask=row_mask[:, None] & (rs < rank_gu)[None, :])


@triton.jit
def _moe_wgrad_bwd_kernel(
        L, stride_l, R, stride_r, TOKEN, OFFSETS, EXPERT_ORDER,
        DW, stride_de, stride_dm, stride_dn, scale, num_m, num_n,
        L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e, m, n] = scale * sum over expert e's sorted rows s of L[l(s), m] R[r(s), n], where
    l(s) = token[s] when L_GATHER else s (likewise r). Experts go busiest first (EXPERT_ORDER),
    so the long loops of popular experts start early; an expert without rows gets zeros."""
    tiles_n = (num_n + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    expert = tl.load(EXPERT_ORDER + tl.program_id(1))
    ms = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < num_m
    n_mask = ns < num_n
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    dtype = R.dtype.element_ty
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_K):
        rows = s0 + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        tokens = tl.load(TOKEN + rows, mask=row_mask, other=0).to(tl.int64)
        if L_GATHER:
            l_rows = tokens
        else:
            l_rows = rows.to(tl.int64)
        if R_GATHER:
            r_rows = tokens
        else:
            r_rows = rows.to(tl.int64)
        lt = tl.load(L + l_rows[None, :] * stride_l + ms[:, None], mask=m_mask[:, None] & row_mask[None, :],
                     other=0.0).to(dtype)
        r = tl.load(R + r_rows[:, None] * stride_r + ns[None, :], mask=row_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(lt, r, acc, input_precision=PRECISION)
    tl.store(DW + expert.to(tl.int64) * stride_de + ms[:, None] * stride_dm + ns[None, :] * stride_dn,
             (acc * scale).to(DW.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Host side: the plan, launch configurations, the kernels' wrappers
# ----------------------------------------------------------------------------------------------
class _Plan:
    """The sorted order of one call's TK rows and its tiles (device tensors; no host sync)."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_m: int):
        num_tokens, top_k = top_k_index.shape
        device = top_k_index.device
        flat = top_k_index.reshape(-1)
        sorted_experts, order = torch.sort(flat, stable=True)
        experts = torch.arange(num_experts + 1, device=device, dtype=sorted_experts.dtype)
        offsets = torch.searchsorted(sorted_experts, experts)  # [E + 1]: offsets[E] = TK
        counts = offsets[1:] - offsets[:-1]
        blocks = (counts + block_m - 1) // block_m
        block_end = torch.cumsum(blocks, 0)
        self.num_rows = num_tokens * top_k
        self.num_blocks = cdiv(self.num_rows, block_m) + num_experts  # >= sum(blocks)
        tile = torch.arange(self.num_blocks, device=device)
        block_expert = torch.searchsorted(block_end, tile, right=True)  # E for padding tiles
        clamped = block_expert.clamp(max=num_experts - 1)
        block_row = offsets[clamped] + (tile - (block_end - blocks)[clamped]) * block_m
        self.block_m = block_m
        self.order = order.to(torch.int32)  # sorted row -> flat slot t * K + k
        self.token = (order // top_k).to(torch.int32)  # sorted row -> token
        # One extra entry, so a padding tile (expert E) reads its end as TK.
        self.offsets = torch.cat([offsets, offsets[-1:]]).to(torch.int32)
        self.block_expert = block_expert.to(torch.int32)
        self.block_row = block_row.to(torch.int32)
        self.expert_order = torch.argsort(counts, descending=True).to(torch.int32)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.order, self.token, self.offsets, self.block_expert, self.block_row,
                self.expert_order)

    @classmethod
    def from_tensors(cls, tensors, num_rows: int, block_m: int) -> _Plan:
        plan = cls.__new__(cls)
        (plan.order, plan.token, plan.offsets, plan.block_expert, plan.block_row,
         plan.expert_order) = tensors
        plan.num_rows, plan.block_m = num_rows, block_m
        plan.num_blocks = plan.block_expert.numel()
        return plan


# Hopper-class GPUs (wgmma), bf16, H >= 1024: candidates each kernel is autotuned over, once
# per (N, K) shape. 128-row tiles use two warpgroups; 64-row tiles are for experts with few rows.
_GEMM_CONFIGS = [
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]
# The up-projection computes gate and up (two accumulators), so its BLOCK_N counts double.
_UP_CONFIGS = [
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]
# The down-projection's backward carries the SwiGLU backward in its epilogue: 254 registers a
# thread at BLOCK_N 64 with 8 warps (ptxas, sm_90a); BLOCK_N 128 spills (1.1 KB of stack).
_DOWN_BWD_CONFIGS = [
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]
_WGRAD_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]
assert all(EVEN_K_MULTIPLE % c["BLOCK_K"] == 0
           for c in _GEMM_CONFIGS + _UP_CONFIGS + _DOWN_BWD_CONFIGS)
_TUNED: dict[str, object] = {}


def _launcher(kernel, name: str, configs: list[dict], key: list[str], device: torch.device,
              token_tiled: bool = True, reset_to_zero: list[str] | None = None):
    """(kernel, fixed meta-parameters): the interpreter gets the small fixed tiles; CUDA an
    autotuned wrapper. Every kernel here writes the same outputs however often it runs, so
    tuning on the real arguments is safe, except partial sums whose layout depends on BLOCK_N:
    those buffers are zeroed before each trial and before the chosen config's run
    (`reset_to_zero`), so no trial leaves stale partials. Token-tiled kernels take BLOCK_M from
    the plan, so it is not among their meta-parameters."""
    if device.type != "cuda":
        if not token_tiled:
            return kernel, dict(INTERPRET_WGRAD_TILES)
        return kernel, {k: v for k, v in INTERPRET_TILES.items() if k != "BLOCK_M"}
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(
            configs=[triton.Config({k: v for k, v in c.items() if k.isupper()},
                                   num_warps=c["num_warps"], num_stages=c["num_stages"])
                     for c in configs], key=key, reset_to_zero=reset_to_zero)(kernel)
    return _TUNED[name], {}


def _block_m(num_rows: int, num_experts: int, device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_TILES["BLOCK_M"]
    # 128-row tiles (two wgmma warpgroups) when experts average a full tile or more; else 64,
    # to waste less of each expert's last, partial tile.
    return 128 if num_rows >= 128 * num_experts else 64


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 operands: true fp32 products ("ieee"), not tf32, so fp32 runs match HF's fp32
    # matmuls (torch's default); bf16/fp16: Triton's default.
    return "ieee" if dtype == torch.float32 else None


def _even_k(num_inner: int, meta: dict) -> bool:
    """Whether K loops may skip their K masks: K a multiple of BLOCK_K (autotuned launches have
    no fixed BLOCK_K, but every candidate's divides EVEN_K_MULTIPLE)."""
    return num_inner % meta.get("BLOCK_K", EVEN_K_MULTIPLE) == 0


def _rank_block(rank: int) -> int:
    return max(16, next_power_of_2(rank))  # tl.dot needs every dimension >= 16


def _lora_parts(lora: LoRA | None, dummy: torch.Tensor):
    if lora is None:
        return dummy, dummy, 0.0, 0
    a, b, scale = lora
    return a, b, float(scale), a.shape[1]


def _up_forward(x, w, plan: _Plan, lora: LoRA | None):
    num_rows, inter = plan.num_rows, w.shape[1] // 2
    hidden = x.shape[1]
    gate_up = torch.empty(num_rows, 2 * inter, device=x.device, dtype=x.dtype)
    act = torch.empty(num_rows, inter, device=x.device, dtype=x.dtype)
    la, lb, scale, rank = _lora_parts(lora, w)
    xa = torch.empty(num_rows, rank, device=x.device, dtype=x.dtype)
    kernel, meta = _launcher(_moe_up_fwd_kernel, "up_fwd", _UP_CONFIGS,
                             ["inter", "hidden", "BLOCK_M", "HAS_LORA"], x.device)
    grid = lambda m: (plan.num_blocks * cdiv(inter, (meta or m)["BLOCK_N"]),)  # noqa: E731
    kernel[grid](x, x.stride(0), plan.token, plan.block_expert, plan.block_row, plan.offsets,
                 w, *w.stride(), la, *la.stride(), lb, *lb.stride(), gate_up, act, xa, scale,
                 w.shape[0], hidden, inter, rank, HAS_LORA=lora is not None,
                 PRECISION=_precision(x.dtype), EVEN_K=_even_k(hidden, meta),
                 BLOCK_M=plan.block_m, BLOCK_R=_rank_block(rank), **meta)
    return gate_up, act, xa


def _scatter(a, w, w_strides_nk, num_cols: int, plan: _Plan, *, lora_mode: int = 0,
             la=None, la_strides_ekr=(0, 0, 0), lb=None, lb_strides_ern=(0, 0, 0), low=None,
             routing=None, scale: float = 0.0, rank: int = 0) -> torch.Tensor:
    """out[order[s]] = a[s] @ W[e]^T (+ LoRA) over the flat (token, pick) slots: [TK, num_cols].
    W[e]'s element (n, k) is at w_strides_nk = (expert, n, k) strides; LoRA as in the kernel."""
    num_inner = a.shape[1]
    out = torch.empty(plan.num_rows, num_cols, device=a.device, dtype=a.dtype)
    kernel, meta = _launcher(_moe_scatter_kernel, "scatter", _GEMM_CONFIGS,
                             ["num_cols", "num_inner", "BLOCK_M", "LORA"], a.device)
    grid = lambda m: (plan.num_blocks * cdiv(num_cols, (meta or m)["BLOCK_N"]),)  # noqa: E731
    kernel[grid](a, a.stride(0), plan.order, plan.block_expert, plan.block_row, plan.offsets,
                 w, *w_strides_nk, a if la is None else la, *la_strides_ekr,
                 a if lb is None else lb, *lb_strides_ern, a if low is None else low,
                 a if routing is None else routing, out, scale, w.shape[0], num_cols, num_inner,
                 rank, LORA=lora_mode, PRECISION=_precision(a.dtype),
                 EVEN_K=_even_k(num_inner, meta), BLOCK_M=plan.block_m, BLOCK_R=_rank_block(rank),
                 **meta)
    return out


def _combine(out_flat, routing, num_tokens, hidden, top_k, dtype):
    y = torch.empty(num_tokens, hidden, device=out_flat.device, dtype=dtype)
    block_t, block_h = (16, 16) if out_flat.device.type != "cuda" else (8, 512)
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    _moe_combine_fwd_kernel[grid](out_flat, routing, y, num_tokens, hidden, top_k,
                                  BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return y


def _wgrad(left, left_gather: bool, right, right_gather: bool, plan: _Plan, out: torch.Tensor,
           out_strides, num_m: int, num_n: int, scale: float = 1.0, name: str = "wgrad"):
    """out[e] (viewed [E, num_m, num_n] through out_strides) = scale * sum_s L^T R."""
    num_experts = plan.offsets.numel() - 2
    small = min(num_m, num_n) <= 64  # a LoRA factor's rank-wide side
    if out.device.type == "cuda" and small:
        kernel, meta = _moe_wgrad_bwd_kernel, {
            "BLOCK_M": _rank_block(num_m) if num_m <= 64 else 64,
            "BLOCK_N": _rank_block(num_n) if num_n <= 64 else 128,
            "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    else:
        kernel, meta = _launcher(_moe_wgrad_bwd_kernel, name, _WGRAD_CONFIGS,
                                 ["num_m", "num_n"], out.device, token_tiled=False)
    grid = lambda m: (cdiv(num_m, (meta or m)["BLOCK_M"])  # noqa: E731
                      * cdiv(num_n, (meta or m)["BLOCK_N"]), num_experts)
    kernel[grid](left, left.stride(0), right, right.stride(0), plan.token, plan.offsets,
                 plan.expert_order, out, *out_strides, scale, num_m, num_n,
                 L_GATHER=left_gather, R_GATHER=right_gather, PRECISION=_precision(right.dtype),
                 **meta)


def _launched_meta(kernel, meta: dict) -> dict:
    """The meta-parameters of the launch just made: the fixed ones, or the autotuner's pick."""
    return meta or kernel.best_config.kwargs


def _rank_major(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A LoRA B factor [E, out, r] as a view of a rank-major [E, r, out] buffer in the compute
    dtype (a copy unless it is one already: 8 MB for Qwen3-30B-A3B's down_proj at r 16). PEFT's
    B is lora_B.weight [out, r * E] viewed [E, out, r]: the expert index is its fastest axis, so
    a kernel's [r, BLOCK_N] tile of it is r * BLOCK_N 2-byte elements 256 B apart, each its own
    sector and no cp.async: in the down backward's K loop that load stalled every step (one
    program per SM there). Rank-major, every B tile the kernels read is rows of out contiguous
    (the kernels cast B to the compute dtype on load anyway, so the cast changes no result)."""
    num_experts, out_features, rank = b.shape
    if b.dtype == dtype and b.stride() == (rank * out_features, 1, out_features):
        return b
    buffer = torch.empty(num_experts, rank, out_features, device=b.device, dtype=dtype)
    buffer.copy_(b.transpose(1, 2))
    return buffer.transpose(1, 2)


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """A gradient buffer with t's strides when t is dense (PEFT's B factor is a permuted view
    of lora_B.weight: its gradient then flows back through the view without a copy)."""
    if is_dense(t):
        return torch.empty_strided(t.shape, t.stride(), device=t.device, dtype=t.dtype)
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gu_a, gu_b, d_a,
                d_b, gu_scale, d_scale):
        num_tokens, hidden = x.shape
        top_k = top_k_index.shape[1]
        num_experts = gate_up_proj.shape[0]
        routing = top_k_weights.reshape(-1)
        if not routing.is_contiguous():
            routing = routing.contiguous()
        plan = _Plan(top_k_index, num_experts, _block_m(num_tokens * top_k, num_experts, x.device))
        # B factors as rank-major copies (see _rank_major): the kernels read them, the
        # originals only give their gradients' layout.
        gu_bk = _rank_major(gu_b, x.dtype) if gu_b is not None else None
        d_bk = _rank_major(d_b, x.dtype) if d_b is not None else None
        gu_lora = (gu_a, gu_bk, gu_scale) if gu_a is not None else None
        gate_up, act, xa = _up_forward(x, gate_up_proj, plan, gu_lora)
        d_rank = d_a.shape[1] if d_a is not None else 0
        wxa2 = torch.empty(plan.num_rows, d_rank, device=x.device, dtype=x.dtype)
        # down_proj [E, H, I]: (n, k) = (h, i). LoRA: act @ A^T accumulated in the K loop
        # (A [E, r, I] read as [I, r]), stored times the routing weight, then @ B^T (B [E, H, r]
        # read as [r, H]).
        lora = {}
        if d_a is not None:
            lora = {"lora_mode": 1, "la": d_a, "lb": d_bk, "low": wxa2, "scale": d_scale,
                    "rank": d_rank, "la_strides_ekr": (d_a.stride(0), d_a.stride(2), d_a.stride(1)),
                    "lb_strides_ern": (d_bk.stride(0), d_bk.stride(2), d_bk.stride(1))}
        out_flat = _scatter(act, down_proj, down_proj.stride(), hidden, plan, routing=routing,
                            **lora)
        del act
        y = _combine(out_flat, routing, num_tokens, hidden, top_k, x.dtype)
        ctx.save_for_backward(x, routing, gate_up_proj, down_proj, gate_up, xa, wxa2, gu_a, gu_b,
                              d_a, d_b, gu_bk, d_bk, *plan.tensors())
        ctx.meta = (num_tokens, top_k, plan.block_m, gu_scale, d_scale, top_k_weights.shape,
                    top_k_weights.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, routing, gate_up_proj, down_proj, gate_up, xa, wxa2, gu_a, gu_b, d_a, d_b, gu_bk,
         d_bk, *plan_tensors) = ctx.saved_tensors
        num_tokens, top_k, block_m, gu_scale, d_scale, weights_shape, weights_dtype = ctx.meta
        plan = _Plan.from_tensors(plan_tensors, num_tokens * top_k, block_m)
        need = ctx.needs_input_grad
        dy = dy.to(x.dtype).contiguous()
        hidden, inter = x.shape[1], gate_up_proj.shape[1] // 2
        num_experts, num_rows, device = gate_up_proj.shape[0], plan.num_rows, x.device
        d_rank = d_a.shape[1] if d_a is not None else 0
        gu_rank = gu_a.shape[1] if gu_a is not None else 0

        # 5. d gate_up, d routing weights, w * act (and the LoRA low-rank rows)
        # LoRA variants carry extra loads, dots and registers: tuned on their own.
        kernel, meta = _launcher(_moe_down_bwd_kernel, "down_bwd", _DOWN_BWD_CONFIGS,
                                 ["inter", "hidden", "BLOCK_M", "DOWN_LORA", "GATE_UP_LORA"],
                                 device, reset_to_zero=["DW_PART", "DYB_GU_PART"])
        block_n_for = lambda m: (meta or m)["BLOCK_N"]  # noqa: E731
        # Partial sums over column blocks: sized for the smallest BLOCK_N any config uses. The
        # launch writes every row of its first cdiv(inter, BLOCK_N) blocks and nothing else, so
        # the buffers are not zeroed and only those blocks are summed (at T 32768 the gate_up
        # LoRA's [24, TK, r] fp32 partials are 0.4 GB: zeroing all and summing all cost ~0.2 ms).
        max_col_blocks = cdiv(inter, min([c["BLOCK_N"] for c in _DOWN_BWD_CONFIGS]
                                                + [meta.get("BLOCK_N", 1 << 30)]))
        dw_part = torch.empty(max_col_blocks, num_rows, device=device, dtype=torch.float32)
        d_gate_up = torch.empty_like(gate_up)
        wact = torch.empty(num_rows, inter, device=device, dtype=x.dtype)
        dyb = torch.empty(num_rows, d_rank, device=device, dtype=x.dtype)
        dyb_gu_part = torch.empty(max_col_blocks if gu_a is not None else 0, num_rows, gu_rank,
                                  device=device, dtype=torch.float32)
        dummy = x
        grid = lambda m: (plan.num_blocks * cdiv(inter, block_n_for(m)),)  # noqa: E731
        kernel[grid](
            dy, dy.stride(0), plan.token, plan.order, plan.block_expert, plan.block_row,
            plan.offsets, down_proj, down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
            *((d_bk, *d_bk.stride()) if d_bk is not None else (dummy, 0, 0, 0)),
            *((d_a, d_a.stride(0), d_a.stride(1), d_a.stride(2)) if d_a is not None else (dummy, 0, 0, 0)),
            *((gu_bk, *gu_bk.stride()) if gu_bk is not None else (dummy, 0, 0, 0)),
            routing, gate_up, d_gate_up, wact, dw_part, dyb, dyb_gu_part, d_scale, num_experts,
            num_rows, hidden, inter, d_rank, gu_rank, DOWN_LORA=d_a is not None,
            GATE_UP_LORA=gu_a is not None, PRECISION=_precision(x.dtype),
            EVEN_K=_even_k(hidden, meta), BLOCK_M=block_m,
            BLOCK_R=_rank_block(max(d_rank, gu_rank)), **meta)
        col_blocks = cdiv(inter, _launched_meta(kernel, meta)["BLOCK_N"])
        d_weights = None
        if need[2]:
            d_weights = dw_part[:col_blocks].sum(0).view(weights_shape).to(weights_dtype)
        del dw_part

        # 7a. the down projection's weight gradients, while w * act exists
        d_down = d_d_a = d_d_b = None
        if need[4]:
            d_down = torch.empty_like(down_proj)
            _wgrad(dy, True, wact, False, plan, d_down, d_down.stride(), hidden, inter,
                   name="wgrad_down")
        if need[7]:  # down LoRA A [E, r, I]: scale * (dy B)^T (w act)
            d_d_a = _grad_like(d_a)
            _wgrad(dyb, False, wact, False, plan, d_d_a, d_d_a.stride(), d_rank, inter, d_scale)
        if need[8]:  # down LoRA B [E, H, r]: scale * dy^T (w act A^T)
            d_d_b = _grad_like(d_b)
            _wgrad(dy, True, wxa2, False, plan, d_d_b, d_d_b.stride(), hidden, d_rank, d_scale)
        del wact

        # 6. dx: d gate_up @ gate_up_proj[e] (+ LoRA) to the flat slots, summed per token.
        # gate_up_proj [E, 2I, H]: (n, k) = (h, j). LoRA: + (d gate_up B) A, A [E, r, H].
        dx = None
        dyb_gu = dyb_gu_part[:col_blocks].sum(0).to(x.dtype) if gu_a is not None else None
        del dyb_gu_part
        if need[0]:
            lora = {}
            if gu_a is not None:
                lora = {"lora_mode": 2, "lb": gu_a, "low": dyb_gu, "scale": gu_scale,
                        "rank": gu_rank, "lb_strides_ern": gu_a.stride()}
            strides = gate_up_proj.stride()
            dx_flat = _scatter(d_gate_up, gate_up_proj, (strides[0], strides[2], strides[1]),
                               hidden, plan, **lora)
            dx = dx_flat.view(num_tokens, top_k, hidden).sum(1)
            del dx_flat

        # 7b. the gate_up projection's weight gradients (frozen experts: none)
        d_gup = d_gu_a = d_gu_b = None
        if need[3]:
            d_gup = torch.empty_like(gate_up_proj)
            _wgrad(d_gate_up, False, x, True, plan, d_gup, d_gup.stride(), 2 * inter, hidden,
                   name="wgrad_gate_up")
        if need[5]:  # gate_up LoRA A [E, r, H]: scale * (d gate_up B)^T x
            d_gu_a = _grad_like(gu_a)
            _wgrad(dyb_gu, False, x, True, plan, d_gu_a, d_gu_a.stride(), gu_rank, hidden,
                   gu_scale)
        if need[6]:  # gate_up LoRA B [E, 2I, r]: scale * d gate_up^T (x A^T)
            d_gu_b = _grad_like(gu_b)
            _wgrad(d_gate_up, False, xa, False, plan, d_gu_b, d_gu_b.stride(), 2 * inter,
                   gu_rank, gu_scale)
        return (dx, None, d_weights, d_gup, d_down, d_gu_a, d_gu_b, d_d_a, d_d_b, None, None)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _lora_delta(x: torch.Tensor, lora: LoRA | None, expert: int) -> torch.Tensor | int:
    if lora is None:
        return 0
    a, b, scale = lora
    return scale * F.linear(F.linear(x, a[expert].to(x.dtype)), b[expert].to(x.dtype))


def moe_experts_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                          gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                          gate_up_lora: LoRA | None = None, down_lora: LoRA | None = None
                          ) -> torch.Tensor:
    """The same function in PyTorch, one expert at a time: the CPU fallback and the oracle."""
    num_tokens, hidden = x.shape
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
    rows = x[order // top_k]
    outs, start = [], 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        xe = rows[start:start + count]
        gate_up = F.linear(xe, gate_up_proj[expert]) + _lora_delta(xe, gate_up_lora, expert)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        outs.append(F.linear(act, down_proj[expert]) + _lora_delta(act, down_lora, expert))
        start += count
    sorted_out = torch.cat(outs) if outs else x.new_zeros(0, hidden)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = sorted_out[inverse].view(num_tokens, top_k, hidden)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # the kernel sums in fp32
    return (out.to(acc_dtype) * top_k_weights.to(acc_dtype)[..., None]).sum(1).to(x.dtype)


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                gate_up_lora: LoRA | None = None, down_lora: LoRA | None = None) -> torch.Tensor:
    """SwiGLU experts over routed tokens: x [T, H], top_k_index / top_k_weights [T, K],
    gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]; LoRA factors (A [E, r, in],
    B [E, out, r], scale) add scale * B[e] @ A[e] to a weight. Returns [T, H] in x's dtype.

    Operands are computed in the weights' dtype (the autocast dtype under autocast), as HF's
    grouped_mm path casts its input to the weight's. Gradients reach x, the routing weights,
    the expert weights and the LoRA factors, each only where it requires grad."""
    if x.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        raise ValueError(f"moe_experts: x must be [T, H] and top_k_index / top_k_weights [T, K]; "
                         f"got {tuple(x.shape)}, {tuple(top_k_index.shape)}, "
                         f"{tuple(top_k_weights.shape)}")
    num_experts, two_inter, hidden = gate_up_proj.shape
    if (x.shape[1] != hidden or two_inter % 2 or down_proj.shape != (num_experts, hidden,
                                                                     two_inter // 2)):
        raise ValueError(f"moe_experts: gate_up_proj {tuple(gate_up_proj.shape)} and down_proj "
                         f"{tuple(down_proj.shape)} do not fit x {tuple(x.shape)} ([E, 2I, H] and "
                         f"[E, H, I])")
    device_type = x.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else gate_up_proj.dtype)
    out_dtype = x.dtype
    tensors = [x, gate_up_proj, down_proj]
    if not use_triton(*tensors) or x.shape[0] == 0:
        return moe_experts_reference(x.to(dtype), top_k_index, top_k_weights,
                                     gate_up_proj.to(dtype), down_proj.to(dtype),
                                     gate_up_lora=gate_up_lora, down_lora=down_lora).to(out_dtype)
    # A LoRA of scale 0 adds nothing, and the kernels divide by the scale (in-place epilogue
    # accumulation, _moe_up_fwd_kernel): it is left out, its factors getting zero gradients.
    idle = []
    if gate_up_lora is not None and float(gate_up_lora[2]) == 0.0:
        idle, gate_up_lora = idle + list(gate_up_lora[:2]), None
    if down_lora is not None and float(down_lora[2]) == 0.0:
        idle, down_lora = idle + list(down_lora[:2]), None
    gu_a, gu_b, gu_scale = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    d_a, d_b, d_scale = down_lora if down_lora is not None else (None, None, 0.0)
    with torch.autocast(device_type, enabled=False):
        y = _apply(x.to(dtype).contiguous(), top_k_index, top_k_weights, gate_up_proj.to(dtype),
                   down_proj.to(dtype), gu_a, gu_b, d_a, d_b, float(gu_scale), float(d_scale))
    for factor in idle:
        y = y + 0.0 * factor.sum()
    return y.to(out_dtype)


@torch.compiler.disable
def _apply(*args):
    # The plan and the autotuned launches are host code that torch.compile should not trace:
    # under torch.compile the experts run eagerly between compiled graphs (a graph break).
    return _MoEExpertsFunction.apply(*args)
