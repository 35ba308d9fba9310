"""Benchmark M1: the MoE experts layer of Qwen3-30B-A3B (E=128, top-8, H=2048, I=768), bf16,
forward+backward, at 8192 and 32768 tokens; uniform and Zipf routing; full fine-tune and frozen
experts with rank-16 LoRA on both expert weights.

    python benchmarks/m1_moe.py --out benchmarks/results/M1.json    # on a CUDA GPU (~3 min)
    python benchmarks/m1_moe.py --dry-run                           # CPU, tiny shapes (~1 min)
    python benchmarks/m1_moe.py --profile-only --tokens 32768       # per-launch GPU times (~1 min)

Workloads: x [T, 2048] (a leaf that needs its gradient: the layer's input), routing from
Qwen3-MoE's router rule (softmax over 128 logits, top-8, renormalised) on
- uniform: standard-normal logits (each expert gets ~T/16 rows);
- zipf: logits log p_e + Gumbel noise with p_e ~ rank^-1.2 over a random expert order: top-8
  is then sampling without replacement from p, so popular experts get up to T rows (one per
  token) and unpopular ones a handful;
and the routing weights are a leaf too (the router's gradient flows through them). Full
fine-tune: gradients of x, the routing weights, gate_up_proj [128, 1536, 2048] and down_proj
[128, 2048, 768]. LoRA: both weights frozen, r=16, alpha=32 (scale 2) on each, A and B
trainable, B held as PEFT holds it (lora_B.weight [out, r * E], rank-major); gradients of x, the
routing weights and the four factors. Gradients come from torch.autograd.grad, so no provider
pays for .grad accumulation.

Providers, side by side in one process, interleaved (order reversed every repeat):
- hf-eager: transformers' Qwen3MoeExperts, experts_implementation "eager" (a loop over experts).
- hf-grouped_mm: the same module with "grouped_mm" (transformers' default where it runs: sort,
  torch's grouped_mm, unsort).
- liger: liger_kernel 0.8.5's LigerFusedMoEFunction (Triton grouped GEMMs, gather/SwiGLU fused,
  no LoRA), when it imports. Its kernels autotune over 32 configs each by default (minutes of
  compiling), so this runs with LIGER_FUSED_MOE_AUTOTUNE=0 (its one pinned config) unless
  --liger-autotune is given; the JSON records which.
- tunegraph: tunegraph.kernels.moe.moe_experts (LoRA fused into the grouped GEMMs).
With LoRA, the peers get what PEFT 0.21's ParamWrapper gives them (`target_parameters`): the
weight folded as W + scale * B @ A (one baddbmm per weight per forward, inside autograd) and
passed to their experts forward; tunegraph gets the factors.

Each provider is first checked on fresh inputs against an fp32 reference (the same bf16 values
upcast, TF32 off: moe_experts_reference) on the output and every gradient, with the caching
allocator's free blocks filled with NaN so an unwritten element shows; a tunegraph result
outside the tests' bf16 tolerance stops the run. Times: triton.testing.do_bench (CUDA events,
L2 flushed), all samples of every repeat pooled: median, p10, p90. Peak memory: the largest
allocation above the inputs during one forward+backward. Throughput: TFLOP/s counting the
expert products every provider must do (18 T K H I full, 12 T K H I frozen; LoRA's own
products, ~3%, not counted). Pass (BENCHMARKS.md, M1): >= 1.3x hf-grouped_mm and >= 1.1x the
best fused peer (liger).

Profiles (stderr): GPU time per kernel name of one forward+backward for every provider on the
first full fine-tune workload, and for tunegraph on every LoRA workload; then tunegraph's
launches one by one in launch order (its scatter and weight-gradient kernels run several times
a step, each named by what it computes) with the autotuner's picks. --profile-only skips the
peers, the JSON and the table: for each selected workload (--tokens, --lora, --routing) it
checks tunegraph against the fp32 reference, times it (do_bench) and prints the per-launch
profile; `--profile-only --tokens 32768` puts the full fine-tune and LoRA rows side by side.

--dry-run: tiny shapes on the CPU (Triton's interpreter runs the kernels, wall-clock timing, no
liger, no memory numbers), in fp32: the interpreter's bf16 dots and casts are wrong (see
tests/kernels/test_moe.py). Proves the script, not the speed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # before torch/triton: triton.jit reads it when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "--liger-autotune" not in sys.argv:  # read by liger_kernel when it is imported
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _results import (  # noqa: E402
    compare_to_peers,
    package_version,
    timing_fields,
    write_results,
)

from tunegraph.kernels.moe import moe_experts, moe_experts_reference  # noqa: E402

DTYPE = torch.float32 if "--dry-run" in sys.argv else torch.bfloat16
EXPERTS, TOP_K, HIDDEN, INTER, RANK, ALPHA = 128, 8, 2048, 768, 16, 32
ZIPF = 1.2
BF16_TOL = 2e-2  # tests/kernels/test_moe.py: bf16 against float64, four times the measured
PEERS = ["hf-eager", "hf-grouped_mm", "liger"]
GROUPED_MM_MS = {8192: 10.86, 32768: 36.5}  # the plan's grouped_mm measurement (BENCHMARKS.md)


def liger_function():
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError as exc:
        print(f"liger: not measured ({exc})", file=sys.stderr)
        return None
    return LigerFusedMoEFunction


class Workload:
    def __init__(self, tokens: int, routing: str, lora: bool, shape: tuple[int, ...],
                 device: str, liger):
        self.tokens, self.routing, self.lora, self.device, self.liger = (tokens, routing, lora,
                                                                         device, liger)
        self.experts, self.top_k, self.hidden, self.inter = shape
        self.label = (f"experts T={tokens} {routing} {'lora r16 frozen' if lora else 'full'} "
                      f"{str(DTYPE).removeprefix('torch.').replace('bfloat', 'bf')} fwd+bwd")
        gen = torch.Generator(device).manual_seed(0)
        e, h, i = self.experts, self.hidden, self.inter

        def weight(*size, scale):
            return (torch.randn(*size, generator=gen, device=device) * scale).to(DTYPE)

        self.gate_up = weight(e, 2 * i, h, scale=h ** -0.5).requires_grad_(not lora)
        self.down = weight(e, h, i, scale=i ** -0.5).requires_grad_(not lora)
        self.factors = []
        if lora:  # A [E, r, in]; B as PEFT's lora_B.weight [out, r * E] viewed [E, out, r]
            for in_f, out_f in ((h, 2 * i), (i, h)):
                a = weight(e * RANK, in_f, scale=in_f ** -0.5).requires_grad_()
                b = weight(out_f, RANK * e, scale=RANK ** -0.5).requires_grad_()
                self.factors += [a, b]
        self.scale = ALPHA / RANK
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        self.modules = {}
        for provider, implementation in (("hf-eager", "eager"), ("hf-grouped_mm", "grouped_mm")):
            config = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e,
                                    num_experts_per_tok=self.top_k)
            config._experts_implementation = implementation
            with torch.device("meta"):  # weights come from functional_call: none allocated
                self.modules[provider] = Qwen3MoeExperts(config)

    def lora_views(self, factors=None):
        a1, b1, a2, b2 = factors or self.factors
        e = self.experts
        return ((a1.view(e, RANK, -1), b1.view(b1.shape[0], RANK, e).permute(2, 0, 1), self.scale),
                (a2.view(e, RANK, -1), b2.view(b2.shape[0], RANK, e).permute(2, 0, 1), self.scale))

    def inputs(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(self.tokens, self.experts, generator=gen)
        if self.routing == "zipf":
            order = torch.randperm(self.experts, generator=gen)
            log_p = -ZIPF * torch.log(torch.arange(1, self.experts + 1, dtype=torch.float))[order]
            gumbel = -torch.log(-torch.log(torch.rand(self.tokens, self.experts, generator=gen)))
            logits = log_p + gumbel
        probs = logits.softmax(-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        x, dy = (torch.randn(self.tokens, self.hidden, generator=gen).to(self.device, DTYPE)
                 for _ in range(2))
        return {"x": x.requires_grad_(), "index": index.to(self.device),
                "weights": weights.to(self.device, DTYPE).requires_grad_(), "dy": dy}

    def wrt(self, t):
        return [t["x"], t["weights"], *(self.factors if self.lora else (self.gate_up, self.down))]

    def folded(self):
        """The weights as PEFT's ParamWrapper hands them to a peer: W + scale * B @ A."""
        if not self.lora:
            return self.gate_up, self.down
        (a1, b1, s), (a2, b2, _) = self.lora_views()
        return (torch.baddbmm(self.gate_up, b1, a1, alpha=s),
                torch.baddbmm(self.down, b2, a2, alpha=s))

    def forward(self, provider: str, t):
        if provider == "tunegraph":
            gu_lora, d_lora = self.lora_views() if self.lora else (None, None)
            return moe_experts(t["x"], t["index"], t["weights"], self.gate_up, self.down,
                               gate_up_lora=gu_lora, down_lora=d_lora)
        gate_up, down = self.folded()
        if provider == "liger":
            return self.liger.apply(t["x"], gate_up, down, t["index"].to(torch.int32),
                                    t["weights"])
        return torch.func.functional_call(self.modules[provider],
                                          {"gate_up_proj": gate_up, "down_proj": down},
                                          (t["x"], t["index"], t["weights"]))

    def reference(self, t):
        """fp32 on the same bf16 values: (output, leaves in wrt order)."""
        x = t["x"].detach().float().requires_grad_()
        weights = t["weights"].detach().float().requires_grad_()
        if self.lora:
            factors = [f.detach().float().requires_grad_() for f in self.factors]
            gu_lora, d_lora = self.lora_views(factors)
            out = moe_experts_reference(x, t["index"], weights, self.gate_up.detach().float(),
                                        self.down.detach().float(), gate_up_lora=gu_lora,
                                        down_lora=d_lora)
            return out, [x, weights, *factors]
        gate_up = self.gate_up.detach().float().requires_grad_()
        down = self.down.detach().float().requires_grad_()
        return moe_experts_reference(x, t["index"], weights, gate_up, down), [x, weights,
                                                                               gate_up, down]

    def flops(self) -> float:
        per = self.tokens * self.top_k * self.hidden * self.inter
        return (12 if self.lora else 18) * per

    def busiest_expert_rows(self, t) -> int:
        return int(torch.bincount(t["index"].flatten(), minlength=self.experts).max())


