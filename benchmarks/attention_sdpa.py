"""Which SDPA backend to train with: causal attention forward+backward at S1's and S2's shapes.

    python benchmarks/attention_sdpa.py --out $OUT/ATTN.json     # on a CUDA GPU

A diagnostic, not a BENCHMARKS.md row: S1's profile put attention at ~10.6 ms of a ~76 ms step
(FlashAttention-2 through torch's SDPA), and GPU.md measured cuDNN's SDPA at about twice the
flash backend's rate on an H100 (head dim 128). HF's `sdpa_attention_forward` calls
torch.nn.functional.scaled_dot_product_attention with is_causal=True and, without a mask,
enable_gqa=True; which backend runs is torch's priority order unless `sdpa_kernel` says
otherwise. Each backend is timed the way HF calls it: q [1, 32, T, D], k/v [1, 8, T, D] in HF's
transposed layout (views of [1, T, H, D]), bf16, both GQA forms (enable_gqa, and k/v repeated to
32 heads as `repeat_kv` does when the mask is given).

Correctness: every backend's output and q/k/v gradients against float32 math attention on the
same (fresh, random) inputs, ‖out - ref‖ / ‖ref‖. Times: triton.testing.do_bench medians.
FLOPs: causal, 2·2·T²·D·Hq / 2 forward; backward 2.5x the forward (flash's recompute included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"s1 (Llama-3.2-1B)": (32, 8, 64), "s2 (Llama-3.1-8B)": (32, 8, 128)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(heads: int, kv_heads: int, dim: int, tokens: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(h):
        x = torch.randn(1, tokens, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        return x.requires_grad_(True)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    dout = torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, dout


def forward(q, k, v, gqa: str, backend=None):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = qt.shape[1] // kt.shape[1]
    if gqa == "repeat_kv":
        kt = kt.repeat_interleave(groups, dim=1)
        vt = vt.repeat_interleave(groups, dim=1)
    kwargs = {"enable_gqa": True} if gqa == "enable_gqa" and groups > 1 else {}
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kwargs)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kwargs)


def fwd_bwd(q, k, v, dout, gqa, backend):
    out = forward(q, k, v, gqa, backend)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    rows = []
    for label, (heads, kv_heads, dim) in SHAPES.items():
        t = options.tokens
        flops = 2 * 2 * t * t * dim * heads / 2 * 3.5  # causal fwd + 2.5x for the backward
        q, k, v, dout = inputs(heads, kv_heads, dim, t, seed=1)
        qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.MATH]):
            ref = fwd_bwd(qf, kf, vf, dout.float(), "repeat_kv", None)
        for gqa in ("enable_gqa", "repeat_kv"):
            for name, backend in [("default", None), *BACKENDS.items()]:
                try:
                    got = fwd_bwd(q, k, v, dout, gqa, backend)
                    torch.cuda.synchronize()
                except RuntimeError as error:
                    print(f"{label} {gqa} {name}: not available ({str(error)[:120]})",
                          file=sys.stderr)
                    continue
                err = max(rel(a, b) for a, b in zip(got, ref, strict=True))
                del got
                args = (q, k, v, gqa, backend)
                ms = triton.testing.do_bench(
                    lambda a=args, g=dout: fwd_bwd(*a[:3], g, *a[3:]), warmup=25, rep=200,
                    return_mode="median")
                fwd_ms = triton.testing.do_bench(lambda a=args: forward(*a), warmup=25, rep=100,
                                                 return_mode="median")
                rows.append({"shape": label, "gqa": gqa, "backend": name, "ms": round(ms, 3),
                             "fwd_ms": round(fwd_ms, 3), "tflops": round(flops / ms / 1e9, 1),
                             "max_rel_err_vs_fp32": float(f"{err:.3g}")})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| shape | gqa | backend | fwd+bwd ms | fwd ms | TFLOP/s | err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['gqa']} | {r['backend']} | {r['ms']} | {r['fwd_ms']} | "
              f"{r['tflops']} | {r['max_rel_err_vs_fp32']:.1e} |")
    result = {"id": "ATTN", "device": torch.cuda.get_device_name(),
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/attention_sdpa.py", "rows": rows,
              "versions": {"torch": torch.__version__,
                           "cudnn": torch.backends.cudnn.version()}}
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
