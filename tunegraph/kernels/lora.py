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
- The MLP's middle is two purely elementwise, memory-bound Triton kernels over the flattened
  [N, I] buffers (`_lora_glu_fwd_kernel`, `_lora_glu_bwd_kernel`, GLU_BLOCK elements a program);
  every rank-r product is a cuBLAS call like the projections' (an earlier version added gate/up's
  rank-r terms and reduced dA/dB inside the kernels with tl.dot at K = r: 5.7 ms of the H200's
  13.3 ms, compute- and latency-bound, where the elementwise floor is ~0.5 ms; benchmarks/NOTES.md,
  K3). Forward: gate = s xa_g B_gᵀ (+ b), += x W_gᵀ in the epilogue, up alike; the kernel reads
  gate and up and writes h = act(gate) * up (3 passes over N x I, where PEFT makes ~18); h A_downᵀ
  is a skinny product (one read of h). Backward: dh = dyb_down A_down, += dy W_down in the
  epilogue (with down's dropout the rank-r term stays apart and the kernel applies the mask to
  it); the kernel reads dh, gate, up, recomputes act(gate) (swiglu.py's `_activation`) and writes
  d gate and d up over the saved gate and up and drop(h) over dh (6 passes, PEFT ~22). Then one
  skinny product each reads them again: dA_down = dybᵀ drop(h), s d gate B_g and s d up B_u (one
  [N, r_g + r_u] buffer), dB_gate = s d gateᵀ xa_g, dB_up alike: 5 passes of ~55 us. (The
  rank-r terms written under gate, up and dh cost a pass each, and the base GEMMs read them
  in their compute-bound epilogues.)
- Saved between forward and backward: x (or its dropout per projection), xa (N x r), and for the
  MLP gate and up (LoRA included), h A_downᵀ and down's keep mask when it has dropout: no act(g),
  no h (PEFT keeps g, act(g), u, h).
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

from tunegraph.kernels import INTERPRET, cdiv, tl, triton, use_triton
from tunegraph.kernels.swiglu import _activation, glu_reference

# The MLP's middle: one program per GLU_BLOCK contiguous elements of the flattened [N, I] buffers
# (8 warps x 32 threads x 16 elements: two 128-bit bf16 accesses per thread per tensor; 28672
# programs at K3's 8192 x 14336). Purely elementwise: every rank-r product is a cuBLAS call.
GLU_BLOCK = 4096
GLU_WARPS = 8


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
def _lora_glu_fwd_kernel(G, U, H, num_elements, GELU: tl.constexpr, INTERPRETER: tl.constexpr,
                         BLOCK: tl.constexpr):
    # g and u are gate_proj(x) and up_proj(x) with their LoRA terms (cuBLAS wrote them): HF's
    # act(g), rounded to the dtype as its separate op rounds it, times u.
    dtype = H.dtype.element_ty
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_elements
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, GELU)
    h = _round(act, dtype, INTERPRETER).to(tl.float32) * u
    tl.store(H + offsets, _round(h, dtype, INTERPRETER), mask=mask)


