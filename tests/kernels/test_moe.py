"""MoE experts kernels (tunegraph/kernels/moe.py, moe_patch.py) against HF's own eager experts
modules and sparse-MoE blocks on the same weights, and against a float64 reference: outputs and
every gradient (x, routing weights, expert weights, router, LoRA A and B), fp32 and bf16, odd and
prime sizes (hidden 67, intermediate 37, 7 experts, top-3, 97 tokens), skewed routing that
leaves an expert empty and fills others past one row tile. CPU through Triton's interpreter at
small sizes; `gpu` tests at Qwen3-30B-A3B's expert shape (E=128, top-8, H=2048, I=768, 8192
tokens)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from tunegraph.kernels import KernelOptions, apply_kernels
from tunegraph.kernels.moe import moe_experts, moe_experts_reference
from tunegraph.kernels.moe_patch import apply_moe_kernels

# fp32: every product is an fp32 dot with fp32 accumulation (input_precision "ieee" on a GPU);
# measured 2e-7 to 6e-7 against float64. 2e-5 leaves room for the GPU's exp and summation
# orders, while a wrong index, weight or activation convention is off by 1e-1 or more.
FP32_TOL = 2e-5
# bf16: gate_up, silu(gate), act and each expert's output are rounded to bf16 (2^-9 relative
# each) as HF rounds them, and the inputs themselves are bf16. Measured 3e-3 to 5e-3 against
# float64 (HF's eager module: 4e-3 to 6e-3, its K-way sum being bf16). 2e-2 is four times
# that; a dropped LoRA term, routing weight or expert is off by 1e-1 or more.
BF16_TOL = 2e-2
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
HIDDEN, INTER, EXPERTS, TOP_K, TOKENS, RANK = 67, 37, 7, 3, 97, 5


@pytest.fixture(autouse=True)
def _interpreter_bf16(monkeypatch):
    """Two bf16 faults of Triton's interpreter (3.9 here), which keeps bf16 blocks as their
    uint16 bits: tl.dot calls np.matmul on those bits (products come out as ~1e10 garbage),
    and fp32 -> bf16 casts truncate (measured mean relative bias -2.8e-3; a GPU rounds to
    nearest even). On the CPU, bf16 dot operands are widened to fp32 first (what a GPU's bf16
    MMA computes: exact products, fp32 sums) and casts to bf16 round as torch does. Nothing
    changes on a GPU."""
    if torch.cuda.is_available():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_class = type(interpreter.interpreter_builder)
    create_dot, cast_impl = builder_class.create_dot, builder_class.cast_impl

    def widened_dot(self, a, b, d, *args):
        if a.dtype == tl.bfloat16:
            a, b = cast_impl(self, a, tl.float32), cast_impl(self, b, tl.float32)
        return create_dot(self, a, b, d, *args)

    def rounding_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16),
                                            tl.bfloat16)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(builder_class, "create_dot", widened_dot)
    monkeypatch.setattr(builder_class, "cast_impl", rounding_cast)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


def skewed_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator,
                   zipf: float = 1.2):
    """Zipf-like picks without replacement (popular experts fill several row tiles), the last
    expert never picked (its weight gradient must be zeros), positive weights."""
    probs = torch.arange(1, num_experts + 1, dtype=torch.float) ** -zipf
    probs[-1] = 0.0
    index = torch.multinomial(probs.expand(num_tokens, -1), top_k, generator=gen)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def expert_inputs(dtype, device, seed, *, tokens=TOKENS, hidden=HIDDEN, inter=INTER,
                  experts=EXPERTS, top_k=TOP_K, rank=RANK, uniform=False):
    gen = torch.Generator().manual_seed(seed)
    if uniform:
        index = torch.rand(tokens, experts, generator=gen).topk(top_k, -1).indices
        weights = torch.rand(tokens, top_k, generator=gen)
    else:
        index, weights = skewed_routing(tokens, experts, top_k, gen)

    device_gen = torch.Generator(device).manual_seed(seed)  # real sizes: 1.2 GB of weights

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=device_gen, device=device) * scale).to(dtype)

    return {"x": randn(tokens, hidden), "index": index.to(device),
            "weights": weights.to(dtype).to(device),
            "gate_up": randn(experts, 2 * inter, hidden, scale=hidden ** -0.5),
            "down": randn(experts, hidden, inter, scale=inter ** -0.5),
            "dy": randn(tokens, hidden),
            # LoRA A [E, r, in] contiguous; B [E, out, r] as PEFT stores it (a strided view of
            # lora_B.weight [out, r * E], rank-major)
            "gu_a": randn(experts, rank, hidden, scale=hidden ** -0.5),
            "gu_b": randn(2 * inter, rank, experts, scale=0.5).permute(2, 0, 1),
            "d_a": randn(experts, rank, inter, scale=inter ** -0.5),
            "d_b": randn(hidden, rank, experts, scale=0.5).permute(2, 0, 1)}


def run_experts(fn, t, *, lora=False, frozen=False, cast=None):
    """(output, {name: gradient}) of fn(x, index, weights, gate_up, down, [lora]) backward dy."""
    names = ["x", "weights"] + ([] if frozen else ["gate_up", "down"])
    names += ["gu_a", "gu_b", "d_a", "d_b"] if lora else []
    leaves = {k: v.detach().clone().to(cast or v.dtype) if torch.is_floating_point(v) else v
              for k, v in t.items()}
    for name in names:
        leaves[name].requires_grad_()
    kwargs = {}
    if lora:
        kwargs = {"gate_up_lora": (leaves["gu_a"], leaves["gu_b"], 2.0),
                  "down_lora": (leaves["d_a"], leaves["d_b"], 0.5)}
    y = fn(leaves["x"], leaves["index"], leaves["weights"], leaves["gate_up"], leaves["down"],
           **kwargs)
    y.backward(leaves["dy"])
    if frozen:
        assert leaves["gate_up"].grad is None and leaves["down"].grad is None
    return y, {name: leaves[name].grad for name in names}


def hf_function(t, implementation="eager"):
    """HF's Qwen3MoeExperts (eager: its per-expert loop; or grouped_mm) as a function of
    (x, index, weights, gate_up, down)."""
    config = transformers.Qwen3MoeConfig(hidden_size=t["x"].shape[1],
                                         moe_intermediate_size=t["down"].shape[2],
                                         num_experts=t["gate_up"].shape[0])
    config._experts_implementation = implementation
    with torch.device("meta"):  # its weights are the ones passed in
        module = Qwen3MoeExperts(config)

    def forward(x, index, weights, gate_up, down):
        return torch.func.functional_call(module, {"gate_up_proj": gate_up, "down_proj": down},
                                          (x, index, weights))
    return forward


def check_all(got, want, tol, label, hf=None):
    (y, grads), (y_ref, grads_ref) = got, want
    assert rel_err(y, y_ref) < tol, f"{label}: output {rel_err(y, y_ref):.2e}"
    for name, grad in grads.items():
        err = rel_err(grad, grads_ref[name])
        assert err < tol, f"{label}: d {name} {err:.2e}"
    if hf is not None:  # the same check against HF's module in the test dtype
        y_hf, grads_hf = hf
        assert rel_err(y, y_hf) < tol
        for name, grad in grads_hf.items():
            assert rel_err(grads[name], grad) < tol, f"{label}: d {name} vs HF"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_match_hf_eager_and_float64(dtype, device):
    t = expert_inputs(dtype, device, seed=11 if dtype == torch.float32 else 12)
    got = run_experts(moe_experts, t)
    want = run_experts(moe_experts_reference, t, cast=torch.float64)
    # The reference is HF's eager experts module (float64, same weights) to rounding.
    hf64 = run_experts(hf_function(t), t, cast=torch.float64)
    check_all(hf64, want, 1e-12, "reference vs HF float64")
    check_all(got, want, TOL[dtype], str(dtype), hf=run_experts(hf_function(t), t))
    assert got[1]["gate_up"][EXPERTS - 1].abs().max() == 0  # the expert no token picked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_experts_with_lora_match_float64(dtype, device):
    """Frozen experts, rank-5 LoRA on both weights (PEFT's strided B layout): the output and
    dx, d weights, dA, dB of both adapters; the frozen weights get no gradient."""
    t = expert_inputs(dtype, device, seed=21 if dtype == torch.float32 else 22)
    got = run_experts(moe_experts, t, lora=True, frozen=True)
    want = run_experts(moe_experts_reference, t, lora=True, frozen=True, cast=torch.float64)
    check_all(got, want, TOL[dtype], f"lora {dtype}")


@pytest.mark.parametrize("layout", ["contiguous", "rank_major", "fp32_factors"])
def test_lora_b_layouts_and_dtypes(layout, device):
    """The kernels read B from a rank-major copy ([E, r, out] memory): B given [E, out, r]
    contiguous (copied), already rank-major (read in place, no copy), or fp32 factors on bf16
    experts (copied and cast): all equal the float64 reference, with dB in B's own layout."""
    dtype = torch.bfloat16 if layout == "fp32_factors" else torch.float32
    t = expert_inputs(dtype, device, seed=51)
    for name in ("gu_b", "d_b"):
        if layout == "contiguous":
            t[name] = t[name].contiguous()
        elif layout == "rank_major":
            t[name] = t[name].transpose(1, 2).contiguous().transpose(1, 2)
        else:
            t[name] = t[name].float()
    for name in ("gu_a", "d_a") if layout == "fp32_factors" else ():
        t[name] = t[name].float()
    got = run_experts(moe_experts, t, lora=True, frozen=True)
    want = run_experts(moe_experts_reference, t, lora=True, frozen=True, cast=torch.float64)
    check_all(got, want, TOL[dtype], f"lora B {layout}")
    for name in ("gu_a", "gu_b", "d_a", "d_b"):
        assert got[1][name].dtype == t[name].dtype and got[1][name].shape == t[name].shape


def test_lora_of_scale_zero_adds_nothing(device):
    """A zero LoRA scale (the epilogues divide by it) is left out: the output is the frozen
    experts' alone and the factors' gradients are zeros."""
    t = expert_inputs(torch.float32, device, seed=52)
    leaves = {k: t[k].clone().requires_grad_() for k in ("gu_a", "gu_b", "d_a", "d_b")}
    y = moe_experts(t["x"], t["index"], t["weights"], t["gate_up"], t["down"],
                    gate_up_lora=(leaves["gu_a"], leaves["gu_b"], 0.0),
                    down_lora=(leaves["d_a"], leaves["d_b"], 0))
    y.backward(t["dy"])
    y_plain = moe_experts_reference(t["x"], t["index"], t["weights"], t["gate_up"], t["down"])
    assert rel_err(y, y_plain) < FP32_TOL
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().max() == 0, name


def test_top1_uniform_routing_trainable_experts_with_lora(device):
    """Top-1 routing (one pick a token), uniform, trainable experts and LoRA together; hidden
    and intermediate sizes that are multiples of the K step, so the K loops run unmasked (the
    path every real model size takes on a GPU)."""
    t = expert_inputs(torch.float32, device, seed=31, uniform=True, tokens=37, top_k=1,
                      hidden=128, inter=64)
    check_all(run_experts(moe_experts, t, lora=True),
              run_experts(moe_experts_reference, t, lora=True, cast=torch.float64),
              FP32_TOL, "top-1, lora + trainable")


# model_type -> (config class, model class, config). Sizes odd; DeepSeek-V3 and GLM-4-MoE need
# experts divisible into groups: 9 experts in 3 groups, top-2 groups.
COMMON = {"vocab_size": 32, "hidden_size": HIDDEN, "num_hidden_layers": 1,
          "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16,
          "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
GROUPED = {"moe_intermediate_size": INTER, "intermediate_size": 45, "n_routed_experts": 9,
           "num_experts_per_tok": TOP_K, "n_group": 3, "topk_group": 2, "n_shared_experts": 1,
           "first_k_dense_replace": 0, "routed_scaling_factor": 2.5, "norm_topk_prob": True}
ARCHS = {
    # softmax -> top-k, renormalised (OLMoE and Qwen2-MoE below: not, norm_topk_prob false)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"moe_intermediate_size": INTER, "num_experts": EXPERTS,
                   "num_experts_per_tok": TOP_K, "norm_topk_prob": True}),
    # fp32 routing weights reach the experts
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"intermediate_size": INTER, "num_local_experts": EXPERTS,
                 "num_experts_per_tok": TOP_K}),
    # OLMoE's head_dim is hidden / heads (its q/k norms span all heads): an even hidden size
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {"intermediate_size": INTER, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
               "hidden_size": 66, "head_dim": 66, "norm_topk_prob": False}),
    # a shared expert beside the routed ones, times sigmoid(its gate)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"moe_intermediate_size": INTER, "shared_expert_intermediate_size": 29,
                   "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": False}),
    # sigmoid + correction bias -> top groups -> top-k, renormalised, scaled; shared experts
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {**GROUPED, "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 8, "v_head_dim": 8, "head_dim": 8}),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", GROUPED),
}