def fwd_bwd(work: Workload, provider: str, t):
    out = work.forward(provider, t)
    return out, torch.autograd.grad(out, work.wrt(t), t["dy"])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def check(work: Workload, provider: str, t, reference) -> float:
    """Worst relative error of the output and every gradient against the fp32 reference."""
    ref_out, ref_grads = reference
    if work.device == "cuda":  # free blocks full of NaN: an unwritten element would show
        blocks = [torch.full((work.tokens * work.top_k * work.hidden,), float("nan"),
                             dtype=DTYPE, device="cuda") for _ in range(3)]
        del blocks
    out, grads = fwd_bwd(work, provider, t)
    return max(rel_err(a, b) for a, b in zip((out, *grads), (ref_out, *ref_grads), strict=True))


def peak_extra_mb(work: Workload, provider: str, t) -> float:
    if work.device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fwd_bwd(work, provider, t)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def time_ms(work: Workload, provider: str, t, rep_ms: int, dry: bool) -> list[float]:
    if dry:  # no CUDA events on the CPU: wall clock of a few calls
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            fwd_bwd(work, provider, t)
            samples.append((time.perf_counter() - start) * 1e3)
        return samples
    import triton.testing

    return triton.testing.do_bench(lambda: fwd_bwd(work, provider, t), warmup=25, rep=rep_ms,
                                   return_mode="all")


