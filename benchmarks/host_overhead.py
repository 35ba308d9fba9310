"""Host (CPU) time per call of the pieces under K1's 2048-row rows and S1's step (diagnostic).

    python benchmarks/host_overhead.py            # on a CUDA GPU; prints a table and a cProfile

K1's 2048-row rows and S1 are host-bound (benchmarks/NOTES.md): the GPU waits for Python. This
times, with the host clock over many back-to-back calls (one sync per batch, so the host, not
the GPU, sets the rate), what one call of each piece costs: an ATen launch, a Triton launch
through `kernel[grid]`, the same compiled kernel launched without Triton's binder, an empty
autograd.Function, and each K1 op's forward+backward per provider. Then cProfile's top
functions for tunegraph's forward+backward of each op. Nothing here is a pass line; it tells
where the host time goes.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import k1_norm_glu_rope as k1  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _noop_kernel(X):
    tl.store(X + tl.program_id(0), 1.0)


def host_us(fn, calls: int = 300, batches: int = 5) -> float:
    """Median over batches of host microseconds per call (sync once per batch)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def launch_pieces() -> list[tuple[str, float]]:
    from tunegraph.kernels.swiglu import GLU_BLOCK, NUM_WARPS, _glu_fwd_kernel

    rows = []
    x = torch.zeros(1024, device="cuda")
    rows.append(("torch.empty 2048x4096 bf16", host_us(
        lambda: torch.empty((2048, 4096), dtype=torch.bfloat16, device="cuda"))))
    rows.append(("aten add_ (tiny)", host_us(lambda: x.add_(1))))
    rows.append(("triton noop[(1,)](x)", host_us(lambda: _noop_kernel[(1,)](x))))
    gate, up = (torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(gate)
    num = gate.numel()
    grid = (triton.cdiv(num, GLU_BLOCK),)

    def glu_launch():
        return _glu_fwd_kernel[grid](gate, up, out, num, GELU=False, BLOCK=GLU_BLOCK,
                                     num_warps=NUM_WARPS)
    compiled = glu_launch()
    rows.append(("triton glu_fwd[grid](6 args)", host_us(glu_launch)))
    stream = torch.cuda.current_stream().cuda_stream
    compiled._init_handles()

    def direct():
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, gate, up, out, num, False, GLU_BLOCK)
    try:
        direct()
        torch.cuda.synchronize()
        rows.append(("CompiledKernel.run direct", host_us(direct)))
    except Exception as exc:  # noqa: BLE001 (a diagnostic: report and go on)
        print(f"CompiledKernel.run direct failed: {exc!r}", file=sys.stderr)
    try:
        from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel

        static = StaticallyLaunchedCudaKernel(compiled)
        static.load_kernel(torch.cuda.current_device())
        rows.append(("torch static launcher", host_us(
            lambda: static.run(grid[0], 1, 1, stream, gate, up, out, num))))
    except Exception as exc:  # noqa: BLE001
        print(f"static launcher failed: {exc!r}", file=sys.stderr)
    leaf = torch.randn(16, device="cuda", requires_grad=True)
    grad = torch.ones(16, device="cuda")
    rows.append(("autograd.Function identity fwd+grad", host_us(
        lambda: torch.autograd.grad(_Identity.apply(leaf), leaf, grad))))
    rows.append(("aten mul fwd+grad (tiny)", host_us(
        lambda: torch.autograd.grad(leaf * 2, leaf, grad))))
    return rows


def op_rows(liger, fns) -> list[tuple[str, float]]:
    providers = ["eager", "liger", "tunegraph"] if liger is not None else ["eager", "tunegraph"]
    rows = []
    for op in (k1.RMSNorm(2048), k1.SwiGLU(2048), k1.RoPE(2048)):
        for p in providers:
            t = op.inputs(seed=5)
            rows.append((f"{op.name} 2048 {p} fwd+bwd", host_us(
                lambda op=op, p=p, t=t: k1.fwd_bwd(op, p, fns, t), calls=200)))
            with torch.no_grad():
                rows.append((f"{op.name} 2048 {p} fwd (no_grad)", host_us(
                    lambda op=op, p=p, t=t: op.forward(p, fns, t), calls=200)))
    return rows


def cprofile_ops(fns) -> None:
    for op in (k1.RMSNorm(2048), k1.SwiGLU(2048), k1.RoPE(2048)):
        t = op.inputs(seed=6)
        for _ in range(20):
            k1.fwd_bwd(op, "tunegraph", fns, t)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            k1.fwd_bwd(op, "tunegraph", fns, t)
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n== cProfile: tunegraph {op.name} 2048 fwd+bwd x200 (tottime)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead needs a CUDA GPU")
    import triton as _triton

    print(f"torch {torch.__version__}, triton {_triton.__version__}, "
          f"{torch.cuda.get_device_name()}")
    liger = k1.liger_ops()
    fns = k1.provider_functions(liger)
    for name, us in launch_pieces() + op_rows(liger, fns):
        print(f"{name:45s} {us:8.1f} us")
    cprofile_ops(fns)


if __name__ == "__main__":
    main()
