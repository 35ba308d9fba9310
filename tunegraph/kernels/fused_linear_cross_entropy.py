"""Fused linear + cross-entropy (and per-token log-probs) that never materializes [N, V] logits.

    from tunegraph.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    loss = fused_linear_cross_entropy(hidden_NH, lm_head.weight, labels_N)   # HF's mean over labels
    apply_fused_linear_cross_entropy(model)   # a *ForCausalLM (or its PEFT wrapper) trains through it

Tests: tests/kernels/test_fused_linear_cross_entropy.py (CPU through TRITON_INTERPRET=1, GPU real
sizes under `-m gpu`); benchmark K2: benchmarks/k2_flce.py; design numbers: benchmarks/NOTES.md.

How: tokens go through in chunks of C rows. For each chunk cuBLAS writes the chunk's logits
[C, V] (bf16, fp32 accumulation), `_flce_fwd_kernel` runs one program per row over vocabulary
blocks of BLOCK_V with an online (running max, running sum) logsumexp, writes the token's loss
and logsumexp and, when gradients are wanted, overwrites the logits in place with
d loss / d logits; two more cuBLAS products turn that into the chunk's grad_hidden rows and add
its share of grad_weight. Only the [C, V] buffer exists at a time; C is chosen so that it holds
about four times as many elements as hidden does (Liger's rule times 4: `_CHUNK_BUFFER_FACTOR`
says why; at least 128 tokens; `chunk_tokens` sets it). The products stay in cuBLAS (790
TFLOP/s at 8192^3 on this workplace's H200) rather
than a Triton tl.dot kernel with a logsumexp epilogue: that would save one of the six passes over
the chunk (4.2 GB at K2's 16k x 128256: ~1 ms of ~75), for a matrix kernel that would first have
to match cuBLAS.

Gradients in the forward (as Liger does), not recomputed in the backward (as Cut Cross Entropy
does), for the scalar losses: recomputing costs a fourth N·H·V product, 8NHV FLOPs instead of
6NHV (+33%: 87 ms instead of 65 ms of bf16 matrix work at K2's 16k x 4096 x 128256 on an H200),
to save holding grad_hidden and grad_weight between forward and backward, which are the size of
hidden and weight and must exist in the backward anyway. The per-token losses (reduction="none")
and log-probs get a per-token weight in the backward that grad_weight can not take afterwards
(sum_i g_i dlogits_i h_i^T), so those save only the logsumexp (N floats) and recompute.
grad_weight accumulates in weight's dtype across chunks, as Liger does by default: an fp32
accumulator would add V·H·2 bytes (1 GB at K2) to the peak, and bf16 accumulation over the
C-token chunks measured within the tests' tolerances (see the tests).

The Triton path runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests);
otherwise the pure-PyTorch reference below runs, chunked the same way (torch.utils.checkpoint per
chunk, so its backward recomputes one chunk's logits at a time). Under torch.compile (fullgraph
too) the Triton path is torch.library custom ops, one opaque call per loss; in eager mode the
scalar loss is an autograd Function holding the same gradients (see _FlceLossEager for why).
"""

from __future__ import annotations

import inspect
import re
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunegraph.kernels import HAS_TRITON, cdiv, next_power_of_2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# The recipe key that turns this on (tunegraph/kernels/patch.py); named in every patch error.
RECIPE_KEY = "liger_fused_linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")
# Widest vocabulary block one program loads at a time. 8192 bf16 logits with 16 warps is 16 per
# thread: enough loads in flight for a memory-bound pass without spilling the three fp32
# running vectors (max, sum, smoothing sum). Tests lower it to run several blocks at small V.
_MAX_BLOCK_V = 8192
# Fewest tokens per chunk: fewer rows than a tensor-core tile (64-128 on Hopper) waste most of
# each product; the buffer is then at most 128 x V (33 MB at V = 128256) however small hidden is.
_MIN_CHUNK_TOKENS = 128
# Chunks of fewer tokens than this get grad_weight in vocabulary slices after the chunk loop
# rather than added chunk by chunk. Each chunk's grad_weight += dlogits^T @ hidden re-reads and
# re-writes all of grad_weight (4·V·H bytes in bf16) for 2·C·H·V FLOPs; the slices instead
# recompute their logits (a fourth N·H·V product, 2·C·H·V per chunk's worth) and write each row
# of grad_weight once, from one fp32 product over all N tokens. Per chunk's worth, adding costs
# max(2·C·H·V / rate, 4·V·H / bandwidth) and slicing 4·C·H·V / rate (grad_weight's product and
# the recompute), so slices win for C below rate / bandwidth: ~184 tokens at the H200's nominal
# 790 TFLOP/s and 4.3 TB/s. Measured on an H200 (2026-11-30) the line sits between 128 and 256:
# S1's 128-token chunks (4096 tokens, H 2048, V 128256) took 12.4 ms of a 109 ms step in 31
# additions at 168 TFLOP/s, and slices cut the step to 101 ms; K2b's 256-token chunks (16384
# tokens, H 2304, V 256000) ran 134 ms added per chunk, 139 ms sliced.
_SLICED_WEIGHT_GRAD_BELOW = 256
# The chunk's [C, V] buffer holds about this many times hidden's elements. Each chunk re-reads and
# re-writes all of grad_weight (2·V·H·2 bytes: 2.1 GB at K2's V 128256, H 4096), so fewer,
# larger chunks move less: on an H200 (2026-11-30, K2) 4x Liger's chunk (factor 1) took 81.8 /
# 102.6 ms against 91.7 / 133.0 ms, for 1.63 / 1.70 GB of peak memory against 1.26 / 1.32 GB
# (hidden and the two gradients included; the full bf16 logits alone would be 4.0 / 7.8 GB).
_CHUNK_BUFFER_FACTOR = 4


