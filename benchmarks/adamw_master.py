"""The precision overhead of one optimizer step on Llama-3.2-1B's parameters (diagnostic for S1).

    python benchmarks/adamw_master.py --out /tmp/adamw.json     # on a CUDA GPU

What a full fine-tune pays per step beyond its matmuls for fp32 master weights, given the bf16
weight gradients the backward's products give:
- peer `torch-fused` (what S1's peers run: fp32 weights under bf16 autocast, HF's
  adamw_torch_fused, clipping at 1.0): autocast's cast of each linear weight to bf16 (forward),
  the cast of each bf16 weight gradient to fp32 (backward), torch.nn.utils.clip_grad_norm_, and
  torch's fused AdamW;
- `tunegraph` (kernels.adamw_master_weights): MasterWeightAdamW's clip_grad_norm_ (the fp32 norm
  only) and its step (the clipping coefficient applied in the kernel, the bf16 copy written);
- diagnostic rows `tunegraph-b<BLOCK>-w<warps>`: the kernel at other block sizes.
Parameters: 16 layers x (q, k, v, o, gate, up, down) linear weights, the tied fp32 embedding and
33 norm weights (1.236e9); lr 2e-5, weight decay 0 (S1's settings). Times: CUDA events around
each step, after warm-up; median of the steps. Floors (4.3 TB/s): torch-fused 28 B/param of
AdamW + 12 of casts (6 forward, 6 backward) + 12 of clipping (norm read 4, scale read+write 8 on
fp32 gradients): ~14.9 ms; tunegraph 28 B/param + 2 of the norm: ~8.6 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _results import timing_fields, write_results  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 2048, 8192, 512, 16, 128256
LINEAR_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                 (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
BYTES_PER_PARAM = {"torch-fused": 28 + 12 + 12, "tunegraph": 28 + 2}


def parameters(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(linear weights, other parameters), fp32 on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def param(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, device="cuda", generator=gen) * 0.02)
    linears = [param(*shape) for _ in range(LAYERS) for shape in LINEAR_SHAPES]
    others = [param(VOCAB, HIDDEN)] + [param(HIDDEN) for _ in range(2 * LAYERS + 1)]
    return linears, others


def time_steps(step, steps: int, warmup: int = 3) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return times


def run_torch_fused(steps: int) -> list[float]:
    linears, others = parameters(0)
    grads_bf16 = [torch.randn_like(p).to(torch.bfloat16) * 1e-3 for p in linears]
    other_grads = [torch.randn_like(p) * 1e-3 for p in others]
    optimizer = torch.optim.AdamW(linears + others, lr=2e-5, weight_decay=0.0, fused=True)

    def step():
        with torch.no_grad():
            casts = [p.to(torch.bfloat16) for p in linears]  # autocast's weight casts (forward)
            del casts
            for p, g in zip(linears, grads_bf16, strict=True):
                p.grad = g.to(torch.float32)  # the backward's gradient casts
            for p, g in zip(others, other_grads, strict=True):
                p.grad = g
        torch.nn.utils.clip_grad_norm_(linears + others, 1.0)
        optimizer.step()
    return time_steps(step, steps)


def run_tunegraph(steps: int, block: int, warps: int) -> list[float]:
    import tunegraph.kernels.adamw as adamw

    adamw.BLOCK, adamw.NUM_WARPS = block, warps
    linears, others = parameters(0)
    optimizer = adamw.MasterWeightAdamW(linears + others, lr=2e-5, weight_decay=0.0,
                                        working=linears)
    grads = [torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 1e-3
             for p in linears + others]

    def step():
        for p, g in zip(linears + others, grads, strict=True):
            p.grad = g
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
    return time_steps(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default="256x4,512x8,1024x8,2048x8,8192x8",
                        help="BLOCKxWARPS diagnostic rows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import tunegraph.kernels.adamw as adamw

    default = (adamw.BLOCK, adamw.NUM_WARPS)
    num_params = sum(p.numel() for group in parameters(0) for p in group)
    workload = f"adamw step + clipping + casts, {num_params / 1e9:.3f}B params (Llama-3.2-1B)"
    runs = {"torch-fused": run_torch_fused, "tunegraph": lambda n: run_tunegraph(n, *default)}
    for variant in args.variants.split(","):
        block, warps = (int(v) for v in variant.split("x"))
        runs[f"tunegraph-b{block}-w{warps}"] = (
            lambda n, block=block, warps=warps: run_tunegraph(n, block, warps))
    samples, peaks = {}, {}
    for provider, run in runs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        samples[provider] = run(args.steps)
        peaks[provider] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rows = []
    for provider, times in samples.items():
        bytes_moved = num_params * BYTES_PER_PARAM.get(provider, BYTES_PER_PARAM["tunegraph"])
        median_s = statistics.median(times) / 1e3
        rows.append({"workload": workload, "provider": provider, **timing_fields(times),
                     "peak_mem_mb": peaks[provider],
                     "throughput": round(bytes_moved / median_s / 1e9, 1),
                     "unit": "GB/s (floor bytes)"})
        print(f"{provider:24s} {median_s * 1e3:8.3f} ms  {rows[-1]['throughput']:8.1f} GB/s  "
              f"{peaks[provider]:9,.0f} MiB")
    speedup = statistics.median(samples["torch-fused"]) / statistics.median(samples["tunegraph"])
    print(f"tunegraph vs torch-fused: {speedup:.3f}x (default BLOCK {default[0]}, "
          f"{default[1]} warps)")
    if args.out:
        write_results(args.out, bench_id="ADAMW", device=torch.cuda.get_device_name(0),
                      command="python benchmarks/adamw_master.py " + " ".join(sys.argv[1:]),
                      rows=rows, summary={"best_peer": "torch-fused",
                                          "speedup_vs_best_peer": round(speedup, 3),
                                          "mem_ratio_vs_best_peer": round(
                                              peaks["torch-fused"] / peaks["tunegraph"], 3)})


if __name__ == "__main__":
    main()
