"""tunegraph/ops/compiled_attention.py: compiled SDPA models skip the plain causal mask."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
)

from tunegraph.ops.compiled_attention import (
    _CausalSkippingMask,
    causal_sdpa_under_compile,
    plain_causal,
)
from tunegraph.ops.train import PadCollator


def test_plain_causal_only_for_what_is_causal_computes():
    base = {"kv_length": 7, "q_length": 7, "mask_function": causal_mask_function,
            "attention_mask": None, "allow_is_causal_skip": True}
    assert plain_causal(**base)
    assert plain_causal(**{**base, "q_length": None, "cache_position": torch.arange(7)})  # 5.17
    assert not plain_causal(**{**base, "attention_mask": torch.ones(1, 7, dtype=torch.bool)})
    packed = and_masks(causal_mask_function, lambda b, h, q, kv: q >= 0)
    assert not plain_causal(**{**base, "mask_function": packed})
    assert not plain_causal(**{**base, "local_size": 4})
    assert not plain_causal(**{**base, "q_length": 3})  # a cache: queries offset from keys
    assert not plain_causal(**{**base, "allow_is_causal_skip": False})


def test_the_context_wraps_and_restores_transformers_mask_function():
    original = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    with causal_sdpa_under_compile():
        wrapped = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        assert wrapped is not original
        with causal_sdpa_under_compile():  # nested: wrapped once
            assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is wrapped
        assert wrapped(batch_size=1, q_length=5, kv_length=5, attention_mask=None) is None
        mask = wrapped(batch_size=1, q_length=5, kv_length=5,
                       attention_mask=torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool))
        assert mask is not None and mask.shape[-2:] == (5, 5)
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original
    with causal_sdpa_under_compile(enabled=False):
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is original


def test_the_wrapper_decides_plain_causal_itself_and_passes_the_rest_on():
    """transformers 5.19 (installed here) skips the plain causal mask under compile by itself,
    so the compiled test below passes with or without the wrapper; 5.17 (the H200's) does not
    (checked by hand with 5.17: a [B, 1, T, T] mask without the context, none with it). This
    pins the wrapper's own part: no call into transformers for plain causal arguments, every
    other call passed on unchanged."""
    calls = []

    def inner(*args, **kwargs):
        calls.append((args, kwargs))
        return "mask"

    wrapped = _CausalSkippingMask(inner)
    plain = {"q_length": 6, "kv_length": 6, "attention_mask": None}
    assert wrapped(**plain) is None and calls == []
    padded = {**plain, "attention_mask": torch.ones(1, 6, dtype=torch.bool)}
    assert wrapped(**padded) == "mask" and calls == [((), padded)]
    assert wrapped(1, **plain) == "mask" and calls[-1] == ((1,), plain)  # positional: passed on


def _sdpa_calls(model, input_ids, **kwargs):
    """The SDPA calls of a compiled forward (dynamo's graph, inspected by a custom backend)."""
    calls = []

    def backend(gm, example_inputs):
        calls.extend(node for node in gm.graph.nodes
                     if node.target is torch._C._nn.scaled_dot_product_attention)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(input_ids=input_ids, **kwargs)
    return calls, out


def test_a_compiled_llama_runs_is_causal_attention_with_the_same_loss():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (2, 11))
    eager = model(input_ids=input_ids, labels=input_ids)
    with causal_sdpa_under_compile():
        calls, out = _sdpa_calls(model, input_ids, labels=input_ids)
    assert len(calls) == 2
    for node in calls:  # no mask tensor: flash attention's is_causal path
        assert node.kwargs.get("attn_mask") is None and node.kwargs.get("is_causal") is True
    torch.testing.assert_close(out.loss, eager.loss)
    torch.testing.assert_close(out.logits, eager.logits)

    padded = torch.ones(2, 11, dtype=torch.long)
    padded[1, 8:] = 0  # a padded row keeps its mask
    with causal_sdpa_under_compile():
        calls, _ = _sdpa_calls(model, input_ids, attention_mask=padded)
    assert all(node.kwargs.get("attn_mask") is not None for node in calls)
    torch._dynamo.reset()


def test_pad_collator_leaves_out_an_all_ones_mask_only_when_asked():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}]
    assert "attention_mask" not in PadCollator(0, mask_only_padded=True)(rows)
    assert "attention_mask" in PadCollator(0)(rows)  # evaluation reads it
    ragged = [*rows, {"input_ids": [7], "labels": [7]}]
    batch = PadCollator(0, mask_only_padded=True)(ragged)
    assert batch["attention_mask"].tolist()[2] == [1, 0, 0]
    assert "attention_mask" in PadCollator(0, pad_to=4, mask_only_padded=True)(rows)