def tiny_moe_model(arch: str, dtype, device, seed: int) -> torch.nn.Module:
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # weights of unit-scale outputs (HF's 0.02 init makes them ~1e-3)
        for name, param in model.named_parameters():
            if "norm" not in name and param.dim() >= 2:
                param.normal_(0, param.shape[-1] ** -0.5)
        for module in model.modules():  # a non-zero correction bias changes which experts win
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.3)
    return model.to(device=device, dtype=dtype)


def model_step(model, input_ids):
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_model_matches_hf(arch, device):
    """fp32, one decoder layer, loss.backward(): logits and every parameter's gradient (the
    router's, the shared experts' and the experts' weights) equal HF's eager experts'."""
    model = tiny_moe_model(arch, torch.float32, device, seed=len(arch))
    reference = copy.deepcopy(model)
    assert apply_moe_kernels(model, "use_scattermoe") == 1
    input_ids = torch.randint(3, 32, (1, 29), generator=torch.Generator().manual_seed(7)).to(device)
    logits, grads = model_step(model, input_ids)
    logits_ref, grads_ref = model_step(reference, input_ids)
    assert rel_err(logits, logits_ref) < FP32_TOL
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < FP32_TOL, name


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])  # qwen3_moe bf16: the PEFT test
def test_patched_block_bf16_matches_hf(arch, device):
    """bf16 sparse-MoE block (router, experts, shared experts): HF's router picks the same
    experts for both (the same code on the same inputs), so the two differ by rounding only."""
    model = tiny_moe_model(arch, torch.bfloat16, device, seed=3)
    reference = copy.deepcopy(model)
    apply_moe_kernels(model, "use_scattermoe")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 37, model.config.hidden_size, generator=gen).to(device=device, dtype=torch.bfloat16)
    dy = torch.randn(1, 37, model.config.hidden_size, generator=gen).to(device=device, dtype=torch.bfloat16)
    results = []
    for m in (model, reference):
        block = m.model.layers[0].mlp
        leaf = x.clone().requires_grad_()
        y = block(leaf)
        y.backward(dy)
        results.append((y, leaf.grad, {n: p.grad for n, p in block.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert rel_err(y, y_ref) < BF16_TOL and rel_err(dx, dx_ref) < BF16_TOL
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < BF16_TOL, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peft_target_parameters_lora_is_fused(dtype, device, monkeypatch):
    """PEFT LoRA on mlp.experts.gate_up_proj and down_proj (Axolotl's lora_target_parameters):
    the patched experts read PEFT's A and B and fuse them (no folded weight); the loss and the
    adapters' gradients equal PEFT on HF's eager experts; the frozen experts get none."""
    peft = pytest.importorskip("peft")
    import tunegraph.kernels.moe_patch as moe_patch

    fused = []

    def spy(*args, gate_up_lora=None, down_lora=None):
        fused.append(gate_up_lora is not None and down_lora is not None)
        return moe_experts(*args, gate_up_lora=gate_up_lora, down_lora=down_lora)

    monkeypatch.setattr(moe_patch, "moe_experts", spy)
    base = tiny_moe_model("qwen3_moe", dtype, device, seed=5)
    models = []
    for patch in (True, False):
        model = copy.deepcopy(base)
        if patch:
            apply_kernels(model, KernelOptions(moe=True, recipe_keys={"moe": "use_scattermoe"}))
        config = peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=[],
                                 target_parameters=["mlp.experts.gate_up_proj",
                                                    "mlp.experts.down_proj"],
                                 init_lora_weights=False)  # B random: the LoRA path is live
        torch.manual_seed(9)
        models.append(peft.get_peft_model(model, config))
    input_ids = torch.randint(3, 32, (1, 29), generator=torch.Generator().manual_seed(4)).to(device)
    (logits, grads), (logits_ref, grads_ref) = (model_step(m, input_ids) for m in models)
    assert fused == [True]
    assert rel_err(logits, logits_ref) < TOL[dtype]
    assert grads.keys() == grads_ref.keys()
    assert sum("lora_A" in n for n in grads) == 2
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in grads)  # frozen experts
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < TOL[dtype], name


def test_recipe_lora_target_parameters_reach_peft(make_recipe, device):
    """Axolotl's lora_target_parameters (with use_kernels + use_scattermoe) gives PEFT adapters
    on the experts' 3D weights, which the patched experts then fuse (test above)."""
    from tunegraph.ops.train import add_lora

    recipe = make_recipe(datasets=[{"path": "d.jsonl", "type": "alpaca"}], adapter="lora",
                         lora_r=4, use_kernels=True, use_scattermoe=True,
                         lora_target_parameters=["mlp.experts.gate_up_proj",
                                                 "mlp.experts.down_proj"])
    model = tiny_moe_model("qwen3_moe", torch.float32, device, seed=6)
    apply_kernels(model, recipe.kernel_options())
    trainable = [n for n, p in add_lora(recipe, model).named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(".mlp.experts." in n and "lora_" in n for n in trainable)


def test_unsupported_models_are_errors_naming_the_key(device):
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)
    llama = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="use_scattermoe: model_type 'llama' has no MoE"):
        apply_kernels(llama, KernelOptions(moe=True, recipe_keys={"moe": "use_scattermoe"}))
    model = tiny_moe_model("qwen3_moe", torch.float32, device, seed=1)
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="kernels.moe: Qwen3MoeExperts .* activation GELU"):
        apply_kernels(model, KernelOptions(moe=True))