@triton.jit
def _lora_glu_bwd_kernel(DH, DH_LORA, KEEP, G, U, num_elements, keep_scale, GELU: tl.constexpr,
                         DROPOUT: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK: tl.constexpr):
    dtype = G.dtype.element_ty
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_elements
    # DH: dy W_down + (s dy B_down) A_down, one cuBLAS buffer; with down's dropout the rank-r
    # term comes apart (DH_LORA) and passes its keep mask here.
    dh = tl.load(DH + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation(g, GELU)
    act = _round(act, dtype, INTERPRETER).to(tl.float32)
    h = _round(act * u, dtype, INTERPRETER).to(tl.float32)  # the forward's h, bit for bit
    if DROPOUT:
        keep = tl.load(KEEP + offsets, mask=mask, other=0).to(tl.float32) * keep_scale
        dh = dh + tl.load(DH_LORA + offsets, mask=mask, other=0.0).to(tl.float32) * keep
        h = h * keep
    # Written over the inputs: each element was read above, in this program. DH gets drop(h),
    # which dA_down = dybᵀ drop(h) reads next (cuBLAS); G and U get d gate and d up.
    tl.store(G + offsets, _round(dh * u * dact, dtype, INTERPRETER), mask=mask)
    tl.store(U + offsets, _round(dh * act, dtype, INTERPRETER), mask=mask)
    tl.store(DH + offsets, _round(h, dtype, INTERPRETER), mask=mask)


def _glu_grid(num_elements: int) -> tuple[int]:
    return (cdiv(num_elements, GLU_BLOCK),)


def lora_glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """h = act(gate) * up, gate and up [N, I] contiguous: the full projections, LoRA included."""
    assert gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous()
    h = torch.empty_like(gate)
    if h.numel():
        _lora_glu_fwd_kernel[_glu_grid(h.numel())](
            gate, up, h, h.numel(), GELU=gelu, INTERPRETER=INTERPRET, BLOCK=GLU_BLOCK,
            num_warps=GLU_WARPS)
    return h


def lora_glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool,
                      dh_lora: torch.Tensor | None, keep: torch.Tensor | None,
                      keep_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place, all three [N, I] contiguous: (d gate, d up, drop(h)) written over (gate, up,
    dh). `dh` is dy W_down plus, without dropout, the rank-r term; with dropout that term is
    `dh_lora` and `keep` the down projection's mask (bool [N, I]), kept / (1 - p)."""
    tensors = (dh, gate, up) if keep is None else (dh, gate, up, dh_lora, keep)
    assert all(t.shape == gate.shape and t.is_contiguous() for t in tensors)
    if gate.numel():
        _lora_glu_bwd_kernel[_glu_grid(gate.numel())](
            dh, dh if dh_lora is None else dh_lora, dh if keep is None else keep, gate, up,
            gate.numel(), keep_scale, GELU=gelu, DROPOUT=keep is not None,
            INTERPRETER=INTERPRET, BLOCK=GLU_BLOCK, num_warps=GLU_WARPS)
    return gate, up, dh


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
        xa_g, xa_u = xa.split([a_g.shape[0], a_u.shape[0]], dim=1)
        # The full gate/up projections, each one buffer: s xa Bᵀ (+ b), the base adds onto it.
        gate = _lora_up(xa_g, bb_g, s_g, b_g).addmm_(x, w_g.t())
        up = _lora_up(xa_u, bb_u, s_u, b_u).addmm_(x, w_u.t())
        h = lora_glu_forward(gate, up, gelu)
        keep = None
        if down_dropout > 0:  # PEFT's F.dropout(h cast to lora_A's dtype) draws through this op
            h_drop, keep = torch.ops.aten.native_dropout(h.to(down_dropout_dtype), down_dropout,
                                                         True)
            ha = h_drop.to(h.dtype) @ a_d.t()
            del h_drop
        else:
            ha = h @ a_d.t()
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
        rank_g, rank_u = a_g.shape[0], a_u.shape[0]
        needs = ctx.needs_input_grad
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dyb_d = torch.empty_like(ha).addmm_(dy, bb_d, beta=0, alpha=s_d)
        d_bb_d = torch.empty_like(bb_d).addmm_(dy.t(), ha, beta=0, alpha=s_d)
        d_b_d = dy.sum(0) if needs[_MLP_TENSORS + 9] else None
        if keep is None:  # dh = (s dy B_down) A_down + dy W_down, the base in the epilogue
            dh, dh_lora, keep_scale = (dyb_d @ a_d).addmm_(dy, w_d), None, 1.0
        else:  # the rank-r term apart: the kernel applies the mask to it
            dh, dh_lora, keep_scale = dy @ w_d, dyb_d @ a_d, 1.0 / (1.0 - ctx.down_dropout)
        d_gate, d_up, h_drop = lora_glu_backward(dh, gate, up, ctx.gelu, dh_lora, keep,
                                                 keep_scale)
        del dh_lora
        # gate and up now hold their gradients: a second backward through them must fail.
        torch.autograd.graph.increment_version((gate, up))
        d_a_d = dyb_d.t() @ h_drop  # dA_down = dybᵀ drop(h)
        del dh, h_drop
        # s (d gate B_g | d up B_u) into one [N, r_g + r_u] buffer; dB = s d(gate|up)ᵀ xa.
        dxa = xa.new_empty(xa.shape)
        dxa_g, dxa_u = dxa.split([rank_g, rank_u], dim=1)
        dxa_g.addmm_(d_gate, bb_g, beta=0, alpha=s_g)
        dxa_u.addmm_(d_up, bb_u, beta=0, alpha=s_u)
        xa_g, xa_u = xa.split([rank_g, rank_u], dim=1)
        d_bb_g = torch.empty_like(bb_g).addmm_(d_gate.t(), xa_g, beta=0, alpha=s_g)
        d_bb_u = torch.empty_like(bb_u).addmm_(d_up.t(), xa_u, beta=0, alpha=s_u)
        d_lora_xs: list[torch.Tensor | None] = []
        if ctx.has_lora_x:
            d_a_g, d_a_u = dxa_g.t() @ lora_xs[0], dxa_u.t() @ lora_xs[1]
            d_lora_xs = [dxa_g @ a_g, dxa_u @ a_u]
            dx = d_gate @ w_g if needs[0] else None
        else:
            d_a_g, d_a_u = (dxa.t() @ lora_xs[0]).split([rank_g, rank_u], dim=0)
            dx = dxa @ torch.cat([a_g, a_u]) if needs[0] else None
            if dx is not None:
                dx.addmm_(d_gate, w_g)
        if dx is not None:
            dx.addmm_(d_up, w_u)
        d_b_g = d_gate.sum(0) if needs[_MLP_TENSORS + 1] else None
        d_b_u = d_up.sum(0) if needs[_MLP_TENSORS + 5] else None
        return (dx, None, None, None, None, None,
                None, d_b_g, d_a_g, d_bb_g, None, d_b_u, d_a_u, d_bb_u,
                None, d_b_d, d_a_d, d_bb_d, *d_lora_xs)


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
