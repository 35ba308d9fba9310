"""Benchmark K3: LoRA linear and LoRA MLP forward+backward, r=16, Llama-3-8B shapes, 8192 tokens.

    python benchmarks/k3_lora.py --out benchmarks/results/K3.json     # on a CUDA GPU (~3 min)
    python benchmarks/k3_lora.py --dry-run                            # CPU, tiny shapes, ~1 min

Workloads (BENCHMARKS.md, K3): x [8192, 4096] bf16 into
- lora_linear: one PEFT lora.Linear 4096 -> 14336 (a gate_proj), r 16, alpha 32 (scaling 2);
- lora_mlp: HF's LlamaMLP (4096 -> 14336 -> 4096, silu) with PEFT LoRA on gate, up and down.
Base weights frozen (bf16), LoRA A/B bf16 and trainable, lora_dropout 0 (Axolotl's default for
these kernels); x is a leaf that needs its gradient (a layer's input). Gradients come from
torch.autograd.grad over x and every A and B, so no provider pays for .grad accumulation.
Providers, side by side in one process, interleaved (order reversed every repeat):
- peft-eager: the PEFT-wrapped module's own forward (what Axolotl/TRL run without kernels).
- peft-compile: that module through torch.compile (Inductor, default mode, static shapes).
- tunegraph: tunegraph.kernels.lora (lora_linear / lora_mlp) on the same module's weights.
- base-only: the same products without LoRA (frozen weights: forward and dX only). Not a peer:
  it shows what the LoRA terms cost each provider on top of the base GEMMs.
Each provider is first checked on fresh inputs against an fp32 reference (the same bf16 values
upcast, TF32 off), with the caching allocator's free blocks filled with NaN so an unwritten
element shows; a tunegraph result outside the tests' bf16 tolerance stops the run. Times:
triton.testing.do_bench (CUDA events, L2 flushed), all samples of every repeat pooled: median,
p10, p90. Peak memory: max_memory_allocated during one forward+backward above the inputs.
Throughput: TFLOP/s counting the products the op needs (benchmarks/NOTES.md, K3).
Pass (BENCHMARKS.md, K3): >= 1.3x PEFT eager.

--dry-run: tiny shapes on the CPU (Triton's interpreter runs the kernels, wall-clock timing,
torch.compile with the aot_eager backend, no memory numbers): proves the script, not the speed.
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

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _results import (  # noqa: E402
    compare_to_peers,
    package_version,
    timing_fields,
    write_results,
)

from tunegraph.kernels.lora import (  # noqa: E402
    LoRAWeights,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
)
from tunegraph.kernels.lora_patch import _weights  # noqa: E402

DTYPE = torch.bfloat16
RANK, ALPHA = 16, 32
# tests/kernels/test_lora.py's bf16 tolerance (8 roundings of 2^-8 through the MLP's dX).
BF16_TOL = 8 * 2**-8
PEERS = ["peft-eager", "peft-compile"]
PROVIDERS = [*PEERS, "tunegraph", "base-only"]


class Workload:
    """A PEFT-wrapped module and what each provider runs on it."""

    def __init__(self, name: str, tokens: int, hidden: int, inter: int, device: str, dry: bool):
        from peft import LoraConfig, inject_adapter_in_model

        self.name, self.tokens, self.hidden, self.inter = name, tokens, hidden, inter
        self.device = device
        torch.manual_seed(0)
        if name == "lora_linear":
            module = nn.Module()
            module.gate_proj = nn.Linear(hidden, inter, bias=False)
            targets, self.out_features = ["gate_proj"], inter
        else:
            from transformers import LlamaConfig
            from transformers.models.llama.modeling_llama import LlamaMLP

            module = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter))
            targets, self.out_features = ["gate_proj", "up_proj", "down_proj"], hidden
        self.targets = targets
        module = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                    target_modules=targets,
                                                    init_lora_weights=False), module)
        with torch.no_grad():  # B ~ N(0, 1/r): the LoRA term the size of a trained adapter's
            for layer in self.layers(module):
                layer.lora_B["default"].weight.normal_(0, RANK**-0.5)
        self.module = module.to(device=device, dtype=DTYPE)
        self.lora_params = [p for n, p in self.module.named_parameters() if "lora_" in n]
        self.forward_peft = (self.module.gate_proj if name == "lora_linear" else self.module)
        self.compiled = torch.compile(self.forward_peft, backend="aot_eager" if dry else "inductor")

    def layers(self, module=None):
        module = self.module if module is None else module
        return [getattr(module, t) for t in self.targets]

    @property
    def label(self) -> str:
        shape = (f"{self.hidden}->{self.inter}" if self.name == "lora_linear"
                 else f"{self.hidden}x{self.inter}")
        return f"{self.name} {self.tokens}x{shape} r{RANK} bf16 fwd+bwd"

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(self.tokens, self.hidden, device=self.device, generator=gen).to(DTYPE)
        dy = torch.randn(self.tokens, self.out_features, device=self.device, generator=gen)
        dy = dy.to(DTYPE)
        return x.requires_grad_(), dy

    def forward(self, provider: str, x: torch.Tensor) -> torch.Tensor:
        if provider == "peft-eager":
            return self.forward_peft(x)
        if provider == "peft-compile":
            return self.compiled(x)
        weights = [_weights(layer) for layer in self.layers()]
        if provider == "base-only":
            if self.name == "lora_linear":
                return x @ weights[0].weight.t()
            gate, up, down = (w.weight for w in weights)
            return (nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
        if self.name == "lora_linear":
            return lora_linear(x, weights[0])
        return lora_mlp(x, *weights)

    def wrt(self, provider: str, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] if provider == "base-only" else [x, *self.lora_params]

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same function in fp32 on the same bf16 values, and its fp32 A/B leaves (in
        self.lora_params' order)."""
        wide, leaves = [], []
        for w in (_weights(layer) for layer in self.layers()):
            a, b = (t.detach().float().requires_grad_() for t in (w.lora_a, w.lora_b))
            wide.append(LoRAWeights(w.weight.float(), None, a, b, w.scaling))
            leaves += [a, b]
        if self.name == "lora_linear":
            return lora_linear_reference(x, wide[0]), leaves
        return lora_mlp_reference(x, *wide), leaves

    def flops(self) -> float:
        """Products the op needs, per projection K -> M: forward x W (2NKM), xa (2NKr), xa Bᵀ
        (2NMr); backward dX = dy W (2NKM), dy B and dB (2 x 2NMr), dA and its dX term
        (2 x 2NKr): 4NKM + 6Nr(K + M). The GLU's few FLOPs per element are left out."""
        n, h, i = self.tokens, self.hidden, self.inter
        projections = [(h, i)] if self.name == "lora_linear" else [(h, i), (h, i), (i, h)]
        return sum(4 * n * k * m + 6 * n * RANK * (k + m) for k, m in projections)


