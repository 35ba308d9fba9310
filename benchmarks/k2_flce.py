"""Benchmark K2: fused linear + cross-entropy, forward+backward, bf16, 16k tokens.

    python benchmarks/k2_flce.py --out benchmarks/results/K2.json             # on a CUDA GPU
    python benchmarks/k2_flce.py --tokens 4096 --repeats 1 --out /tmp/K2.json  # a quick look

Workloads (BENCHMARKS.md, K2): N = 16384 tokens with H = 4096, V = 128256 (Llama 3) and H =
2304, V = 256000 (Gemma 2 2B). hidden ~ N(0, 1) (after the final norm), lm_head weight ~ N(0,
0.02^2) (HF's init), labels uniform over V (random init: speed does not depend on the values);
hidden and weight are leaves, so every provider ends with both .grad written.
Providers, side by side in one process, interleaved (order reversed every repeat):
- eager: F.cross_entropy(F.linear(hidden, weight).float(), labels): lm_head, then what HF's
  ForCausalLMLoss does with its logits.
- compile: that function through torch.compile (Inductor, default mode, static shapes).
- liger: LigerFusedLinearCrossEntropyFunction with its defaults, when liger_kernel imports.
- tunegraph: tunegraph.kernels.fused_linear_cross_entropy with its defaults.
- tunegraph-liger-chunks: the same with Liger's chunk size (a quarter of tunegraph's default;
  not a peer, not the tunegraph row: it shows what Liger's memory costs in time).
Each provider is first checked on fresh inputs against an fp32 reference (the same bf16 inputs
upcast, TF32 off), with the caching allocator's free blocks filled with NaN so that an unwritten
element shows; a tunegraph result outside the tests' bf16 tolerances stops the run. Times:
triton.testing.do_bench (CUDA events, L2 flushed and .grad reset to None before each call), the
samples of every repeat pooled: median, p10, p90. Peak memory: max_memory_allocated during one
forward+backward, above the inputs (the two gradients, 1.1-1.3 GB, count for every provider).
Throughput: tokens/s; TFLOP/s counts the three products, 6NHV (benchmarks/NOTES.md, K2).
Pass (BENCHMARKS.md, K2): >= 1.10x the fastest peer with the logits never materialised, and
memory <= the lowest peer's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _results import (  # noqa: E402
    compare_to_peers,
    package_version,
    timing_fields,
    write_results,
)

from tunegraph.kernels import fused_linear_cross_entropy as flce  # noqa: E402

DTYPE = torch.bfloat16
PEERS = ("eager", "compile", "liger")
LOSS_TOL, GRAD_TOL = 2e-3, 2e-2  # tests/kernels/test_fused_linear_cross_entropy.py's bf16 ones
MATMUL_TFLOPS = 790.0  # bf16 8192^3 on this workplace's H200 (KINDS.md), the FLOP ceiling
DEFAULT_SHAPES = ("4096x128256", "2304x256000")


def eager_loss(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def liger_function():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )
    except ImportError as exc:
        print(f"liger: not measured ({exc})", file=sys.stderr)
        return None
    return LigerFusedLinearCrossEntropyFunction


def provider_functions(liger, liger_chunk: int) -> dict:
    fns = {"eager": eager_loss, "compile": torch.compile(eager_loss, dynamic=False)}
    if liger is not None:
        def liger_loss(hidden, weight, labels):
            out = liger.apply(hidden, weight, labels)  # (loss, z_loss, ...) in recent versions
            return out[0] if isinstance(out, tuple) else out
        fns["liger"] = liger_loss
    fns["tunegraph"] = lambda h, w, y: flce.fused_linear_cross_entropy(h, w, y)
    fns["tunegraph-liger-chunks"] = lambda h, w, y: flce.fused_linear_cross_entropy(
        h, w, y, chunk_tokens=liger_chunk)
    return fns


def make_inputs(tokens: int, hidden_size: int, vocab: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=gen).to(DTYPE)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.02).to(DTYPE)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def step(fn, hidden, weight, labels):
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).norm() / expected.norm()).item()


def poison_allocator(num_bytes: int) -> None:
    """Leave NaN in the caching allocator's free blocks: an output element a kernel never
    writes stays NaN and fails the check."""
    blocks = [torch.full((num_bytes // 2,), float("nan"), dtype=DTYPE, device="cuda")
              for _ in range(3)]
    del blocks


def check(fns: dict, tokens: int, hidden_size: int, vocab: int, seed: int) -> dict[str, list[float]]:
    """Relative errors of (loss, grad_hidden, grad_weight) against fp32 on fresh inputs."""
    hidden, weight, labels = make_inputs(tokens, hidden_size, vocab, seed)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = F.cross_entropy(h32 @ w32.T, labels)
    ref.backward()
    ref, ref_grads = ref.detach(), (h32.grad, w32.grad)
    del h32, w32
    torch.cuda.empty_cache()
    errors = {}
    for name, fn in fns.items():
        hidden.grad = weight.grad = None
        poison_allocator(vocab * hidden_size * 2)
        loss = step(fn, hidden, weight, labels)
        torch.cuda.synchronize()
        errors[name] = [rel_err(loss, ref), rel_err(hidden.grad, ref_grads[0]),
                        rel_err(weight.grad, ref_grads[1])]
        print(f"  {name}: rel err vs fp32 loss {errors[name][0]:.1e}, grad_hidden "
              f"{errors[name][1]:.1e}, grad_weight {errors[name][2]:.1e}", file=sys.stderr)
    return errors


def peak_extra_mb(fn, hidden, weight, labels) -> float:
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, hidden, weight, labels)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def chunk_breakdown(hidden, weight, labels, chunk: int) -> dict[str, float]:
    """One chunk of tunegraph's loop, timed whole and by product (cuBLAS, same shapes); the row
    kernels (logsumexp + d loss/d logits, in place) are the remainder. ms per chunk."""
    from triton.testing import do_bench

    h, w, y = hidden[:chunk].detach(), weight.detach(), labels[:chunk]
    logits = torch.empty(chunk, w.shape[0], device="cuda", dtype=DTYPE)
    grad_h = torch.empty_like(h)
    grad_w = torch.empty_like(w)
    scale = torch.tensor(1.0 / chunk, device="cuda")
    options = dict(ignore_index=-100, label_smoothing=0.0, z_loss_weight=0.0, logit_scale=1.0,
                   softcap=0.0, chunk_tokens=chunk)
    times = {
        "whole chunk": do_bench(lambda: flce._flce_chunked(
            h, w, None, y, grad_scale=scale, need_grad_hidden=True, need_grad_weight=True,
            **options), warmup=50, rep=300),
        "logits = h @ W.T": do_bench(lambda: torch.mm(h, w.t(), out=logits), warmup=50, rep=300),
        "grad_h = dlogits @ W": do_bench(lambda: torch.mm(logits, w, out=grad_h), warmup=50, rep=300),
        "grad_W += dlogits.T @ h": do_bench(lambda: grad_w.addmm_(logits.t(), h), warmup=50, rep=300),
    }
    times["row kernels (remainder)"] = times["whole chunk"] - sum(
        v for k, v in times.items() if k != "whole chunk")
    return times


def main() -> None:
    import triton
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="HxV ...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rep-ms", type=int, default=1000, help="do_bench's rep per call")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "K2.json")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("K2 needs a CUDA GPU")
    liger = liger_function()
    device = torch.cuda.get_device_name()
    rows, notes = [], []
    for index, shape in enumerate(options.shapes):
        hidden_size, vocab = map(int, shape.split("x"))
        tokens = options.tokens
        chunk = flce._chunk_tokens(tokens, hidden_size, vocab, 0)
        liger_chunk = flce._chunk_tokens(tokens, hidden_size, vocab, 0, factor=1)
        fns = provider_functions(liger, liger_chunk=liger_chunk)
        workload = f"{tokens} tokens x H{hidden_size} x V{vocab} bf16 fwd+bwd"
        flops = 6 * tokens * hidden_size * vocab
        floor_ms = flops / (MATMUL_TFLOPS * 1e12) * 1e3
        logits_mb = tokens * vocab * 2 / 2**20
        print(f"{workload}: FLOP floor {floor_ms:.1f} ms at {MATMUL_TFLOPS:.0f} TFLOP/s; bf16 "
              f"logits would be {logits_mb:.0f} MB; tunegraph's chunk {chunk} tokens",
              file=sys.stderr)
        errors = check(fns, tokens, hidden_size, vocab, seed=100 + index)
        bad = [e for e, tol in zip(errors["tunegraph"], (LOSS_TOL, GRAD_TOL, GRAD_TOL), strict=True) if not e <= tol]
        if bad:
            raise SystemExit(f"{workload}: tunegraph is wrong: errors {errors['tunegraph']} vs "
                             f"fp32 (tolerances {LOSS_TOL}, {GRAD_TOL})")

        hidden, weight, labels = make_inputs(tokens, hidden_size, vocab, seed=1234 + index)
        memory = {name: peak_extra_mb(fn, hidden, weight, labels) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for repeat in range(options.repeats):
            for name in names if repeat % 2 == 0 else reversed(names):
                samples[name] += triton.testing.do_bench(
                    lambda fn=fns[name], h=hidden, w=weight, y=labels: step(fn, h, w, y), warmup=100,
                    rep=options.rep_ms, grad_to_none=[hidden, weight], return_mode="all")
        for label, size in (("tunegraph", chunk), ("tunegraph-liger-chunks", liger_chunk)):
            size = min(size, tokens)
            pieces = chunk_breakdown(hidden, weight, labels, size)
            gemm_tflop = 2 * size * hidden_size * vocab / 1e12
            text = ", ".join(
                f"{k} {v:.3f} ms" + (f" ({gemm_tflop / v * 1e3:.0f} TFLOP/s)" if "=" in k else "")
                for k, v in pieces.items())
            notes.append(f"{workload}: {label} chunk of {size} tokens: {text}; x {tokens / size:.0f} "
                         f"chunks = {pieces['whole chunk'] * tokens / size:.1f} ms")
            print(f"  {notes[-1]}", file=sys.stderr)
        finite = bool(torch.isfinite(hidden).all() and torch.isfinite(weight).all())
        notes.append(f"{workload}: inputs unchanged by timing (finite): {finite}; "
                     f"FLOP floor {floor_ms:.1f} ms; tunegraph chunk {chunk} tokens")
        for name in fns:
            timing = timing_fields(samples[name])
            seconds = timing["median_ms"] / 1e3
            rows.append({
                "workload": workload, "provider": name, **timing,
                "peak_mem_mb": round(memory[name], 1),
                "throughput": round(tokens / seconds), "unit": "tokens/s",
                "tflops": round(flops / seconds / 1e12, 1),
                "efficiency": round(flops / seconds / 1e12 / MATMUL_TFLOPS, 3),
                "logits_materialised": memory[name] >= logits_mb,
                "rel_err_vs_fp32": [float(f"{e:.3g}") for e in errors[name]],
                "samples": len(samples[name])})
        del hidden, weight, labels, fns
        torch.cuda.empty_cache()

    peers = [p for p in PEERS if any(r["provider"] == p for r in rows)]
    summary = compare_to_peers(rows, peers)
    defaults = (options.tokens, options.shapes, options.repeats, options.rep_ms) == (
        16384, list(DEFAULT_SHAPES), 3, 1000)
    command = "python benchmarks/k2_flce.py" + ("" if defaults else (
        f" --tokens {options.tokens} --shapes {' '.join(options.shapes)} "
        f"--repeats {options.repeats} --rep-ms {options.rep_ms}"))
    mine = [r for r in rows if r["provider"] == "tunegraph"]
    write_results(
        options.out, bench_id="K2", device=device, command=command, rows=rows, summary=summary,
        peers_measured=peers, repeats=options.repeats,
        logits_never_materialised=not any(r["logits_materialised"] for r in mine),
        versions={"torch": torch.__version__, "triton": triton.__version__,
                  "liger_kernel": package_version("liger-kernel")},
        notes=notes + ["ratios: best peer's median time (lowest peer's peak memory) over "
                       "tunegraph's, > 1 means tunegraph is ahead; top level: geometric means "
                       "over the workloads", "peak_mem_mb: above the inputs, gradients included",
                       "rel_err_vs_fp32: loss, grad_hidden, grad_weight against fp32 on "
                       "fresh inputs (TF32 off)"])

    print("| workload | provider | median ms | p10-p90 ms | peak MB | tokens/s | TFLOP/s (eff.) | "
          "err loss / dh / dW | vs best peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']}), mem "
                 f"{r['mem_ratio_vs_best_peer']:.2f}x" if r["provider"] == "tunegraph" else "")
        errs = " / ".join(f"{e:.1e}" for e in r["rel_err_vs_fp32"])
        print(f"| {r['workload']} | {r['provider']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-"
              f"{r['p90_ms']:.2f} | {r['peak_mem_mb']:,.0f} | {r['throughput']:,} | "
              f"{r['tflops']:.0f} ({r['efficiency']:.0%}) | {errs} | {ratio} |")
    print(f"{device}: speedup vs best peer {summary['speedup_vs_best_peer']:.3f}x (geomean; min "
          f"{summary['speedup_vs_best_peer_min']:.3f}x), memory ratio "
          f"{summary['mem_ratio_vs_best_peer']:.3f}x; logits never materialised: "
          f"{not any(r['logits_materialised'] for r in mine)}. Command: {command}")


if __name__ == "__main__":
    main()