def profile(work: Workload, providers: list[str]) -> None:
    """GPU time per kernel of one forward+backward (torch.profiler), top kernels per provider."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = work.inputs(99)
    for provider in providers:
        for _ in range(2):
            fwd_bwd(work, provider, t)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd(work, provider, t)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        total = sum(e.device_time_total for e in events) / 3 / 1e3
        top = sorted(events, key=lambda e: -e.device_time_total)[:9]
        print(f"profile {work.label}: {provider}: GPU {total:.3f} ms: " + "; ".join(
            f"{e.key[:36]} x{e.count // 3} {e.device_time_total / 3 / 1e3:.3f}" for e in top),
            file=sys.stderr)


# tunegraph's launches that run more than once a step, by occurrence (moe.py's order):
# (frozen experts + LoRA?, kernel name) -> what each occurrence computes.
LAUNCH_LABELS = {
    (False, "_moe_scatter_kernel"): ["fwd down (act W_d^T, scatter)", "bwd dx (dgu W_gu, scatter)"],
    (True, "_moe_scatter_kernel"): ["fwd down + LoRA (scatter)", "bwd dx + LoRA (scatter)"],
    (False, "_moe_wgrad_bwd_kernel"): ["d down_proj", "d gate_up_proj"],
    (True, "_moe_wgrad_bwd_kernel"): ["dA down (dyB^T wact)", "dB down (dy^T w xA_d)",
                                      "dA gate_up (dgu B)^T x", "dB gate_up (dgu^T xA)"],
}


def profile_launches(work: Workload, provider: str = "tunegraph", steps: int = 3) -> float:
    """tunegraph's GPU kernels of one forward+backward in launch order, each the median over
    `steps` profiled steps; returns the step's summed kernel time (ms)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = work.inputs(99)
    for _ in range(2):
        fwd_bwd(work, provider, t)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fwd_bwd(work, provider, t)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
    kernels = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
                      and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: float(e["ts"]))
    per_step = len(kernels) // steps
    if per_step == 0 or len(kernels) % steps:
        print(f"launches {work.label}: {len(kernels)} GPU events over {steps} steps, uneven; "
              "per-launch table skipped", file=sys.stderr)
        return float("nan")
    seen: dict[str, int] = {}
    lines, total, small, small_ms = [], 0.0, 0, 0.0
    for i in range(per_step):
        name = kernels[i]["name"]
        ms = statistics.median(float(kernels[i + s * per_step]["dur"]) for s in range(steps)) / 1e3
        total += ms
        occurrence = seen.get(name, 0)
        seen[name] = occurrence + 1
        labels = LAUNCH_LABELS.get((work.lora, name))
        label = labels[occurrence] if labels and occurrence < len(labels) else ""
        if ms < 0.02 and not name.startswith("_moe"):
            small, small_ms = small + 1, small_ms + ms
            continue
        lines.append(f"  {i:3d} {ms:8.3f} ms  {name[:60]}{'  [' + label + ']' if label else ''}")
    print(f"launches {work.label}: {provider}: {per_step} GPU events, {total:.3f} ms summed "
          f"(median of {steps} steps)\n" + "\n".join(lines)
          + f"\n      {small_ms:8.3f} ms  {small} other launches under 0.02 ms each", file=sys.stderr)
    if provider == "tunegraph":
        from tunegraph.kernels import moe as moe_module

        for name, tuner in getattr(moe_module, "_TUNED", {}).items():
            for key, config in getattr(tuner, "cache", {}).items():
                print(f"  autotune {name} {key}: {config}", file=sys.stderr)
    return total