def fwd_bwd(work: Workload, provider: str, x: torch.Tensor, dy: torch.Tensor):
    out = work.forward(provider, x)
    return out, torch.autograd.grad(out, work.wrt(provider, x), dy)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def check(work: Workload, provider: str, seed: int) -> float | None:
    """Worst relative error of the output and every gradient against fp32, fresh inputs."""
    x, dy = work.inputs(seed)
    if provider == "base-only":
        return None
    x32 = x.detach().float().requires_grad_()
    ref, leaves = work.reference(x32)
    ref_grads = torch.autograd.grad(ref, [x32, *leaves], dy.float())
    if work.device == "cuda":  # free blocks full of NaN: an unwritten element would show
        blocks = [torch.full((work.tokens * work.inter,), float("nan"), dtype=DTYPE,
                             device="cuda") for _ in range(4)]
        del blocks
    out, grads = fwd_bwd(work, provider, x, dy)
    return max(rel_err(a, b) for a, b in zip((out, *grads), (ref, *ref_grads), strict=True))


def peak_extra_mb(work: Workload, provider: str) -> float:
    if work.device != "cuda":
        return 0.0
    x, dy = work.inputs(1234)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fwd_bwd(work, provider, x, dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def time_ms(work: Workload, provider: str, x, dy, rep_ms: int, dry: bool) -> list[float]:
    if dry:  # no CUDA events on the CPU: wall clock of a few calls
        samples = []
        for _ in range(2):
            start = time.perf_counter()
            fwd_bwd(work, provider, x, dy)
            samples.append((time.perf_counter() - start) * 1e3)
        return samples
    import triton.testing

    return triton.testing.do_bench(lambda: fwd_bwd(work, provider, x, dy), warmup=25, rep=rep_ms,
                                   return_mode="all")


def profile(work: Workload, providers: list[str]) -> None:
    """GPU time per kernel of one forward+backward (torch.profiler), top kernels per provider."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, dy = work.inputs(99)
    for provider in providers:
        for _ in range(3):
            fwd_bwd(work, provider, x, dy)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd_bwd(work, provider, x, dy)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        total = sum(e.device_time_total for e in events) / 5 / 1e3
        top = sorted(events, key=lambda e: -e.device_time_total)[:7]
        print(f"profile {work.name}: {provider}: GPU {total:.3f} ms: " + "; ".join(
            f"{e.key[:40]} x{e.count // 5} {e.device_time_total / 5 / 1e3:.3f}" for e in top),
            file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=150, help="do_bench's rep per call")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (see above)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/K3.json; dry run: /tmp)")
    options = parser.parse_args()
    dry = options.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("K3 needs a CUDA GPU (or --dry-run)")
    default_out = Path("/tmp/K3-dry-run.json") if dry else REPO / "benchmarks/results/K3.json"
    out = options.out or default_out
    device = "cpu" if dry else "cuda"
    tokens, hidden, inter = (96, 64, 160) if dry else (options.tokens, 4096, 14336)
    repeats = 1 if dry else options.repeats
    device_name = "CPU (dry run, Triton interpreter)" if dry else torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references

    rows: list[dict] = []
    workloads = [Workload(name, tokens, hidden, inter, device, dry)
                 for name in ("lora_linear", "lora_mlp")]
    for work in workloads:
        errors = {p: check(work, p, seed=7 + i) for i, p in enumerate(PROVIDERS)}
        for p, err in errors.items():
            if err is not None:
                print(f"{work.label}: {p} max rel err vs fp32 {err:.2e}", file=sys.stderr)
        if not errors["tunegraph"] <= BF16_TOL:
            raise SystemExit(f"{work.label}: tunegraph is wrong ({errors['tunegraph']:.2e} > "
                             f"{BF16_TOL:.2e} vs fp32)")
        memory = {p: peak_extra_mb(work, p) for p in PROVIDERS}
        samples: dict[str, list[float]] = {p: [] for p in PROVIDERS}
        for repeat in range(repeats):
            for p in PROVIDERS if repeat % 2 == 0 else list(reversed(PROVIDERS)):
                x, dy = work.inputs(seed=1000 + repeat)
                samples[p] += time_ms(work, p, x, dy, options.rep_ms, dry)
        for p in PROVIDERS:
            timing = timing_fields(samples[p], digits=4)
            rows.append({"workload": work.label, "provider": p, **timing,
                         "peak_mem_mb": round(memory[p], 1),
                         "throughput": round(work.flops() / (timing["median_ms"] / 1e3) / 1e12, 1),
                         "unit": "TFLOP/s", "max_rel_err_vs_fp32": errors[p],
                         "samples": len(samples[p])})
    for row in rows:  # base-only is a reference line, not a peer: keep it out of the ratios
        row["is_peer"] = row["provider"] in PEERS
    summary = compare_to_peers([r for r in rows if r["provider"] != "base-only"], PEERS)
    for row in rows:
        if row["provider"] == "tunegraph":
            eager = next(r for r in rows if r["workload"] == row["workload"]
                         and r["provider"] == "peft-eager")
            row["speedup_vs_peft_eager"] = round(eager["median_ms"] / row["median_ms"], 3)
    mine = [r for r in rows if r["provider"] == "tunegraph"]
    vs_eager = round(math.exp(statistics.fmean(math.log(r["speedup_vs_peft_eager"])
                                               for r in mine)), 3)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    result = write_results(out, bench_id="K3", device=device_name, command=command, rows=rows,
                           summary=summary, peers_measured=PEERS, repeats=repeats, rank=RANK,
                           speedup_vs_peft_eager=vs_eager,
                           pass_line="speedup_vs_peft_eager >= 1.3 (BENCHMARKS.md, K3)",
                           torch=torch.__version__, peft=package_version("peft"),
                           triton=package_version("triton"), transformers=package_version("transformers"))
    if not dry and not options.no_profile:
        profile(workloads[1], ["peft-eager", "peft-compile", "tunegraph", "base-only"])
    print("\n| workload | provider | median ms | p10-p90 | peak MB | TFLOP/s | err vs fp32 | "
          "vs best peer | vs peft-eager |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['speedup_vs_best_peer']:.3f}x ({r['best_peer']})" if "best_peer" in r else ""
        eager = f"{r['speedup_vs_peft_eager']:.3f}x" if "speedup_vs_peft_eager" in r else ""
        err = "-" if r["max_rel_err_vs_fp32"] is None else f"{r['max_rel_err_vs_fp32']:.1e}"
        print(f"| {r['workload']} | {r['provider']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-"
              f"{r['p90_ms']:.3f} | {r['peak_mem_mb']:.0f} | {r['throughput']:.1f} | {err} | "
              f"{ratio} | {eager} |")
    print(f"{device_name}, {result['date']}: vs PEFT eager (geomean) {vs_eager:.3f}x "
          f"(pass >= 1.3); "
          f"vs best peer {result['speedup_vs_best_peer']:.3f}x; memory vs best peer "
          f"{result['mem_ratio_vs_best_peer']:.3f}x. Command: {command}. Wrote {out}")


if __name__ == "__main__":
    main()