# ----------------------------------------------------------------------------------------------
# Triton kernels: each program takes BLOCK_N token rows of a [C, V] logits chunk and walks the
# vocabulary in blocks of BLOCK_V columns.
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    # No tl.sum / tl.max / tl.zeros / tl.sigmoid: they are triton.language.standard @jit
    # functions, which the interpreter cannot call when triton was imported before
    # TRITON_INTERPRET was set (under pytest, torch._dynamo imports it first). Reductions go
    # through tl.reduce with the standard library's own combiners, which is what tl.sum / tl.max
    # expand to on a GPU, and which the interpreter recognizes (by identity) and runs as one
    # numpy call; any other combiner it calls once per element (~7 ms each: 56 s for one test).
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    _sum_combine = getattr(tl.standard, "_sum_combine", _add)
    _max_combine = getattr(tl.standard, "_elementwise_max", _maximum)

    @triton.jit
    def _tanh(x):
        # 1 - 2 / (exp(2x) + 1): tl has no tanh the interpreter also runs; absolute error ~1e-7.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _load_logits(row_ptrs, bias_ptr, cols, mask, logit_scale, softcap,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """The model's logits z at `cols`, in fp32: softcap · tanh(scale · (x + b) / softcap)."""
        z = tl.load(row_ptrs + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z = z * logit_scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        return z

    @triton.jit
    def _write_dlogits(row_ptrs, row_mask, bias_ptr, V, num_cols, targets, valid, lse, scale,
                       label_smoothing, z_loss_weight, logit_scale, softcap,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """Overwrite the rows' logits with scale · d loss / d x (x: the product's output).

        d loss / d z_v = p_v (1 + 2 λ lse) - ε/V - (1 - ε)[v = target], then through the
        softcap (1 - (z/cap)²) and the logit scale. Rows with ignored labels get zeros, which the
        two gradient products then read as "no contribution". The rows hold `num_cols` columns of
        the V (all V, or a vocabulary slice, whose first column `targets` are then relative
        to). Shapes: [BLOCK_N, 1] but cols."""
        coef = 1.0 + 2.0 * z_loss_weight * lse
        smooth = label_smoothing / V
        scale = tl.where(valid, scale * logit_scale, 0.0)
        for start in range(0, num_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)[None, :]
            mask = row_mask & (cols < num_cols)
            z = _load_logits(row_ptrs, bias_ptr, cols, mask, logit_scale, softcap,
                             HAS_BIAS, HAS_SOFTCAP)
            grad = tl.exp(z - lse) * coef - smooth - tl.where(cols == targets, 1.0 - label_smoothing, 0.0)
            if HAS_SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(row_ptrs + cols, grad.to(row_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_targets(labels_ptr, rows, row_mask, ignore_index):
        targets = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
        valid = (targets != ignore_index) & row_mask
        return tl.where(valid, targets, 0)[:, None], valid[:, None]

    @triton.jit
    def _flce_fwd_kernel(logits_ptr, stride_row, bias_ptr, labels_ptr, loss_ptr, lse_ptr,
                         scale_ptr, scale_stride, num_rows, V, ignore_index, label_smoothing,
                         z_loss_weight, logit_scale, softcap, HAS_BIAS: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                         WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per row: loss = lse - (1-ε) z_target - ε/V Σ z + λ lse² (0 if ignored) and lse; with
        WRITE_GRAD also the row's d loss / d logits, scaled by scale_ptr[row · scale_stride]."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        row_ptrs = logits_ptr + rows[:, None] * stride_row
        targets, valid = _load_targets(labels_ptr, rows, row_mask, ignore_index)
        z_target = _load_logits(row_ptrs, bias_ptr, targets, valid, logit_scale, softcap,
                                HAS_BIAS, HAS_SOFTCAP)

        # Online logsumexp with one running (max, sum) per lane; lanes merge once at the end, so
        # the loop has no cross-lane reduction. Lanes that saw only padding keep -inf and 0.
        run_max = tl.full([BLOCK_N, BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        z_sum = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)[None, :]
            mask = row_mask[:, None] & (cols < V)
            z = _load_logits(row_ptrs, bias_ptr, cols, mask, logit_scale, softcap,
                             HAS_BIAS, HAS_SOFTCAP)
            if HAS_SMOOTHING:
                z_sum += tl.where(mask, z, 0.0)
            z = tl.where(mask, z, float("-inf"))
            new_max = tl.maximum(run_max, z)
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - ref) + tl.exp(z - ref)
            run_max = new_max
        # Rows past num_rows saw only padding: give them lse = 0 rather than log(0).
        row_max = tl.reduce(run_max, 1, _max_combine)[:, None]
        row_max = tl.where(row_mask[:, None], row_max, 0.0)
        row_sum = tl.reduce(run_sum * tl.exp(run_max - row_max), 1, _sum_combine)[:, None]
        lse = row_max + tl.log(tl.where(row_mask[:, None], row_sum, 1.0))

        loss = lse - (1.0 - label_smoothing) * z_target + z_loss_weight * lse * lse
        if HAS_SMOOTHING:
            loss -= label_smoothing / V * tl.reduce(z_sum, 1, _sum_combine)[:, None]
        tl.store(loss_ptr + rows[:, None], tl.where(valid, loss, 0.0), mask=row_mask[:, None])
        tl.store(lse_ptr + rows[:, None], lse, mask=row_mask[:, None])
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + rows[:, None] * scale_stride, mask=row_mask[:, None],
                            other=0.0).to(tl.float32)
            _write_dlogits(row_ptrs, row_mask[:, None], bias_ptr, V, V, targets, valid, lse, scale,
                           label_smoothing, z_loss_weight, logit_scale, softcap, HAS_BIAS,
                           HAS_SOFTCAP, BLOCK_V)

    @triton.jit
    def _flce_bwd_kernel(logits_ptr, stride_row, bias_ptr, labels_ptr, lse_ptr, grad_ptr,
                         grad_stride, num_rows, V, num_cols, col_start, ignore_index,
                         label_smoothing, z_loss_weight, logit_scale, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Each row's lse is known (from the forward, or from pass 1 of the vocabulary-sliced
        weight gradient): write grad[row] · dloss/dx over the rows' `num_cols` logits, which
        are the vocabulary's columns col_start ... col_start + num_cols - 1."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = (rows < num_rows)[:, None]
        targets, valid = _load_targets(labels_ptr, rows, rows < num_rows, ignore_index)
        lse = tl.load(lse_ptr + rows[:, None], mask=row_mask, other=0.0)
        scale = tl.load(grad_ptr + rows[:, None] * grad_stride, mask=row_mask, other=0.0)
        _write_dlogits(logits_ptr + rows[:, None] * stride_row, row_mask, bias_ptr, V, num_cols,
                       targets - col_start, valid, lse, scale.to(tl.float32), label_smoothing,
                       z_loss_weight, logit_scale, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_V)


# ----------------------------------------------------------------------------------------------
# Host side: the chunk loop.
# ----------------------------------------------------------------------------------------------
def _chunk_tokens(num_tokens: int, hidden_size: int, vocab_size: int, chunk_tokens: int,
                  factor: int = _CHUNK_BUFFER_FACTOR) -> int:
    """Tokens per chunk: `chunk_tokens` if set, else the power of two that makes the [C, V]
    buffer about `factor` times hidden's size: C = factor * next_pow2(N / ceil(V / H)) (factor 1
    is Liger's rule, its memory)."""
    if chunk_tokens > 0:
        return max(1, min(chunk_tokens, num_tokens))
    ratio = -(-vocab_size // hidden_size)
    chunk = factor * (1 << max(0, (-(-num_tokens // ratio) - 1).bit_length()))
    return max(1, min(num_tokens, max(chunk, _MIN_CHUNK_TOKENS)))


def _sliced_weight_grad(hidden, weight, bias, labels, lse_N, grad_scale, scale_stride, buffer,
                        grad_weight, common) -> None:
    """grad_weight in vocabulary slices of ~buffer.numel() / N columns, the lse known: each
    slice's logits [N, w] again (in `buffer`'s memory when it fits), d loss / d logits in
    place, then grad_weight[slice] = dlogits^T @ hidden in one product."""
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    width = max(128, buffer.numel() // num_tokens // 128 * 128)
    if num_tokens * width > buffer.numel():  # very many tokens: a buffer of 128 columns
        buffer = hidden.new_empty(num_tokens, width)
    buffer = buffer.view(-1)
    config = _row_kernel_config(width)
    grid = (cdiv(num_tokens, config["BLOCK_N"]),)
    for start in range(0, vocab_size, width):
        end = min(start + width, vocab_size)
        logits = buffer[: num_tokens * (end - start)].view(num_tokens, end - start)
        torch.mm(hidden, weight[start:end].t(), out=logits)
        _flce_bwd_kernel[grid](logits, logits.stride(0),
                               bias[start:end] if bias is not None else logits, labels, lse_N,
                               grad_scale, scale_stride, num_tokens, vocab_size, end - start,
                               start, **common, **config)
        torch.mm(logits.t(), hidden, out=grad_weight[start:end])


def _row_kernel_config(vocab_size: int) -> dict[str, int]:
    """Tiles of ~8192 elements: one row of 8192 columns at LLM vocabularies (the grid then has C
    programs, 4 per multiprocessor at C = 512), up to 16 rows of a small vocabulary."""
    block_v = min(_MAX_BLOCK_V, next_power_of_2(vocab_size))
    block_n = min(16, max(1, 8192 // block_v))
    num_warps = 16 if block_n * block_v >= 8192 else 8 if block_n * block_v >= 2048 else 4
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)


def _flce_chunked(hidden, weight, bias, labels, *, ignore_index, label_smoothing, z_loss_weight,
                  logit_scale, softcap, chunk_tokens, lse=None, grad_scale=None,
                  need_grad_hidden=False, need_grad_weight=False, need_grad_bias=False):
    """The chunk loop behind every op. Without `lse`: per-token losses and lse (stats). With any
    need_*: gradients of Σ_i grad_scale_i · loss_i (grad_scale 0-d or [N]); with `lse` given the
    stats pass is skipped (backward recompute). Returns (loss_N, lse_N, grad_hidden,
    grad_weight, grad_bias), empty tensors for what was not asked for."""
    num_tokens, _ = hidden.shape
    vocab_size = weight.shape[0]
    write_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    assert lse is not None or grad_scale is not None or not write_grad
    device = hidden.device
    compute_stats = lse is None
    loss_N = torch.zeros(num_tokens, device=device, dtype=torch.float32) if compute_stats else None
    lse_N = torch.empty(num_tokens, device=device, dtype=torch.float32) if compute_stats else lse
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = (torch.empty_like(weight) if need_grad_weight and num_tokens
                   else torch.zeros_like(weight) if need_grad_weight else weight.new_empty(0))
    grad_bias_fp32 = torch.zeros(vocab_size, device=device, dtype=torch.float32) if need_grad_bias else None
    # grad_scale: 0-d (one scale for every row) or [N] (per token, possibly an expanded stride 0).
    scale_stride = 0
    if write_grad:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32)
        scale_stride = grad_scale.stride(0) if grad_scale.dim() else 0

    chunk = _chunk_tokens(num_tokens, hidden.shape[1], vocab_size, chunk_tokens)
    sliced = need_grad_weight and chunk < min(num_tokens, _SLICED_WEIGHT_GRAD_BELOW)
    # The chunk loop writes d loss / d logits when a gradient comes from it: grad_hidden,
    # grad_bias, and grad_weight unless the slices after it compute that one.
    chunk_grads = need_grad_hidden or need_grad_bias or (need_grad_weight and not sliced)
    config = _row_kernel_config(vocab_size)
    logits_buffer = hidden.new_empty(chunk, vocab_size) if num_tokens else None
    bias_arg = bias if bias is not None else logits_buffer  # never read without HAS_BIAS
    common = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                  z_loss_weight=z_loss_weight, logit_scale=logit_scale, softcap=softcap or 1.0,
                  HAS_BIAS=bias is not None, HAS_SOFTCAP=bool(softcap))
    for index, start in enumerate(range(0, num_tokens, chunk) if compute_stats or chunk_grads
                                  else ()):
        end = min(start + chunk, num_tokens)
        hidden_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        torch.mm(hidden_chunk, weight.t(), out=logits)
        grid = (cdiv(end - start, config["BLOCK_N"]),)
        scale_arg = (lse_N if not chunk_grads  # a dummy: the kernel reads no scale then
                     else grad_scale[start:end] if scale_stride else grad_scale)
        if compute_stats:
            _flce_fwd_kernel[grid](
                logits, logits.stride(0), bias_arg, labels[start:end], loss_N[start:end],
                lse_N[start:end], scale_arg, scale_stride, end - start, V=vocab_size,
                HAS_SMOOTHING=label_smoothing > 0.0, WRITE_GRAD=chunk_grads, **common, **config)
        else:
            _flce_bwd_kernel[grid](logits, logits.stride(0), bias_arg, labels[start:end],
                                   lse_N[start:end], scale_arg, scale_stride, end - start,
                                   vocab_size, vocab_size, 0, **common, **config)
        if not chunk_grads:
            continue
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight and not sliced:
            # One rounding of grad_weight per chunk: cuBLAS adds in fp32, then stores its dtype.
            if index == 0:
                torch.mm(logits.t(), hidden_chunk, out=grad_weight)
            else:
                grad_weight.addmm_(logits.t(), hidden_chunk)
        if need_grad_bias:
            grad_bias_fp32 += logits.sum(0, dtype=torch.float32)
    if sliced:
        _sliced_weight_grad(hidden, weight, bias, labels, lse_N, grad_scale, scale_stride,
                            logits_buffer, grad_weight, common)
    grad_bias = grad_bias_fp32.to(bias.dtype) if need_grad_bias else hidden.new_empty(0)
    if loss_N is None:
        loss_N = hidden.new_empty(0, dtype=torch.float32)
    return loss_N, lse_N, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# Reference: pure PyTorch, same chunking, autograd through torch.utils.checkpoint per chunk.
# ----------------------------------------------------------------------------------------------
def _reference_chunk(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight,
                     logit_scale, softcap):
    # The logits are rounded to hidden's dtype by the product, then upcast: what HF's
    # ForCausalLMLoss sees from lm_head, and what the Triton path reads from its buffer.
    z = F.linear(hidden, weight, bias).float() * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    z_target = z.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * z_target + z_loss_weight * lse * lse
    if label_smoothing:
        loss = loss - label_smoothing * z.mean(dim=-1)
    return torch.where(valid, loss, 0.0), lse


def _reference_token_losses(hidden, weight, bias, labels, *, ignore_index, label_smoothing,
                            z_loss_weight, logit_scale, softcap, chunk_tokens):
    chunk = _chunk_tokens(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_tokens)
    args = (ignore_index, label_smoothing, z_loss_weight, logit_scale, softcap)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    losses, lses = [], []
    for start in range(0, hidden.shape[0], chunk):
        chunk_args = (hidden[start:start + chunk], weight, bias, labels[start:start + chunk], *args)
        loss, lse = (checkpoint(_reference_chunk, *chunk_args, use_reentrant=False) if needs_grad
                     else _reference_chunk(*chunk_args))
        losses.append(loss)
        lses.append(lse)
    if not losses:
        empty = hidden.new_zeros(0, dtype=torch.float32) + 0.0 * weight.sum()
        return empty, empty.detach()
    return torch.cat(losses), torch.cat(lses).detach()


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) with their autograd formulas.
# ----------------------------------------------------------------------------------------------
def _flce_loss_values(hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing,
                      z_loss_weight, logit_scale, softcap, chunk_tokens, need_grad_hidden,
                      need_grad_weight, need_grad_bias):
    """(grad_scale · Σ loss_i, grad_scale · Σ λ lse_i², and the gradients of the first)."""
    with torch.autocast(hidden.device.type, enabled=False):
        loss_N, lse_N, grad_hidden, grad_weight, grad_bias = _flce_chunked(
            hidden, weight, bias, labels, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
            logit_scale=logit_scale, softcap=softcap, chunk_tokens=chunk_tokens,
            grad_scale=grad_scale, need_grad_hidden=need_grad_hidden,
            need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
        valid = labels != ignore_index
        loss = loss_N.sum() * grad_scale
        z_loss = torch.where(valid, lse_N * lse_N, 0.0).sum() * (z_loss_weight * grad_scale)
    return loss, z_loss, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("tunegraph::flce_loss", mutates_args=())
def _flce_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  labels: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int,
                  label_smoothing: float, z_loss_weight: float, logit_scale: float,
                  softcap: float, chunk_tokens: int, need_grad_hidden: bool,
                  need_grad_weight: bool, need_grad_bias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss under torch.compile: the gradients are outputs, as a functional op's must be."""
    return _flce_loss_values(hidden, weight, bias, labels, grad_scale, ignore_index,
                             label_smoothing, z_loss_weight, logit_scale, softcap, chunk_tokens,
                             need_grad_hidden, need_grad_weight, need_grad_bias)


@_flce_loss_op.register_fake
def _(hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing, z_loss_weight,
      logit_scale, softcap, chunk_tokens, need_grad_hidden, need_grad_weight, need_grad_bias):
    scalar = hidden.new_empty((), dtype=torch.float32)
    return (scalar, scalar.clone(),
            torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_grad_bias else hidden.new_empty(0))


def _flce_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.backward_done = False


def _scaled_saved_grads(ctx, grad_loss, in_place: bool) -> list[torch.Tensor]:
    """The gradients the forward computed, times the loss's incoming gradient: in place in
    eager mode; out of place when traced (the custom op's backward, which runs only under
    torch.compile, where `grad_loss == 1.0` can not be asked of a traced tensor: AOTAutograd
    traces this backward outside dynamo, so torch.compiler.is_compiling() is False there)."""
    if ctx.backward_done:
        raise RuntimeError("fused_linear_cross_entropy: the gradients were computed in the forward "
                           "and are scaled in place by the backward, so it runs once per forward")
    ctx.backward_done = True
    grads = list(ctx.saved_tensors)
    if not in_place:
        return [grad * grad_loss for grad in grads]
    if not bool(grad_loss == 1.0):
        # In place: a copy of grad_weight would add V·H·2 bytes to the peak (1 GB at K2).
        # Testing for 1.0 (a plain loss.backward()) costs one host sync and saves two passes
        # over grad_weight when it is 1 (2.1 GB moved: 0.5 ms at K2 on an H200).
        for grad in grads:
            grad.mul_(grad_loss)
    return grads


def _flce_loss_backward(ctx, grad_loss, _grad_z_loss, _gh, _gw, _gb):
    grads, needs = _scaled_saved_grads(ctx, grad_loss, in_place=False), ctx.needs_input_grad
    return tuple(grads[i] if needs[i] else None for i in range(3)) + (None,) * 11


torch.library.register_autograd("tunegraph::flce_loss", _flce_loss_backward,
                                setup_context=_flce_loss_setup_context)


class _FlceLossEager(torch.autograd.Function):
    """Eager only: tunegraph::flce_loss with the gradients kept as the Function's own saved
    tensors, not as outputs. A custom op's outputs saved for its backward are stored as shallow
    copies sharing their storage, and on the H200 (torch 2.11) AccumulateGrad then copied both
    gradients rather than taking them: K2's peak was 2,260 MiB, twice grad_hidden + grad_weight,
    against 1,255 for Liger's Function (2026-11-30). Intermediates saved this way are released
    before the gradients reach .grad, which can then take them without a copy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, grad_scale, *options):
        loss, z_loss, *grads = _flce_loss_values(hidden, weight, bias, labels, grad_scale,
                                                 *options)
        ctx.save_for_backward(*grads)
        ctx.backward_done = False
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        grads, needs = _scaled_saved_grads(ctx, grad_loss, in_place=True), ctx.needs_input_grad
        return tuple(grads[i] if needs[i] else None for i in range(3)) + (None,) * 11


@torch.library.custom_op("tunegraph::flce_token_losses", mutates_args=())
def _flce_token_losses_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, ignore_index: int, label_smoothing: float,
                          z_loss_weight: float, logit_scale: float, softcap: float,
                          chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_N, lse_N): per-token losses (0 where ignored), float32."""
    with torch.autocast(hidden.device.type, enabled=False):
        loss_N, lse_N, *_ = _flce_chunked(
            hidden, weight, bias, labels, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
            logit_scale=logit_scale, softcap=softcap, chunk_tokens=chunk_tokens)
    return loss_N, lse_N


@_flce_token_losses_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, logit_scale,
      softcap, chunk_tokens):
    loss_N = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return loss_N, torch.empty_like(loss_N)


@torch.library.custom_op("tunegraph::flce_token_losses_backward", mutates_args=())
def _flce_token_losses_backward_op(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        labels: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int,
        label_smoothing: float, z_loss_weight: float, logit_scale: float, softcap: float,
        chunk_tokens: int, need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        _, _, grad_hidden, grad_weight, grad_bias = _flce_chunked(
            hidden, weight, bias, labels, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
            logit_scale=logit_scale, softcap=softcap, chunk_tokens=chunk_tokens, lse=lse,
            grad_scale=grad_loss, need_grad_hidden=need_grad_hidden,
            need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
    return grad_hidden, grad_weight, grad_bias


@_flce_token_losses_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, grad_loss, ignore_index, label_smoothing, z_loss_weight,
      logit_scale, softcap, chunk_tokens, need_grad_hidden, need_grad_weight, need_grad_bias):
    return (torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_grad_bias else hidden.new_empty(0))


def _token_losses_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.options = options


def _token_losses_backward(ctx, grad_loss, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_hidden, grad_weight, grad_bias = torch.ops.tunegraph.flce_token_losses_backward(
        hidden, weight, bias, labels, lse, grad_loss.float(), *ctx.options,
        needs[0], needs[1], needs[2])
    return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None,
            grad_bias if needs[2] else None) + (None,) * 7


torch.library.register_autograd("tunegraph::flce_token_losses", _token_losses_backward,
                                setup_context=_token_losses_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------
def _prepare(hidden_NH, weight_VH, labels_N, bias_V, *, ignore_index, label_smoothing,
             z_loss_weight, reduction, logit_scale, softcap, chunk_tokens):
    """Validate (ValueError names the argument) and apply autocast as F.linear would."""
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden_NH must be [N, H] and weight_VH [V, H]; got "
                         f"{tuple(hidden_NH.shape)} and {tuple(weight_VH.shape)}")
    if labels_N.shape != (hidden_NH.shape[0],) or labels_N.is_floating_point():
        raise ValueError(f"labels_N must be integer [N={hidden_NH.shape[0]}]; got "
                         f"{labels_N.dtype} {tuple(labels_N.shape)}")
    if bias_V is not None and bias_V.shape != (weight_VH.shape[0],):
        raise ValueError(f"bias_V must be [V={weight_VH.shape[0]}]; got {tuple(bias_V.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss_weight < 0.0:
        raise ValueError(f"z_loss_weight must be >= 0; got {z_loss_weight}")
    if not logit_scale > 0.0:
        raise ValueError(f"logit_scale (1/temperature) must be > 0; got {logit_scale}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap must be None or > 0; got {softcap}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be None or >= 1; got {chunk_tokens}")
    device_type = hidden_NH.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_NH, weight_VH = hidden_NH.to(dtype), weight_VH.to(dtype)
        bias_V = bias_V.to(dtype) if bias_V is not None else None
    if hidden_NH.dtype != weight_VH.dtype or (bias_V is not None and bias_V.dtype != weight_VH.dtype):
        raise ValueError(f"hidden_NH, weight_VH and bias_V must share a dtype; got {hidden_NH.dtype}, "
                         f"{weight_VH.dtype}, {None if bias_V is None else bias_V.dtype}")
    if hidden_NH.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16; got {hidden_NH.dtype}")
    labels_N = labels_N.to(hidden_NH.device)
    # Out-of-range labels would read another row; checked on the device, without a host sync.
    vocab_size = weight_VH.shape[0]
    torch._assert_async(((labels_N == ignore_index) | ((labels_N >= 0) & (labels_N < vocab_size))).all(),
                        "fused_linear_cross_entropy: a label is outside [0, V) and not ignore_index")
    return hidden_NH.contiguous(), weight_VH.contiguous(), labels_N.contiguous(), bias_V


def fused_linear_cross_entropy(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_z_loss: bool = False,
    chunk_tokens: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of softcap(logit_scale · (hidden_NH @ weight_VH.T + bias_V)) against labels_N
    without materializing the [N, V] logits. Returns a float32 loss (and the z-loss term, detached,
    for logging, when return_z_loss).

    label_smoothing: F.cross_entropy's (uniform mass ε over V). z_loss_weight: PaLM's λ·lse² per
    non-ignored token, added to the loss and reduced like it. reduction: "mean" over non-ignored
    tokens, "sum", or "none" (per token, 0 where ignored). num_items_in_batch: what transformers
    passes under gradient accumulation; the loss is the sum over tokens divided by it (HF's
    ForCausalLMLoss), only with reduction="mean". softcap: Gemma's final_logit_softcapping.
    chunk_tokens: tokens per chunk (default: a [C, V] buffer about hidden's size)."""
    return _cross_entropy(hidden_NH, weight_VH, labels_N, bias_V, use_triton(hidden_NH),
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          z_loss_weight=z_loss_weight, reduction=reduction,
                          num_items_in_batch=num_items_in_batch, softcap=softcap,
                          logit_scale=logit_scale, return_z_loss=return_z_loss,
                          chunk_tokens=chunk_tokens)


def fused_linear_cross_entropy_reference(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fused_linear_cross_entropy (same arguments) in pure PyTorch, on any device: chunked, one
    chunk's logits at a time, gradients by autograd through per-chunk checkpoints."""
    return _cross_entropy(hidden_NH, weight_VH, labels_N, bias_V, False, **options)


def _cross_entropy(hidden_NH, weight_VH, labels_N, bias_V, use_triton, *, ignore_index=-100,
                   label_smoothing=0.0, z_loss_weight=0.0, reduction="mean",
                   num_items_in_batch=None, softcap=None, logit_scale=1.0, return_z_loss=False,
                   chunk_tokens=None):
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch replaces the mean's divisor; it needs reduction='mean', "
                         f"got {reduction!r}")
    hidden_NH, weight_VH, labels_N, bias_V = _prepare(
        hidden_NH, weight_VH, labels_N, bias_V, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss_weight=z_loss_weight, reduction=reduction,
        logit_scale=logit_scale, softcap=softcap, chunk_tokens=chunk_tokens)
    options = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                   z_loss_weight=float(z_loss_weight), logit_scale=float(logit_scale),
                   softcap=float(softcap or 0.0), chunk_tokens=chunk_tokens or 0)
    valid = labels_N != ignore_index

    if reduction == "none":
        if use_triton:
            loss_N, lse_N = torch.ops.tunegraph.flce_token_losses(
                hidden_NH, weight_VH, bias_V, labels_N, *options.values())
        else:
            loss_N, lse_N = _reference_token_losses(hidden_NH, weight_VH, bias_V, labels_N, **options)
        if not return_z_loss:
            return loss_N
        return loss_N, torch.where(valid, z_loss_weight * lse_N * lse_N, 0.0).detach()

    device = hidden_NH.device
    if reduction == "sum":
        grad_scale = torch.ones((), device=device, dtype=torch.float32)
    elif num_items_in_batch is None:
        grad_scale = 1.0 / valid.sum().to(torch.float32)  # 0 valid tokens: nan, as F.cross_entropy
    else:
        grad_scale = 1.0 / torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)

    if use_triton:
        enabled = torch.is_grad_enabled()
        needs = (enabled and hidden_NH.requires_grad, enabled and weight_VH.requires_grad,
                 enabled and bias_V is not None and bias_V.requires_grad)
        if torch.compiler.is_compiling() or not any(needs):
            loss, z_loss, *_ = torch.ops.tunegraph.flce_loss(
                hidden_NH, weight_VH, bias_V, labels_N, grad_scale, *options.values(), *needs)
        else:
            loss, z_loss = _FlceLossEager.apply(hidden_NH, weight_VH, bias_V, labels_N,
                                                grad_scale, *options.values(), *needs)
    else:
        loss_N, lse_N = _reference_token_losses(hidden_NH, weight_VH, bias_V, labels_N, **options)
        loss = loss_N.sum() * grad_scale
        z_loss = torch.where(valid, lse_N * lse_N, 0.0).sum() * (z_loss_weight * grad_scale)
    return (loss, z_loss.detach()) if return_z_loss else loss


def fused_linear_log_probs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per token, float32, without the [N, V] logits:
    TRL's selective_log_softmax(hidden @ W.T, targets, temperature) for DPO/GRPO. Targets equal
    to ignore_index give 0. The backward recomputes the logits chunk by chunk (the per-token
    weights of a DPO/GRPO loss are known only then)."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return -_cross_entropy(hidden_NH, weight_VH, targets_N, bias_V, use_triton(hidden_NH),
                           ignore_index=ignore_index, reduction="none",
                           logit_scale=1.0 / temperature, chunk_tokens=chunk_tokens)


def fused_linear_log_probs_reference(hidden_NH, weight_VH, targets_N, bias_V=None, *,
                                     temperature=1.0, ignore_index=-100, chunk_tokens=None):
    """fused_linear_log_probs through the pure-PyTorch path."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return -_cross_entropy(hidden_NH, weight_VH, targets_N, bias_V, False,
                           ignore_index=ignore_index, reduction="none",
                           logit_scale=1.0 / temperature, chunk_tokens=chunk_tokens)


# ----------------------------------------------------------------------------------------------
# Model hook: a transformers *ForCausalLM computes its training loss through the function above.
# ----------------------------------------------------------------------------------------------
# Lines allowed between `logits = self.lm_head(...)` and `self.loss_function(...)` in a
# *ForCausalLM.forward, and what each means for the fused loss (transformers 5.x sources).
_LOGITS_LINES = {
    r"if self\.config\.final_logit_softcapping is not None:": "softcap",  # Gemma 2/3/4, nanochat
    r"logits = logits / self\.config\.final_logit_softcapping": "softcap",
    r"logits = torch\.tanh\(logits\)": "softcap",
    r"logits = logits \* self\.config\.final_logit_softcapping": "softcap",
    r"logits = logits \* self\.logit_scale": "scale",  # Cohere
    r"logits = logits / self\.config\.logits_scaling": "inverse_scaling",  # Granite
    r"loss = None": None,
    r"if labels is not None:": None,
}


def _patch_error(model: Any, reason: str) -> ValueError:
    return ValueError(f"{RECIPE_KEY}: cannot patch {type(model).__name__}: {reason}. "
                      f"Set {RECIPE_KEY}: false for this model.")


def _logits_transform(model: Any) -> tuple[float, float | None]:
    """(logit_scale, softcap) that model.forward applies to lm_head's output, read from its
    source; ValueError for anything else it does to the logits."""
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError) as error:
        raise _patch_error(model, f"its forward's source is unavailable ({error})") from error
    lines = [re.sub(r"#.*$", "", line).strip() for line in source.splitlines()]
    lm_head_lines = [i for i, line in enumerate(lines) if "self.lm_head(" in line]
    loss_lines = [i for i, line in enumerate(lines) if "self.loss_function(" in line]
    if len(lm_head_lines) != 1 or not re.fullmatch(r"logits = self\.lm_head\(.*\)", lines[lm_head_lines[0]]):
        raise _patch_error(model, "its forward does not call `logits = self.lm_head(...)` once")
    if len(loss_lines) != 1 or loss_lines[0] < lm_head_lines[0]:
        raise _patch_error(model, "its forward does not compute `self.loss_function(...)` "
                                  "after lm_head")
    kinds = set()
    for line in lines[lm_head_lines[0] + 1:loss_lines[0]]:
        if not line:
            continue
        kind = next((k for pattern, k in _LOGITS_LINES.items() if re.fullmatch(pattern, line)), "?")
        if kind == "?":
            raise _patch_error(model, f"its forward changes the logits in a way the fused loss does "
                                      f"not handle: {line!r}")
        if kind:
            kinds.add(kind)
    for line in lines[loss_lines[0] + 1:]:
        if re.search(r"\blogits\b", line) and line != "logits=logits,":
            raise _patch_error(model, f"its forward uses the logits after the loss: {line!r}")
    config = model.config
    logit_scale = 1.0
    if "scale" in kinds:
        logit_scale = float(model.logit_scale)
    if "inverse_scaling" in kinds:
        logit_scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None) if "softcap" in kinds else None
    return logit_scale, softcap


def _active_linear(module: torch.nn.Module, model: Any) -> torch.nn.Linear:
    """The nn.Linear lm_head's forward would run: PEFT's modules_to_save copy of the active
    adapter (as ModulesToSaveWrapper.forward picks it), else the module itself."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        adapters = module.active_adapters
        if (module.disable_adapters or not adapters
                or any(name not in module._adapters for name in adapters)):
            return _active_linear(module.original_module, model)
        return _active_linear(module.modules_to_save[adapters[0]], model)
    if type(module).forward is not torch.nn.Linear.forward or not isinstance(module, torch.nn.Linear):
        raise _patch_error(model, f"lm_head is a {type(module).__name__} (LoRA on lm_head, a "
                                  "quantized layer...), not a plain nn.Linear")
    return module


def _causal_lm_loss(model: Any, hidden_BTH: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                    softcap: float | None, num_items_in_batch=None, ignore_index: int = -100,
                    shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """HF's ForCausalLMLoss (shift by one, mean over labelled tokens or sum / num_items_in_batch)
    on hidden states and lm_head's weight."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_NH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1])
    labels_N = shift_labels.reshape(-1).to(hidden_NH.device)
    if not torch.compiler.is_compiling():
        # Prompt and padding tokens carry no loss: drop their rows before the three products
        # (half the FLOPs when half the tokens are masked), for one host sync.
        keep = (labels_N != ignore_index).nonzero().squeeze(1)
        hidden_NH, labels_N = hidden_NH.index_select(0, keep), labels_N.index_select(0, keep)
    linear = _active_linear(model.lm_head, model)
    return fused_linear_cross_entropy(hidden_NH, linear.weight, labels_N, linear.bias,
                                      ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                      softcap=softcap, logit_scale=logit_scale)


class _LMHeadSwitch:
    """lm_head.forward while the model is patched: the module's own forward, or during a fused
    training call `capture`. Set once at patch time, so a call flips one attribute instead of
    binding a new method (which torch.compile's dynamo cannot trace: it broke the graph)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module  # copy.deepcopy of the module copies this switch with it
        self.capture = None

    def __call__(self, *args, **kwargs):
        if self.capture is not None:
            return self.capture(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class _FusedForward:
    """model.forward after the patch: the model's own forward, with the loss fused while training
    with labels. An object holding the model (not a closure) so that copy.deepcopy of the model
    (TRL's reference models) gives a copy whose forward runs the copy; its __signature__ is the
    original's, which Trainer reads to pick the dataset columns and loss kwargs to pass."""

    def __init__(self, model: Any, logit_scale: float, softcap: float | None):
        self.model, self.logit_scale, self.softcap = model, logit_scale, softcap
        self.original = model.forward  # a bound method (or accelerate's hook): deepcopy rebinds it
        self.__signature__ = inspect.signature(self.original)
        self.__doc__ = self.original.__doc__

    def __call__(self, *args, **kwargs):
        # Trainer passes keywords: skip binding the signature (tens of µs of host time per step).
        labels = kwargs.get("labels") if "labels" in kwargs or not args else (
            self.__signature__.bind_partial(*args, **kwargs).arguments.get("labels"))
        if labels is None or not self.model.training:
            return self.original(*args, **kwargs)
        return self._fused(args, kwargs)

    def _fused(self, args, kwargs):
        """Run the model's forward with lm_head returning an empty [..., 0] placeholder (what the
        forward then does to the logits costs nothing) and the loss taken from lm_head's input."""
        model, captured = self.model, {}
        lm_head = model.lm_head

        def capture(hidden_states, *unused, **unused_kwargs):
            captured["hidden"] = hidden_states
            captured["placeholder"] = hidden_states.new_empty(*hidden_states.shape[:-1], 0)
            return captured["placeholder"]

        def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                          ignore_index=-100, shift_labels=None, **unused):
            assert "hidden" in captured, "lm_head did not run before the loss"
            return _causal_lm_loss(model, captured["hidden"], labels, self.logit_scale,
                                   self.softcap, num_items_in_batch, ignore_index, shift_labels)

        # Restored by assignment, never `del`: under torch.compile the assignments are pending
        # side effects while the forward is traced, and a `del` of one would run for real.
        saved_loss = model.__dict__.get("_loss_function") or model.loss_function
        switch = lm_head.__dict__.get("forward")
        if isinstance(switch, _LMHeadSwitch) and switch.module is lm_head:
            holder, name, saved = switch, "capture", None  # the switch installed at patch time
        else:  # lm_head replaced since the patch, or hooked (accelerate): swap its forward
            holder, name = lm_head, "forward"
            saved = switch or types.MethodType(type(lm_head).forward, lm_head)
        setattr(holder, name, capture)
        model.loss_function = loss_function
        try:
            output = self.original(*args, **kwargs)
        finally:
            setattr(holder, name, saved)
            model.loss_function = saved_loss
        placeholder = captured.get("placeholder")
        if isinstance(output, tuple):  # return_dict=False
            return tuple(item for item in output if item is not placeholder)
        return type(output)(**{key: value for key, value in output.items() if key != "logits"})


def apply_fused_linear_cross_entropy(model: Any) -> None:
    """Make a transformers *ForCausalLM (or a PEFT model around one) compute its training loss
    with fused_linear_cross_entropy: when it is training and gets `labels`, its output has the
    same loss as HF's ForCausalLMLoss (num_items_in_batch honoured) and logits=None. Eval and
    generation are unchanged. lm_head may be PEFT's modules_to_save wrapper (the active copy's
    weight is used). ValueError, naming the recipe key, for a model this can not patch."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(causal_lm.__dict__.get("forward"), _FusedForward):
        return
    if not isinstance(getattr(causal_lm, "lm_head", None), torch.nn.Module):
        raise _patch_error(causal_lm, "it has no lm_head module")
    _active_linear(causal_lm.lm_head, causal_lm)
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(causal_lm, "loss_function", None) is not ForCausalLMLoss:
        raise _patch_error(causal_lm, "its loss_function is not transformers' ForCausalLMLoss")
    logit_scale, softcap = _logits_transform(causal_lm)
    if "labels" not in inspect.signature(causal_lm.forward).parameters:
        raise _patch_error(causal_lm, "its forward takes no `labels`")
    if "forward" not in causal_lm.lm_head.__dict__:  # hooked lm_heads keep the per-call swap
        causal_lm.lm_head.forward = _LMHeadSwitch(causal_lm.lm_head)
    # The property's setter stores `_loss_function`, which each call swaps: set it now, so
    # torch.compile's guard on it holds from the first call (no recompile at the second).
    causal_lm.loss_function = causal_lm.loss_function
    causal_lm.forward = _FusedForward(causal_lm, logit_scale, softcap)