def test_only_the_patched_model_changes(device):
    model = tiny_moe_model("qwen3_moe", torch.float32, device, seed=2)
    other = copy.deepcopy(model)
    apply_moe_kernels(model)
    patched, untouched = model.model.layers[0].mlp.experts, other.model.layers[0].mlp.experts
    assert type(patched).__name__ == type(untouched).__name__ == "Qwen3MoeExperts"
    assert type(patched) is not type(untouched) and isinstance(patched, type(untouched))
    apply_moe_kernels(model)  # twice: the same class, not a subclass of a subclass
    assert type(model.model.layers[0].mlp.experts) is type(patched)


@pytest.mark.gpu
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "zipf"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_real_size_on_gpu(uniform, lora):
    """Qwen3-30B-A3B's expert layer, bf16, 8192 tokens: against the reference in fp32 on the
    same bf16 values, and (full fine-tune) HF's grouped_mm experts in bf16."""
    t = expert_inputs(torch.bfloat16, "cuda", seed=41 + 2 * uniform + lora, tokens=8192,
                      hidden=2048, inter=768, experts=128, top_k=8, rank=16, uniform=uniform)
    got = run_experts(moe_experts, t, lora=lora, frozen=lora)
    want = run_experts(moe_experts_reference, t, lora=lora, frozen=lora, cast=torch.float32)
    check_all(got, want, BF16_TOL, f"gpu lora={lora}")
    if not lora:
        check_all(got, run_experts(hf_function(t, "grouped_mm"), t), BF16_TOL,
                  "gpu vs HF grouped_mm")