def profile_only(options, shape, workloads) -> None:
    """--profile-only: tunegraph alone, per selected workload: check, time, per-launch profile."""
    summary = []
    for tokens, routing, lora in workloads:
        work = Workload(tokens, routing, lora, shape, "cuda", None)
        t = work.inputs(seed=7)
        ref_out, ref_leaves = work.reference(t)
        reference = (ref_out.detach(), torch.autograd.grad(ref_out, ref_leaves, t["dy"].float()))
        del ref_out, ref_leaves
        err = check(work, "tunegraph", t, reference)
        del reference
        print(f"{work.label}: tunegraph max rel err vs fp32 {err:.2e}", file=sys.stderr)
        if not err <= BF16_TOL:
            raise SystemExit(f"{work.label}: tunegraph is wrong ({err:.2e} > {BF16_TOL:.2e})")
        samples = time_ms(work, "tunegraph", work.inputs(seed=1000),
                          options.rep_ms * options.repeats, False)
        median = statistics.median(samples)
        gpu_ms = profile_launches(work)
        summary.append(f"{work.label}: {median:.3f} ms median ({len(samples)} samples), "
                       f"{work.flops() / (median / 1e3) / 1e12:.1f} TFLOP/s, kernels "
                       f"{gpu_ms:.3f} ms, err {err:.1e}")
        del work, t
        torch.cuda.empty_cache()
    print("\n".join(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench's rep per call")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (see above)")
    parser.add_argument("--liger-autotune", action="store_true",
                        help="let liger's fused MoE autotune (32 configs a kernel: minutes)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    parser.add_argument("--profile-only", action="store_true",
                        help="tunegraph only: check, time and per-launch profile of the selected "
                             "workloads (no peers, no JSON)")
    parser.add_argument("--lora", choices=["both", "off", "on"], default="both",
                        help="full fine-tune rows (off), frozen experts + LoRA rows (on), or both")
    parser.add_argument("--routing", choices=["both", "uniform", "zipf"], default=None,
                        help="routing of the full fine-tune rows (LoRA rows: uniform only); "
                             "default both, uniform with --profile-only")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/M1.json; dry run: /tmp)")
    options = parser.parse_args()
    dry = options.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("M1 needs a CUDA GPU (or --dry-run)")
    out = options.out or (Path("/tmp/M1-dry-run.json") if dry
                          else REPO / "benchmarks" / "results" / "M1.json")
    device = "cpu" if dry else "cuda"
    shape = (8, 2, 64, 48) if dry else (EXPERTS, TOP_K, HIDDEN, INTER)
    token_counts = [96] if dry else options.tokens
    repeats = 1 if dry else options.repeats
    device_name = "CPU (dry run, Triton interpreter)" if dry else torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references
    liger = None if dry else liger_function()
    providers = [p for p in PEERS if p != "liger" or liger is not None] + ["tunegraph"]
    peers = providers[:-1]

    routing_choice = options.routing or ("uniform" if options.profile_only else "both")
    routings = ("uniform", "zipf") if routing_choice == "both" else (routing_choice,)
    loras = {"both": (False, True), "off": (False,), "on": (True,)}[options.lora]
    workloads = [(tokens, routing, lora) for lora in loras for tokens in token_counts
                 for routing in routings if not (lora and routing == "zipf")]
    if options.profile_only:
        if dry:
            raise SystemExit("--profile-only needs a CUDA GPU")
        profile_only(options, shape, workloads)
        return
    rows: list[dict] = []
    for tokens, routing, lora in workloads:
        work = Workload(tokens, routing, lora, shape, device, liger)
        t = work.inputs(seed=7)
        ref_out, ref_leaves = work.reference(t)
        reference = (ref_out.detach(), torch.autograd.grad(ref_out, ref_leaves, t["dy"].float()))
        del ref_out, ref_leaves
        errors = {p: check(work, p, t, reference) for p in providers}
        del reference
        for p, err in errors.items():
            print(f"{work.label}: {p} max rel err vs fp32 {err:.2e}", file=sys.stderr)
        if not errors["tunegraph"] <= BF16_TOL:
            raise SystemExit(f"{work.label}: tunegraph is wrong ({errors['tunegraph']:.2e} > "
                             f"{BF16_TOL:.2e} vs fp32)")
        memory = {p: peak_extra_mb(work, p, work.inputs(1234)) for p in providers}
        samples: dict[str, list[float]] = {p: [] for p in providers}
        busiest = work.busiest_expert_rows(t)
        for repeat in range(repeats):
            for p in providers if repeat % 2 == 0 else list(reversed(providers)):
                samples[p] += time_ms(work, p, work.inputs(seed=1000 + repeat), options.rep_ms,
                                      dry)
        for p in providers:
            timing = timing_fields(samples[p], digits=4)
            rows.append({"workload": work.label, "provider": p, **timing,
                         "peak_mem_mb": round(memory[p], 1),
                         "throughput": round(work.flops() / (timing["median_ms"] / 1e3) / 1e12, 1),
                         "unit": "TFLOP/s", "max_rel_err_vs_fp32": float(f"{errors[p]:.3g}"),
                         "busiest_expert_rows": busiest, "samples": len(samples[p])})
        if not dry and not options.no_profile:
            if work.tokens == token_counts[0] and routing == "uniform" and not lora:
                profile(work, providers)
                profile_launches(work)
            elif lora:
                profile(work, ["tunegraph"])
                profile_launches(work)
        del work, t
        if device == "cuda":
            torch.cuda.empty_cache()

    summary = compare_to_peers(rows, peers)
    for row in rows:
        if row["provider"] != "tunegraph":
            continue
        for peer in ("hf-grouped_mm", "liger"):
            other = next((r for r in rows if r["workload"] == row["workload"]
                          and r["provider"] == peer), None)
            if other is not None:
                row[f"speedup_vs_{peer}"] = round(other["median_ms"] / row["median_ms"], 3)
    mine = [r for r in rows if r["provider"] == "tunegraph"]

    def geomean(key: str) -> float | None:
        values = [r[key] for r in mine if key in r]
        return round(math.exp(statistics.fmean(math.log(v) for v in values)), 3) if values else None

    vs_grouped, vs_liger = geomean("speedup_vs_hf-grouped_mm"), geomean("speedup_vs_liger")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    result = write_results(
        out, bench_id="M1", device=device_name, command=command, rows=rows, summary=summary,
        peers_measured=peers, repeats=repeats, rank=RANK,
        speedup_vs_grouped_mm=vs_grouped, speedup_vs_liger=vs_liger,
        liger_autotune=options.liger_autotune,
        pass_line=">= 1.3x hf-grouped_mm and >= 1.1x liger (BENCHMARKS.md, M1)",
        plan_grouped_mm_ms=GROUPED_MM_MS, torch=torch.__version__,
        triton=package_version("triton"), transformers=package_version("transformers"),
        liger_kernel=package_version("liger-kernel"))
    print("\n| workload | provider | median ms | p10-p90 | peak MB | TFLOP/s | err vs fp32 | "
          "vs best peer | vs grouped_mm | vs liger |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['speedup_vs_best_peer']:.3f}x ({r['best_peer']})" if "best_peer" in r else ""
        vs_g = f"{r['speedup_vs_hf-grouped_mm']:.3f}x" if "speedup_vs_hf-grouped_mm" in r else ""
        vs_l = f"{r['speedup_vs_liger']:.3f}x" if "speedup_vs_liger" in r else ""
        print(f"| {r['workload']} | {r['provider']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-"
              f"{r['p90_ms']:.3f} | {r['peak_mem_mb']:.0f} | {r['throughput']:.1f} | "
              f"{r['max_rel_err_vs_fp32']:.1e} | {ratio} | {vs_g} | {vs_l} |")
    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}x"

    print(f"{device_name}, {result['date']}: vs hf-grouped_mm (geomean) {ratio(vs_grouped)} "
          f"(pass >= 1.3); vs liger {ratio(vs_liger)} (pass >= 1.1; liger autotune "
          f"{options.liger_autotune}); "
          f"vs best peer {result['speedup_vs_best_peer']:.3f}x; memory vs best peer "
          f"{result['mem_ratio_vs_best_peer']:.3f}x. Command: {command}. Wrote {out}")


if __name__ == "__main__":
    main()
