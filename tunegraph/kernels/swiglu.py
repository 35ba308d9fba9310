"""Gated MLP activations forward and backward in Triton: SwiGLU and GeGLU, one fused pass each.

    c = swiglu(gate, up)    # silu(gate) * up: LlamaMLP, MistralMLP, Qwen2/Qwen3MLP (hidden_act silu)
    c = geglu(gate, up)     # gelu_tanh(gate) * up: GemmaMLP, Gemma2/3MLP (gelu_pytorch_tanh)

Matches HF's `act_fn(gate_proj(x)) * up_proj(x)`: the activation is computed in fp32 and rounded
to the input dtype before the multiply, as HF's separate activation op rounds it. The backward
recomputes the activation from the saved gate instead of storing it (one pass over gate, up and
dc; no activation-sized buffer kept between forward and backward).

GeGLU uses gelu_tanh(a) = 0.5 a (1 + tanh(u)) = a * sigmoid(2u), u = sqrt(2/pi) (a + 0.044715 a^3):
the same function with no tanh (not in every Triton build's interpreter) and no cancellation in
1 + tanh(u) for large negative a.

Bytes per call, the floor: forward reads gate and up and writes c (3 x elements x size);
backward reads dc, gate, up and writes both gradients (5x). ~20 FLOPs per element: memory-bound.
"""

from __future__ import annotations

import torch

from tunegraph.kernels import cdiv, tl, triton, use_triton

# Elements per program: 8 warps x 32 threads x 8 elements, so each thread moves 16 bytes of
# bf16 per load (one 128-bit access).
GLU_BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _sigmoid(x):
    # tl.sigmoid's formula, without triton.language.standard's @jit wrapper (see
    # tunegraph.kernels.row_sum: the interpreter cannot call it when triton was imported first).
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activation(a, GELU: tl.constexpr):
    """(act(a), act'(a)) in fp32."""
    if GELU:
        # Literals, not module constants: the interpreter mishandles constexpr globals in
        # arithmetic. 1.5957691216057308 = 2 sqrt(2/pi); 0.134145 = 3 x 0.044715.
        s = _sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))
        act = a * s
        dact = s + act * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * a * a)
    else:
        s = _sigmoid(a)
        act = a * s
        dact = s * (1.0 + a * (1.0 - s))
    return act, dact


@triton.jit
def _glu_fwd_kernel(A, B, C, num_elements, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_elements
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(a, GELU)
    c = act.to(A.dtype.element_ty).to(tl.float32) * b
    tl.store(C + offsets, c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DC, A, B, DA, DB, num_elements, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < num_elements
    dc = tl.load(DC + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation(a, GELU)
    # d up = dc * act as the forward used it (rounded); DA/DB may be A/B (in-place backward):
    # each element is read above before it is written here.
    tl.store(DB + offsets, (dc * act.to(A.dtype.element_ty).to(tl.float32)).to(DB.dtype.element_ty),
             mask=mask)
    tl.store(DA + offsets, (dc * b * dact).to(DA.dtype.element_ty), mask=mask)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, *, gelu: bool = False) -> torch.Tensor:
    """HF's `act_fn(gate) * up` with act_fn silu, or gelu_pytorch_tanh when `gelu`."""
    if gelu:
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    return torch.nn.functional.silu(gate) * up


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"glu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must have one shape and dtype")


def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool, checked: bool = False
                ) -> torch.Tensor:
    """act(gate) * up: launches `_glu_fwd_kernel` over the flattened tensors (`checked`: the
    caller ran _check and made them contiguous)."""
    if not checked:
        _check(gate, up)
        gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    num = gate.numel()
    _glu_fwd_kernel[(cdiv(num, GLU_BLOCK),)](gate, up, out, num, GELU=gelu, BLOCK=GLU_BLOCK,
                                              num_warps=NUM_WARPS)
    return out


def glu_backward(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up): launches `_glu_bwd_kernel`; `inplace` writes them over gate and up
    (which must be contiguous)."""
    dc = dc.contiguous()
    if inplace:
        assert gate.is_contiguous() and up.is_contiguous()
        d_gate, d_up = gate, up
    else:
        gate, up = gate.contiguous(), up.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    num = gate.numel()
    _glu_bwd_kernel[(cdiv(num, GLU_BLOCK),)](dc, gate, up, d_gate, d_up, num, GELU=gelu,
                                                BLOCK=GLU_BLOCK, num_warps=NUM_WARPS)
    return d_gate, d_up


@torch.library.custom_op("tunegraph::glu_fwd", mutates_args=())
def _glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    return glu_forward(gate, up, gelu)


@_glu_fwd_op.register_fake
def _(gate, up, gelu):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("tunegraph::glu_bwd", mutates_args=())
def _glu_bwd_op(dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return glu_backward(dc, gate, up, gelu)


@_glu_bwd_op.register_fake
def _(dc, gate, up, gelu):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    gate, up, gelu = inputs
    ctx.save_for_backward(gate, up)
    ctx.gelu = gelu


def _backward(ctx, dc):
    gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.tunegraph.glu_bwd(dc, gate, up, ctx.gelu)
    return d_gate, d_up, None


_glu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _GLUFunction(torch.autograd.Function):
    """The eager path (an autograd.Function: far less host time per call than a custom op's
    dispatch, benchmarks/host_overhead.py). `inplace`: the backward writes the gradients over
    the saved gate and up (as Liger does), so no gradient-sized buffers are allocated. Only for
    gate/up that nothing else reads after this op's backward (an MLP's fresh projections).
    Their version counters are bumped, so autograd raises if anything saved them for its own
    backward, or on a second backward."""

    @staticmethod
    def forward(ctx, gate, up, gelu, inplace):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.gelu, ctx.inplace = gelu, inplace
        return glu_forward(gate, up, gelu, checked=True)

    @staticmethod
    def backward(ctx, dc):
        gate, up = ctx.saved_tensors
        d_gate, d_up = glu_backward(dc, gate, up, ctx.gelu, inplace=ctx.inplace)
        if ctx.inplace:
            torch.autograd.graph.increment_version((gate, up))
        return d_gate, d_up, None, None


def _glu(gate: torch.Tensor, up: torch.Tensor, gelu: bool, inplace_backward: bool) -> torch.Tensor:
    if not use_triton(gate, up):
        return glu_reference(gate, up, gelu=gelu)
    if torch.compiler.is_compiling():
        return torch.ops.tunegraph.glu_fwd(gate, up, gelu)
    _check(gate, up)
    inplace = inplace_backward and gate.grad_fn is not None and up.grad_fn is not None
    return _GLUFunction.apply(gate, up, gelu, inplace)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, inplace_backward: bool = False
           ) -> torch.Tensor:
    """silu(gate) * up. `inplace_backward` (eager; gate and up computed by autograd-tracked ops,
    not leaves): the backward overwrites gate and up with their gradients."""
    return _glu(gate, up, False, inplace_backward)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, inplace_backward: bool = False
          ) -> torch.Tensor:
    """gelu_tanh(gate) * up (HF's gelu_pytorch_tanh); `inplace_backward` as in `swiglu`."""
    return _glu(gate, up, True, inplace_backward)
