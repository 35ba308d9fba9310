"""apply_kernels (tunegraph/kernels/patch.py) on tiny random HF models of every supported
model_type: with the kernels swapped in, the loss, the logits and every parameter's gradient
equal HF's own modules'; unsupported models and activations are errors naming the recipe key;
only the patched model changes."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import transformers

from tunegraph.kernels import KernelOptions, apply_kernels

# fp32 through two decoder layers, forward and backward: the kernels and HF's modules differ by
# summation order and fp32 rounding only. Measured up to ~1e-6 relative on the weight
# gradients (largest on the norms' weights, whose gradients sum over all tokens); a wrong
# convention (Llama vs Gemma scaling, GeLU vs SiLU, a rope sign) is off by 1e-2 or more.
FP32_TOL = 2e-5
ALL = KernelOptions(rms_norm=True, glu=True, rope=True)
SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# model_type -> (config class, model class, extra config, modules patched per op for 2 layers).
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {"rms_norm": 5, "glu": 2, "rope": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {"rms_norm": 5, "glu": 2, "rope": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {"rms_norm": 5, "glu": 2, "rope": 2}),
    # + q_norm and k_norm per layer
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8},
              {"rms_norm": 9, "glu": 2, "rope": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8},
              {"rms_norm": 5, "glu": 2, "rope": 2}),
    # 4 norms per layer (pre/post attention and feed-forward)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8},
               {"rms_norm": 9, "glu": 2, "rope": 2}),
    # 4 norms and q_norm/k_norm per layer; one sliding-window and one global layer
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 8, "sliding_window": 4,
                     "layer_types": ["sliding_attention", "full_attention"]},
                    {"rms_norm": 13, "glu": 2, "rope": 2}),
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_model(model_type: str, device: str, **overrides) -> torch.nn.Module:
    config_name, model_name, extra, _ = MODELS[model_type]
    config = getattr(transformers, config_name)(**{**SMALL, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(device)
    for name, param in model.named_parameters():  # Gemma's norm weights start at 0: make them
        if "norm" in name:  # non-trivial, so the 1 + w convention is exercised
            param.data.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.3)
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss, out.logits, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_patched_model_matches_hf(model_type, device):
    hf = tiny_model(model_type, device)
    patched = copy.deepcopy(hf)
    assert apply_kernels(patched, ALL) == MODELS[model_type][3]
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    want, got = loss_and_grads(hf, ids.to(device)), loss_and_grads(patched, ids.to(device))
    assert rel_err(got[0], want[0]) < FP32_TOL
    assert rel_err(got[1], want[1]) < FP32_TOL
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) < FP32_TOL, name


def test_only_the_patched_model_changes(device):
    hf = tiny_model("llama", device)
    patched = copy.deepcopy(hf)
    apply_kernels(patched, ALL)
    layer, hf_layer = patched.model.layers[0], hf.model.layers[0]
    for module, hf_module in zip((layer.self_attn, layer.mlp, layer.input_layernorm),
                                 (hf_layer.self_attn, hf_layer.mlp, hf_layer.input_layernorm),
                                 strict=True):
        assert type(module) is not type(hf_module) and isinstance(module, type(hf_module))
        assert type(module).__name__ == type(hf_module).__name__
        assert type(hf_module).__module__.startswith("transformers.")
    # HF's module function is untouched: other models of the class run HF's rope.
    from transformers.models.llama import modeling_llama

    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__


def test_unsupported_model_type_is_an_error_naming_the_key():
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="phi3")
    options = KernelOptions(rope=True, recipe_keys={"rope": "liger_rope"})
    with pytest.raises(ValueError, match=r"liger_rope: model_type 'phi3' has no tunegraph kernels"):
        apply_kernels(model, options)


def test_activation_without_a_fused_kernel_is_an_error(device):
    model = tiny_model("llama", device, hidden_act="relu")
    with pytest.raises(ValueError, match=r"kernels.glu: LlamaMLP's activation \['ReLU'\]"):
        apply_kernels(model, KernelOptions(glu=True))


def test_fused_linear_cross_entropy_is_delegated(monkeypatch, device):
    """kernels.fused_linear_cross_entropy calls that module's apply_fused_linear_cross_entropy
    (another module's kernel, imported only when asked for)."""
    calls = []
    fake = types.ModuleType("tunegraph.kernels.fused_linear_cross_entropy")
    fake.apply_fused_linear_cross_entropy = calls.append
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model = tiny_model("llama", device)
    assert apply_kernels(model, KernelOptions(fused_linear_cross_entropy=True)) == {
        "fused_linear_cross_entropy": 1}
    assert calls == [model]


def test_nothing_on_patches_nothing(device):
    model = tiny_model("llama", device)
    assert apply_kernels(model, KernelOptions()) == {}
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in model.modules())


