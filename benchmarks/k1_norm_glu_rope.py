"""Benchmark K1: RMSNorm, SwiGLU and RoPE forward+backward, bf16, 2048 and 16384 rows x 4096.

    python benchmarks/k1_norm_glu_rope.py --out benchmarks/results/K1.json     # on a CUDA GPU
    python benchmarks/k1_norm_glu_rope.py --rows 2048 --repeats 2 --out /tmp/K1.json  # quick look

Providers, side by side in one process, interleaved (order reversed every repeat):
- eager: HF's modules (LlamaRMSNorm, LlamaMLP's `act_fn(gate) * up`, apply_rotary_pos_emb).
- compile: the same functions through torch.compile (Inductor, default mode).
- liger: Liger-Kernel's ops (LigerRMSNormFunction with in_place=True, its default;
  LigerSiLUMulFunction; LigerRopeFunction), when `liger_kernel` imports.
- tunegraph: tunegraph.kernels as `apply_kernels` uses them (in-place backward variants).
Workloads are the shapes of a Llama-3-8B layer: x [rows, 4096]; gate and up [rows, 4096]; q
[1, 32, rows, 128] and k [1, 8, rows, 128] in HF's transposed layout, cos/sin [1, rows, 128].
Gate/up and q/k are passed as views (non-leaf, as a model's projections are); gradients come
from torch.autograd.grad, so no provider pays for accumulating into .grad.

Each provider is first checked against a float64 reference on fresh random inputs, with the
caching allocator poisoned (freed NaN blocks) so an unwritten output element shows up; a wrong
tunegraph result stops the run. Times: triton.testing.do_bench (CUDA events, L2 flushed before
each call), all samples of every repeat pooled: median, p10, p90. Peak memory: the largest
allocation above the inputs during one forward+backward. Throughput counts the fewest bytes
the op must move (each input read once, each output written once; benchmarks/NOTES.md, K1).
Pass (BENCHMARKS.md, K1): >= 1.10x the fastest peer, memory <= the lowest peer, >= 2.5 TB/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tunegraph.kernels import apply_rotary, rms_norm, swiglu  # noqa: E402
from tunegraph.kernels.rms_norm import rms_norm_reference  # noqa: E402
from tunegraph.kernels.rope import apply_rotary_reference  # noqa: E402
from tunegraph.kernels.swiglu import glu_reference  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from _results import package_version, percentile  # noqa: E402

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, EPS = 4096, 32, 8, 128, 1e-6
DTYPE = torch.bfloat16
BF16_TOL = 4 * 2**-8  # tests/kernels: at most two bf16 roundings per element against float64
PEERS = ("eager", "compile", "liger")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def liger_ops():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as exc:
        print(f"liger: not measured ({exc})", file=sys.stderr)
        return None
    return LigerRMSNormFunction, LigerSiLUMulFunction, LigerRopeFunction


class Op:
    """One workload: inputs, the tensors autograd differentiates, and each provider's forward."""

    name = ""

    def __init__(self, rows: int):
        self.rows = rows

    def inputs(self, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def wrt(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def bytes_moved(self) -> int:
        raise NotImplementedError

    def forward(self, provider: str, fns: dict, t: dict[str, torch.Tensor]):
        raise NotImplementedError

    def reference(self, t: dict[str, torch.Tensor]):
        raise NotImplementedError


class RMSNorm(Op):
    name = "rms_norm"

    def inputs(self, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(self.rows, HIDDEN, device="cuda", generator=gen).mul(3).to(DTYPE)
        w = (1 + 0.2 * torch.randn(HIDDEN, device="cuda", generator=gen)).to(DTYPE)
        dy = torch.randn(self.rows, HIDDEN, device="cuda", generator=gen).to(DTYPE)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        module = LlamaRMSNorm(HIDDEN, eps=EPS).to(device="cuda", dtype=DTYPE)
        module.weight.data.copy_(w)  # every provider uses this parameter as the weight
        return {"x": x.requires_grad_(), "w": module.weight, "module": module, "grads": (dy,)}

    def wrt(self, t):
        return t["x"], t["w"]

    def bytes_moved(self):
        # forward reads x, writes y; backward reads x and dy, writes dx (weight/rstd: < 0.1%)
        return 5 * self.rows * HIDDEN * 2

    def forward(self, provider, fns, t):
        if provider == "eager":
            return (t["module"](t["x"]),)
        if provider == "compile":
            return (fns["compiled_norm"](t["x"], t["w"]),)
        if provider == "liger":
            return (fns["liger"][0].apply(t["x"], t["w"], EPS, 0.0, "llama", True),)
        return (rms_norm(t["x"], t["w"], EPS, inplace_backward=True),)

    def reference(self, t):
        return (rms_norm_reference(t["x"], t["w"], EPS),)


class SwiGLU(Op):
    name = "swiglu"

    def inputs(self, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        gate, up, dc = (torch.randn(self.rows, HIDDEN, device="cuda", generator=gen).mul(2)
                        .to(DTYPE) for _ in range(3))
        gate, up = gate.requires_grad_(), up.requires_grad_()
        # Views: non-leaf like an MLP's projections (the in-place backwards write over them).
        return {"gate_leaf": gate, "up_leaf": up, "gate": gate.view(gate.shape),
                "up": up.view(up.shape), "grads": (dc,)}

    def wrt(self, t):
        return t["gate"], t["up"]

    def bytes_moved(self):
        # forward reads gate, up, writes c; backward reads dc, gate, up, writes both gradients
        return 8 * self.rows * HIDDEN * 2

    def forward(self, provider, fns, t):
        if provider == "eager":
            return (fns["hf_silu"](t["gate"]) * t["up"],)
        if provider == "compile":
            return (fns["compiled_glu"](t["gate"], t["up"]),)
        if provider == "liger":
            return (fns["liger"][1].apply(t["gate"], t["up"]),)
        return (swiglu(t["gate"], t["up"], inplace_backward=True),)

    def reference(self, t):
        return (glu_reference(t["gate"], t["up"]),)


class RoPE(Op):
    name = "rope"

    def inputs(self, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)

        def heads(num):  # HF's layout: [B, T, H, D] projections seen as [B, H, T, D]
            return torch.randn(1, self.rows, num, HEAD_DIM, device="cuda", generator=gen).to(DTYPE)
        q, k = heads(Q_HEADS).requires_grad_(), heads(KV_HEADS).requires_grad_()
        dq, dk = heads(Q_HEADS).transpose(1, 2), heads(KV_HEADS).transpose(1, 2)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM))
        freqs = torch.arange(self.rows, device="cuda")[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        return {"q_leaf": q, "k_leaf": k, "q": q.transpose(1, 2), "k": k.transpose(1, 2),
                "cos": emb.cos().to(DTYPE), "sin": emb.sin().to(DTYPE), "grads": (dq, dk)}

    def wrt(self, t):
        return t["q"], t["k"]

    def bytes_moved(self):
        # forward reads q, k and writes them rotated; backward the same on the gradients;
        # cos/sin once per pass (2 x rows x 128 x 2 bytes, 5% of the q+k traffic)
        per_pass = 2 * self.rows * (Q_HEADS + KV_HEADS) * HEAD_DIM * 2
        return 2 * per_pass + 2 * 2 * self.rows * HEAD_DIM * 2

    def forward(self, provider, fns, t):
        args = (t["q"], t["k"], t["cos"], t["sin"])
        if provider == "eager":
            return fns["hf_rope"](*args)
        if provider == "compile":
            return fns["compiled_rope"](*args)
        if provider == "liger":
            return fns["liger"][2].apply(*args)
        return apply_rotary(*args, inplace_backward=True)

    def reference(self, t):
        return apply_rotary_reference(t["q"], t["k"], t["cos"], t["sin"])


def provider_functions(liger) -> dict:
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return {"hf_silu": ACT2FN["silu"], "hf_rope": apply_rotary_pos_emb,
            "compiled_norm": torch.compile(lambda x, w: rms_norm_reference(x, w, EPS)),
            "compiled_glu": torch.compile(lambda g, u: torch.nn.functional.silu(g) * u),
            "compiled_rope": torch.compile(apply_rotary_pos_emb), "liger": liger}


def fwd_bwd(op: Op, provider: str, fns: dict, t: dict):
    outputs = op.forward(provider, fns, t)
    return outputs, torch.autograd.grad(outputs, op.wrt(t), t["grads"])


def poison_allocator(num_bytes: int) -> None:
    """Fill soon-to-be-reused allocator blocks with NaN: an output element a kernel never writes
    stays NaN and fails the check."""
    blocks = [torch.full((num_bytes // 2,), float("nan"), dtype=DTYPE, device="cuda")
              for _ in range(4)]
    del blocks


def check(op: Op, provider: str, fns: dict, seed: int) -> float:
    """Worst relative error (outputs and gradients) against float64, fresh inputs."""
    t = op.inputs(seed)
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v)
                  else v for k, v in t.items() if k != "module"}
    for key in ("gate", "up"):  # views of leaves, as in inputs()
        if key in ref_inputs:
            ref_inputs[key] = ref_inputs[f"{key}_leaf"].view(ref_inputs[key].shape)
    for key in ("q", "k"):
        if key in ref_inputs:
            ref_inputs[key] = ref_inputs[f"{key}_leaf"].transpose(1, 2)
    ref_inputs["grads"] = tuple(g.double() for g in t["grads"])
    ref_out = op.reference(ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, op.wrt(ref_inputs), ref_inputs["grads"])
    poison_allocator(op.rows * HIDDEN * 2 * 4)
    outputs, grads = fwd_bwd(op, provider, fns, t)
    torch.cuda.synchronize()
    return max(rel_err(a, b) for a, b in zip((*outputs, *grads), (*ref_out, *ref_grads), strict=True))


def peak_extra_mb(op: Op, provider: str, fns: dict, t: dict) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fwd_bwd(op, provider, fns, t)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def profile(op: Op, providers: list[str], fns: dict) -> None:
    """Per provider: host wall time per forward+backward (GPU idle between launches shows as
    wall > GPU) and the GPU time of its kernels, top kernels by time (torch.profiler)."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = op.inputs(seed=99)
    for p in providers:
        for _ in range(3):
            fwd_bwd(op, p, fns, t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fwd_bwd(op, p, fns, t)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 20 * 1e3
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fwd_bwd(op, p, fns, t)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        gpu = sum(e.device_time_total for e in events) / 10 / 1e3
        top = sorted(events, key=lambda e: -e.device_time_total)[:4]
        print(f"profile {op.name} {op.rows}: {p}: wall {wall:.3f} ms, GPU {gpu:.3f} ms: "
              + "; ".join(f"{e.key[:48]} x{e.count // 10} {e.device_time_total / 10 / 1e3:.3f}"
                          for e in top), file=sys.stderr)


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "K1.json")
    parser.add_argument("--profile", action="store_true", help="only print per-kernel GPU "
                        "times and host wall times per provider (torch.profiler)")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("K1 needs a CUDA GPU")
    liger = liger_ops()
    fns = provider_functions(liger)
    providers = [p for p in PEERS if p != "liger" or liger is not None] + ["tunegraph"]
    device = torch.cuda.get_device_name()

    rows_out, notes = [], []
    if options.profile:
        for op in [cls(rows) for rows in options.rows for cls in (RMSNorm, SwiGLU, RoPE)]:
            profile(op, providers, fns)
        return
    for op in [cls(rows) for rows in options.rows for cls in (RMSNorm, SwiGLU, RoPE)]:
        workload = f"{op.name} {op.rows}x{HIDDEN} bf16 fwd+bwd"
        errors = {p: check(op, p, fns, seed=len(rows_out) + i) for i, p in enumerate(providers)}
        for p, err in errors.items():
            print(f"{workload}: {p} max rel err vs float64 {err:.2e}", file=sys.stderr)
        if not errors["tunegraph"] <= BF16_TOL:
            raise SystemExit(f"{workload}: tunegraph is wrong ({errors['tunegraph']:.2e} > "
                             f"{BF16_TOL:.2e} vs float64)")
        memory = {p: peak_extra_mb(op, p, fns, op.inputs(seed=1234)) for p in providers}
        samples: dict[str, list[float]] = {p: [] for p in providers}
        finite = True
        for repeat in range(options.repeats):
            for p in providers if repeat % 2 == 0 else reversed(providers):
                # Fresh inputs per provider and repeat: in-place backwards (liger, tunegraph)
                # write gradients over gate/up and dy, which drift over one do_bench call.
                t = op.inputs(seed=1000 + repeat)
                samples[p] += triton.testing.do_bench(
                    lambda p=p, op=op, t=t: fwd_bwd(op, p, fns, t), warmup=10, rep=60,
                    return_mode="all")
                finite &= all(bool(torch.isfinite(v).all()) for v in t.values()
                              if torch.is_tensor(v))
        notes.append(f"{workload}: inputs still finite after each timing: {finite}")
        for p in providers:
            median = statistics.median(samples[p])
            rows_out.append({
                "workload": workload, "provider": p, "median_ms": round(median, 4),
                "p10_ms": round(percentile(samples[p], 0.1), 4),
                "p90_ms": round(percentile(samples[p], 0.9), 4),
                "peak_mem_mb": round(memory[p], 1),
                "throughput": round(op.bytes_moved() / median / 1e6, 1), "unit": "GB/s",
                "max_rel_err_vs_fp64": float(f"{errors[p]:.3g}")})
        mine = rows_out[-1]
        peers = [r for r in rows_out[-len(providers):-1]]
        fastest = min(peers, key=lambda r: r["median_ms"])
        leanest = min(r["peak_mem_mb"] for r in peers)
        mine.update(best_peer=fastest["provider"],
                    speedup_vs_best_peer=round(fastest["median_ms"] / mine["median_ms"], 3),
                    mem_ratio_vs_best_peer=round(leanest / max(mine["peak_mem_mb"], 1e-3), 3))

    mine_rows = [r for r in rows_out if r["provider"] == "tunegraph"]
    geomean = math.exp(statistics.fmean(math.log(r["speedup_vs_best_peer"]) for r in mine_rows))
    mem_geomean = math.exp(statistics.fmean(math.log(max(r["mem_ratio_vs_best_peer"], 1e-3))
                                            for r in mine_rows))
    command = "python benchmarks/k1_norm_glu_rope.py" + (
        "" if (options.rows, options.repeats) == ([2048, 16384], 5)
        else f" --rows {' '.join(map(str, options.rows))} --repeats {options.repeats}")
    result = {
        "id": "K1", "device": device, "date": datetime.date.today().isoformat(),
        "command": command, "rows": rows_out,
        "best_peer": "per workload (rows[].best_peer of the tunegraph rows)",
        "speedup_vs_best_peer": round(geomean, 3),
        "mem_ratio_vs_best_peer": round(mem_geomean, 3),
        "speedup_vs_best_peer_min": min(r["speedup_vs_best_peer"] for r in mine_rows),
        "mem_ratio_vs_best_peer_min": min(r["mem_ratio_vs_best_peer"] for r in mine_rows),
        "peers_measured": providers[:-1], "repeats": options.repeats,
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "liger_kernel": package_version("liger-kernel")},
        "notes": notes + ["speedup/mem ratios: best peer's time (lowest peer's peak memory) over "
                          "tunegraph's; top level: geometric means over the workloads"]}

    header = ("| workload | provider | median ms | p10-p90 ms | peak extra MB | GB/s | "
              "err vs fp64 | vs best peer |")
    print(header + "\n|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        ratio = (f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']}), mem "
                 f"{r['mem_ratio_vs_best_peer']:.2f}x" if r["provider"] == "tunegraph" else "")
        print(f"| {r['workload']} | {r['provider']} | {r['median_ms']:.4f} | {r['p10_ms']:.4f}-"
              f"{r['p90_ms']:.4f} | {r['peak_mem_mb']:.0f} | {r['throughput']:,.0f} | "
              f"{r['max_rel_err_vs_fp64']:.1e} | {ratio} |")
    print(f"{device}, {result['date']}: geometric-mean speedup vs best peer {geomean:.3f}x, "
          f"min {result['speedup_vs_best_peer_min']:.3f}x; memory ratio geomean "
          f"{mem_geomean:.3f}x. Command: {command}")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
