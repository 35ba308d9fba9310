"""Triton kernels for training, each beside the pure-PyTorch reference it must match.

    from tunegraph.kernels import rms_norm, swiglu, geglu, apply_rotary, apply_kernels
    y = rms_norm(x, weight, eps=1e-6)      # Triton on CUDA tensors, the reference elsewhere
    apply_kernels(model, KernelOptions(rms_norm=True, glu=True, rope=True))   # patch an HF model

Every kernel module has one shape (STYLE 6): `_<op>_fwd_kernel` / `_<op>_bwd_kernel`, host
wrappers that launch them, `torch.library.custom_op`s with an autograd formula (so
`torch.compile` sees one opaque op per call), an autograd.Function for eager calls (a custom
op's dispatch costs the host more, and small calls are host-bound: benchmarks/host_overhead.py),
and `<op>_reference`: the CPU fallback and the tests' oracle. Triton is optional: without it (or
on CPU tensors) every op runs its reference.
Tests run the kernels on CPU tensors through Triton's interpreter (`TRITON_INTERPRET=1`, set
before this package is imported).

| module      | op                                                   | checked against (tests/kernels)   |
|-------------|------------------------------------------------------|-----------------------------------|
| rms_norm.py | RMSNorm, Llama (cast, then scale) and Gemma (1 + w)  | LlamaRMSNorm, GemmaRMSNorm        |
| swiglu.py   | silu(gate) * up and gelu_tanh(gate) * up             | LlamaMLP / GemmaMLP's act_fn      |
| rope.py     | rotary embedding of q and k in one launch (GQA)      | llama's apply_rotary_pos_emb      |
| moe.py      | MoE experts: sorted grouped GEMMs, SwiGLU, LoRA fused | HF's eager <Model>Experts, PEFT   |
| patch.py    | `apply_kernels`: swaps them into HF models           | kernels on/off golden trajectory  |
| lora.py     | LoRA linear, q/k/v, MLP: hand-derived backwards      | PEFT's LoraLayer, fp64            |
| lora_patch.py | `apply_lora_kernels`: swaps those into PEFT models | LoRA kernels on/off golden        |
| adamw.py    | AdamW over fp32 masters of bf16 weights, multi-tensor | torch.optim.AdamW, HF's Trainer   |

adamw.py is an optimizer, not an op: one kernel, no backward, no custom op (it runs outside
autograd and torch.compile), `adamw_reference` its CPU fallback and oracle.

This package imports nothing from tunegraph outside it, and no transformers.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU installs without the `kernels` extra: references only

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so the kernel modules still import:
        `@triton.jit` leaves the function as it is and `tl.constexpr` annotations resolve. The
        kernels are never launched (`use_triton` is False)."""

        class constexpr:  # noqa: N801 (mirrors tl.constexpr: an annotation and a wrapper)
            def __new__(cls, value=None):
                return value

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]
    HAS_TRITON = False

# triton.jit decides at decoration time (when the kernel modules are imported) whether a kernel
# runs on the interpreter, so the variable is read once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors: CUDA tensors, or CPU tensors under
    the interpreter (tests)."""
    if not HAS_TRITON:
        return False
    for t in tensors:  # a loop, not all(<generator>): this runs at every kernel call
        if not t.is_cuda:
            break
    else:
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. triton.cdiv is a constexpr function: a host call of it costs
    microseconds, and the host path sets the time of small calls (benchmarks/NOTES.md, K1)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); host code, as `cdiv`."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for_reduction(device: torch.device, num_rows: int) -> int:
    """Programs for a kernel that reduces over rows (a weight gradient): a few per SM, each
    summing a contiguous chunk of rows into its own partial row."""
    if device.type == "cuda":
        # 4 per SM keeps every SM busy through tail effects; more only adds partial rows to sum.
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(num_rows, 4 * _sm_count(index)))
    return max(1, min(num_rows, 4))  # the interpreter runs programs one by one


def warps_for(block_size: int) -> int:
    """Warps for one row of `block_size` elements: ~8-16 elements per thread (Liger and the
    Triton tutorials use the same steps)."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


@triton.jit
def row_sum(x, axis: tl.constexpr):
    """tl.sum for kernels. tl.sum is this reduce inside a @jit wrapper of
    triton.language.standard. Under pytest, torch._dynamo imports triton before
    TRITON_INTERPRET is set, and the interpreter cannot call standard-library functions jitted
    then. With _sum_combine as the combine function the interpreter also takes its numpy fast
    path (any other combine function runs per element in Python: 100x slower). Same reduction,
    same code on a GPU."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


def is_dense(t: torch.Tensor) -> bool:
    """True when `t`'s elements fill its memory span once: a permutation of a contiguous layout.
    False for expanded tensors (a `.sum()`'s gradient has stride 0) and for gapped slices."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


from tunegraph.kernels.lora import (  # noqa: E402
    LoRAWeights,
    lora_linear,
    lora_mlp,
    lora_projections,
)
from tunegraph.kernels.lora_patch import apply_lora_kernels  # noqa: E402
from tunegraph.kernels.moe import moe_experts, moe_experts_reference  # noqa: E402
from tunegraph.kernels.patch import KernelOptions, apply_kernels  # noqa: E402
from tunegraph.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from tunegraph.kernels.rope import apply_rotary, apply_rotary_reference  # noqa: E402
from tunegraph.kernels.swiglu import geglu, glu_reference, swiglu  # noqa: E402

__all__ = ["HAS_TRITON", "INTERPRET", "KernelOptions", "LoRAWeights", "apply_kernels",
           "apply_lora_kernels", "lora_linear", "lora_mlp", "lora_projections", "apply_rotary",
           "apply_rotary_reference", "geglu", "glu_reference", "moe_experts",
           "moe_experts_reference", "rms_norm", "rms_norm_reference", "swiglu", "use_triton"]