def test_patching_twice_is_patching_once(device):
    model = tiny_model("llama", device)
    apply_kernels(model, ALL)
    classes = [type(m) for m in model.modules()]
    apply_kernels(model, ALL)
    assert [type(m) for m in model.modules()] == classes


def test_data_parallel_replicas_use_their_own_weights(device):
    """nn.DataParallel builds replicas with _replicate_for_data_parallel and gives each its
    device's parameters: the patched forward must read the replica's, not the original's."""
    from tunegraph.kernels.rms_norm import rms_norm_reference

    model = tiny_model("llama", device)
    apply_kernels(model, ALL)
    norm = model.model.layers[0].input_layernorm
    replica = norm._replicate_for_data_parallel()
    replica._parameters["weight"] = torch.full_like(norm.weight, 2.0)
    x = torch.randn(3, SMALL["hidden_size"], device=device)
    want = rms_norm_reference(x, replica._parameters["weight"], norm.variance_epsilon)
    assert rel_err(replica(x), want) < FP32_TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_norms_feeding_linear_layers_emit_the_autocast_dtype(model_type, device):
    """Under bf16 autocast over fp32 weights, the pre-norms and the final norm store bf16 (the
    bits autocast's cast before each linear layer gives); norms whose output meets the residual
    (Gemma 2's post-norms) or RoPE (Qwen 3's q_norm/k_norm) keep HF's dtype. Loss and gradients stay
    within bf16 rounding of HF's under the same autocast."""
    hf = tiny_model(model_type, device)
    patched = copy.deepcopy(hf)
    apply_kernels(patched, KernelOptions(rms_norm=True))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    outputs: dict[str, dict[str, torch.Tensor]] = {"hf": {}, "patched": {}}
    for key, model in (("hf", hf), ("patched", patched)):
        for name, module in model.named_modules():
            if "norm" in name.rsplit(".", 1)[-1]:
                module.register_forward_hook(
                    lambda _m, _i, out, name=name, key=key: outputs[key].__setitem__(name, out))
    with torch.autocast(device, dtype=torch.bfloat16):
        want, got = loss_and_grads(hf, ids.to(device)), loss_and_grads(patched, ids.to(device))
    linear_norms = {"llama": ("input_layernorm", "post_attention_layernorm", "norm"),
                    "qwen3": ("input_layernorm", "post_attention_layernorm", "norm"),
                    "gemma2": ("input_layernorm", "pre_feedforward_layernorm", "norm")}[model_type]
    kept = {"llama": set(), "qwen3": {"q_norm", "k_norm"},
            "gemma2": {"post_attention_layernorm", "post_feedforward_layernorm"}}[model_type]
    seen = set()
    for name, out in outputs["patched"].items():
        short = name.rsplit(".", 1)[-1]
        seen.add(short)
        if short in linear_norms:  # HF: the fp32 residual in, fp32 out
            assert (outputs["hf"][name].dtype, out.dtype) == (torch.float32, torch.bfloat16), name
        else:  # HF's dtype, whatever its input's was (a bf16 projection's, for the post-norms)
            assert out.dtype == outputs["hf"][name].dtype, name
    assert seen == set(linear_norms) | kept
    # The first norm reads the same embedding in both: its bf16 output is HF's, rounded (within
    # one bf16 step: Triton's interpreter truncates to bf16 where a GPU rounds to nearest).
    first = "model.layers.0.input_layernorm"
    step = 2**-8 if device == "cuda" else 2**-7
    torch.testing.assert_close(outputs["patched"][first],
                               outputs["hf"][first].to(torch.bfloat16), rtol=step, atol=1e-6)
    assert rel_err(got[0], want[0]) < 1e-2
    for name, grad in want[2].items():
        assert rel_err(got[2][name], grad) < 5e-2, name
