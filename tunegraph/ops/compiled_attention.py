"""SDPA's causal fast path for compiled training: no materialised mask when none is needed.

    with causal_sdpa_under_compile(recipe.torch_compile):
        trainer.train()

In eager mode transformers' SDPA mask (`transformers.masking_utils.sdpa_mask`) returns None for a
plain causal mask without padding, and attention runs `is_causal=True`: flash attention. Under
torch.compile with torch < 2.14 it never does (dynamo answers `torch.compiler.is_exporting()`
with True; transformers' comment in `_ignore_causal_mask_sdpa` cites pytorch#176499), so a
compiled step builds a [B, 1, T, T] boolean mask and SDPA picks a masked kernel. On the S1
benchmark (Llama-3.2-1B shape, 4096 tokens, H200) that was cuDNN's: 30.6 ms of attention a step
against flash's 10.9 (benchmarks/NOTES.md, S1).

What this does not fix: with the mask gone, torch 2.11's compiled SDPA still picked cuDNN's
attention (`aten._scaled_dot_product_cudnn_attention`, 30.6 ms a step) where eager picks flash
(10.9 ms) on the same shapes, and with cuDNN's backend switched off it picked memory-efficient
attention, not flash (S1 compiled: 160 ms a step against 107.5; benchmarks/NOTES.md, S1). So
compiled training is not the fast path on that torch; eager with the kernels is.

This wraps transformers' own SDPA mask function for the length of training: for the one case
eager mode skips on shapes and arguments alone (no padding mask, the plain causal mask function,
no sliding window, as many queries as keys) it returns None; everything else goes to
transformers. Nothing is decided from tensor values, so it traces. Written by hand: transformers
offers the mask interface to register into, not this rule for compiled graphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


def plain_causal(**kwargs: Any) -> bool:
    """True when transformers' mask arguments describe attention that SDPA's `is_causal=True`
    computes exactly: no padding mask, the causal mask function itself (packed documents,
    sliding windows and overlays compose other functions), no local window, and as many query
    positions as key positions (so no cache offset). transformers 5.19 passes q_length, earlier
    5.x cache_position."""
    if not kwargs.get("allow_is_causal_skip", True) or kwargs.get("attention_mask") is not None:
        return False
    if kwargs.get("mask_function", causal_mask_function) is not causal_mask_function:
        return False
    if kwargs.get("local_size") is not None:
        return False
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:
        q_length = kwargs["cache_position"].shape[0]
    kv_length = kwargs.get("kv_length")
    return q_length is not None and q_length == kv_length and q_length > 1


class _CausalSkippingMask:
    """transformers' SDPA mask function, returning None for `plain_causal` arguments."""

    def __init__(self, sdpa_mask):
        self.sdpa_mask = sdpa_mask

    def __call__(self, *args, **kwargs):
        if not args and plain_causal(**kwargs):
            return None
        return self.sdpa_mask(*args, **kwargs)


@contextmanager
def causal_sdpa_under_compile(enabled: bool = True) -> Iterator[None]:
    """While inside, SDPA models skip the plain causal mask as in eager mode (see the module
    docstring); transformers' mask function is put back on exit. `enabled` False: no change."""
    mapping = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    original = mapping.get("sdpa")
    if not enabled or original is None or isinstance(original, _CausalSkippingMask):
        yield
        return
    mapping["sdpa"] = _CausalSkippingMask(original)
    try:
        yield
    finally:
        mapping["sdpa"] = original
