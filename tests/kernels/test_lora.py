"""LoRA kernels (tunegraph/kernels/lora.py, lora_patch.py) against PEFT's own LoraLayer.

Ops: the LoRA MLP, q/k/v from one input and a single LoRA linear, each on PEFT-wrapped
nn.Linear modules, compared with PEFT's forward/backward on the same weights: the output and
every gradient (x, each lora_A, each lora_B), fp32 and bf16, odd and prime sizes, per-projection
ranks, base biases, dropout (same seed: PEFT's masks), rslora. Models: tiny llama, qwen2 (q/k/v
bias), qwen3 (q/k norms) and gemma (GeGLU) wrapped by PEFT, patched vs unpatched, give
the same loss and LoRA gradients (dropout on: the same masks); with gradient checkpointing and
with the RMSNorm/GLU/RoPE kernels on too; merging, disabling the adapter and saving are
unaffected. Every unsupported setup raises naming its recipe key.
Golden: a tiny LoRA training run with the three LoRA keys on follows the kernels-off losses in
tests/golden/lora_kernels_llama_tiny.json. On CPU through Triton's interpreter; `gpu` tests run
K3's real shapes (H 4096, I 14336, 8192 tokens). Regenerate the golden (say why in the commit):

    TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/kernels/test_lora.py -k golden
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from torch import nn
from train_support import COMMON, RUNS, TINY, UPDATE_GOLDEN, make, prepare_training

from tunegraph.kernels.lora import (
    LoRAWeights,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_projections,
)
from tunegraph.kernels.lora_patch import _weights, apply_lora_kernels

# fp32: the kernels sum the same products as PEFT in another order (one accumulation instead of
# PEFT's separate base, LoRA and add); measured 1e-7 to 3e-7 against float64 on every output and
# gradient. A wrong term (a missing scaling, a transposed B, a dropped dropout mask) is off by
# 1e-1 or more.
FP32_TOL = 1e-5
# bf16: both PEFT and the kernels round every product and the activation to bf16 (2^-8 relative
# each); the MLP's dX passes through ~6 such roundings (gate/up outputs, act, h, dh, dg/du), the
# projections' through ~3. Measured against float64: kernels 2e-3 to 1.7e-2, PEFT in bf16 alike.
# Checked two ways: under 8 x 2^-8 absolutely, and no worse than 1.5x PEFT's own bf16 error (+ 2^-8
# for the cases where PEFT happens to land close).
BF16_TOL = 8 * 2**-8
TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL}
# The interpreter's exp overflows (to inf, harmlessly: sigmoid -> 0) for large negative gates;
# PEFT warns that lora_bias makes merging impossible (the lora_bias error case wants that config).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm()).item()


# ------------------------------------------------------------------ PEFT-wrapped test modules

class MLP(nn.Module):
    """HF's gated MLP (LlamaMLP's forward): down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, gelu: bool, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.gelu = gelu

    def forward(self, x):
        act = nn.functional.gelu(self.gate_proj(x), approximate="tanh") if self.gelu else \
            nn.functional.silu(self.gate_proj(x))
        return self.down_proj(act * self.up_proj(x))


class QKV(nn.Module):
    def __init__(self, hidden: int, outs: tuple[int, ...], bias: bool):
        super().__init__()
        self.projections = ["q_proj", "k_proj", "v_proj"][:len(outs)]
        for name, out in zip(self.projections, outs, strict=True):
            setattr(self, name, nn.Linear(hidden, out, bias=bias))

    def forward(self, x):
        outputs = tuple(getattr(self, name)(x) for name in self.projections)
        return outputs if len(outputs) > 1 else outputs[0]


def with_lora(module: nn.Module, targets: list[str], ranks: dict[str, int], *, seed: int,
              dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """PEFT LoRA on `targets`, B random (init_lora_weights=False) so every gradient is non-zero."""
    torch.manual_seed(seed)
    first = ranks[targets[0]]
    config = LoraConfig(r=first, lora_alpha=2 * first + 1, target_modules=targets,
                        lora_dropout=dropout, use_rslora=rslora, init_lora_weights=False,
                        rank_pattern={k: v for k, v in ranks.items() if v != first})
    module = inject_adapter_in_model(config, module)
    with torch.no_grad():  # biases and B large enough to matter next to the base
        for name, p in module.named_parameters():
            if name.endswith("bias") or "lora_B" in name:
                p.normal_(0, 0.3)
    return module


def lora_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if "lora_" in n]


def run(module: nn.Module, fn, x: torch.Tensor, grads_out: tuple[torch.Tensor, ...]):
    """Outputs, then x's gradient, then every LoRA parameter's, as a name -> tensor dict."""
    for _, p in lora_params(module):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    outputs = fn(module, x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grads_out)
    result = {f"out{i}": o for i, o in enumerate(outputs)} | {"x": x.grad}
    return result | {n: p.grad for n, p in lora_params(module)}


def ours_mlp(module, x):
    layers = [module.gate_proj, module.up_proj, module.down_proj]
    return lora_mlp(x, *[_weights(layer) for layer in layers], gelu=module.gelu)


def ours_qkv(module, x):
    return lora_projections(x, [_weights(layer) for layer in (module.q_proj, module.k_proj,
                                                              module.v_proj)])


def ours_linear(module, x):
    return lora_linear(x, _weights(module.q_proj))


def peft(module, x):
    return module(x)


def compare(make_module, ours, x, grads_out, dtype):
    """Ours vs PEFT in `dtype`, both against PEFT in float64, same weights."""
    module = make_module().to(dtype)
    oracle = copy.deepcopy(module).double()
    got = run(module, ours, x.to(dtype), tuple(g.to(dtype) for g in grads_out))
    assert torch.is_tensor(got["x"])
    peer = run(module, peft, x.to(dtype), tuple(g.to(dtype) for g in grads_out))
    want = run(oracle, peft, x.double(), tuple(g.double() for g in grads_out))
    assert got.keys() == want.keys() and len(got) >= 3
    for name in want:
        assert got[name].dtype == dtype, name
        err = rel_err(got[name], want[name])
        assert err < TOL[dtype], f"{name}: {err:.2e} vs float64"
        if dtype != torch.float32:
            assert err < 1.5 * rel_err(peer[name], want[name]) + 2**-8, (
                f"{name}: {err:.2e} vs float64, PEFT bf16 {rel_err(peer[name], want[name]):.2e}")


def inputs(shape: tuple[int, ...], hidden: int, outs: tuple[int, ...], seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, hidden, generator=gen)
    return x, tuple(torch.randn(*shape, o, generator=gen) for o in outs)


# (token shape, hidden, intermediate, (r_gate, r_up, r_down)): one token at tl.dot's minimum
# sizes; primes and per-projection ranks that are not powers of two; 134 tokens (three 64-row
# blocks, the last partial) and I = 131 (two column blocks, the last partial).
MLP_SHAPES = [((1,), 16, 16, (16, 16, 16)), ((3, 7), 29, 67, (5, 7, 3)),
              ((2, 67), 32, 131, (16, 16, 16))]


@pytest.mark.parametrize("gelu", [False, True], ids=["swiglu", "geglu"])
@DTYPES
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_mlp_matches_peft(shape, dtype, gelu):
    tokens, hidden, inter, (rg, ru, rd) = shape
    seed = hidden + inter + gelu
    bias = inter == 67  # a base bias on every projection in one case

    def make_module():
        return with_lora(MLP(hidden, inter, gelu, bias), ["gate_proj", "up_proj", "down_proj"],
                         {"gate_proj": rg, "up_proj": ru, "down_proj": rd}, seed=seed,
                         rslora=inter == 131)
    x, grads_out = inputs(tokens, hidden, (hidden,), seed)
    compare(make_module, ours_mlp, x, grads_out, dtype)


# (token shape, hidden, (q, k, v) outputs, ranks, base bias): GQA-like widths, a Qwen2-like bias.
QKV_SHAPES = [((1,), 16, (16, 16, 16), (16, 16, 16), False),
              ((3, 7), 29, (32, 12, 12), (8, 4, 5), True),
              ((130,), 64, (64, 16, 16), (16, 16, 16), False)]


@DTYPES
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qkv_matches_peft(shape, dtype):
    tokens, hidden, outs, ranks, bias = shape
    seed = hidden + sum(outs)
    names = ["q_proj", "k_proj", "v_proj"]

    def make_module():
        return with_lora(QKV(hidden, outs, bias), names, dict(zip(names, ranks, strict=True)),
                         seed=seed)
    x, grads_out = inputs(tokens, hidden, outs, seed)
    compare(make_module, ours_qkv, x, grads_out, dtype)


@DTYPES
@pytest.mark.parametrize("shape", [((1,), 16, 16, 16), ((5, 3), 37, 23, 7), ((97,), 64, 131, 16)],
                         ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_linear_matches_peft(shape, dtype):
    tokens, hidden, out, rank = shape
    seed = hidden * out

    def make_module():
        return with_lora(QKV(hidden, (out,), bias=True), ["q_proj"], {"q_proj": rank},
                         seed=seed, rslora=True)
    x, grads_out = inputs(tokens, hidden, (out,), seed)
    compare(make_module, ours_linear, x, grads_out, dtype)


@pytest.mark.parametrize("op", ["mlp", "qkv"])
def test_dropout_draws_peft_masks(op):
    """lora_dropout > 0: the kernels draw PEFT's masks in PEFT's order (gate, up, down; q, k, v),
    so the same seed gives PEFT's outputs and gradients (fp32)."""
    if op == "mlp":
        names, module = ["gate_proj", "up_proj", "down_proj"], MLP(29, 67, False)
        ours, outs = ours_mlp, (29,)
    else:
        names, module = ["q_proj", "k_proj", "v_proj"], QKV(29, (32, 12, 12), True)
        ours, outs = ours_qkv, (32, 12, 12)
    module = with_lora(module, names, dict.fromkeys(names, 6), seed=3, dropout=0.3)
    x, grads_out = inputs((2, 11), 29, outs, seed=4)
    torch.manual_seed(11)
    got = run(module, ours, x, grads_out)
    torch.manual_seed(11)
    want = run(module, peft, x, grads_out)
    torch.manual_seed(12)
    other = run(module, peft, x, grads_out)
    for name in want:
        assert rel_err(got[name], want[name]) < FP32_TOL, name
    assert rel_err(other["out0"], want["out0"]) > 1e-3, "another seed should draw other masks"
    module.eval()  # dropout off: PEFT's nn.Dropout is the identity, so is ours
    torch.manual_seed(13)
    evaluated = run(module, ours, x, grads_out)
    want = run(module, peft, x, grads_out)
    assert rel_err(evaluated["out0"], want["out0"]) < FP32_TOL


@pytest.mark.parametrize("op", ["mlp", "qkv"])
def test_dropout_under_autocast_draws_peft_masks(op):
    """bf16 autocast over fp32 weights and adapters (tunegraph's training setup): PEFT drops out
    x and h cast to lora_A's dtype (fp32); the kernels draw from tensors of that dtype too, so
    the masks are PEFT's (a wrong mask is off by ~1, bf16 rounding by ~1e-2)."""
    names = ["gate_proj", "up_proj", "down_proj"] if op == "mlp" else ["q_proj", "k_proj", "v_proj"]
    module = MLP(29, 67, False) if op == "mlp" else QKV(29, (32, 12, 12), True)
    module = with_lora(module, names, dict.fromkeys(names, 6), seed=3, dropout=0.3)
    x, grads_out = inputs((2, 11), 29, (29,) if op == "mlp" else (32, 12, 12), seed=4)

    def autocast_run(fn, seed):
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(module, fn, x, tuple(g.bfloat16() for g in grads_out))
    got = autocast_run(ours_mlp if op == "mlp" else ours_qkv, 11)
    want = autocast_run(peft, 11)
    other = autocast_run(peft, 12)
    for name in want:
        assert rel_err(got[name], want[name]) < BF16_TOL, name
        assert rel_err(other[name], want[name]) > 0.1, name


def test_mlp_reference_takes_the_down_mask():
    """lora_mlp_reference with an explicit keep mask equals the kernel with the mask it drew."""
    module = with_lora(MLP(29, 67, True), ["gate_proj", "up_proj", "down_proj"],
                       dict.fromkeys(["gate_proj", "up_proj", "down_proj"], 4), seed=5)
    module.down_proj.lora_dropout["default"] = nn.Dropout(0.5)
    x = torch.randn(13, 29)
    gate, up, down = (_weights(layer) for layer in (module.gate_proj, module.up_proj,
                                                    module.down_proj))
    torch.manual_seed(0)
    got = lora_mlp(x, gate, up, down, gelu=True)
    torch.manual_seed(0)  # the mask native_dropout draws for h
    keep = torch.ops.aten.native_dropout(torch.empty(13, 67), 0.5, True)[1]
    want = lora_mlp_reference(x, gate, up, down, gelu=True, down_keep=keep)
    assert rel_err(got, want) < FP32_TOL


def test_second_backward_through_the_mlp_fails_loudly():
    """The MLP backward writes d gate / d up over its saved base outputs: retain_graph and a
    second backward must raise, not read gradients as activations."""
    module = with_lora(MLP(16, 32, False), ["gate_proj", "up_proj", "down_proj"],
                       dict.fromkeys(["gate_proj", "up_proj", "down_proj"], 4), seed=6)
    x = torch.randn(5, 16, requires_grad=True)
    y = ours_mlp(module, x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ------------------------------------------------------------------ whole models

@dataclass
class Options:
    """What apply_lora_kernels reads (the recipe's KernelsConfig has the same fields)."""

    lora_mlp: bool = False
    lora_qkv: bool = False
    lora_o: bool = False
    recipe_keys: dict[str, str] = field(default_factory=lambda: {
        "lora_mlp": "lora_mlp_kernel", "lora_qkv": "lora_qkv_kernel", "lora_o": "lora_o_kernel"})


ALL_ON = Options(lora_mlp=True, lora_qkv=True, lora_o=True)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiny configs, one layer (the interpreter's time goes per layer): odd intermediate size, GQA;
# qwen2 has q/k/v biases, qwen3 q_norm/k_norm, gemma GeGLU and a 1 + w norm.
MODELS: dict[str, dict[str, Any]] = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8},
}


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=44,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=97,
                                  max_position_embeddings=64, **MODELS.get(model_type, {}))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def peft_model(model: nn.Module, targets=ALL_LINEAR, dropout: float = 0.1, **config: Any):
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=targets, init_lora_weights=False,
                                            **config))


def loss_and_grads(model: nn.Module, seed: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 11), generator=gen)
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the LoRA dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def assert_same_training(patched: nn.Module, plain: nn.Module, tol: float = FP32_TOL) -> None:
    loss, grads = loss_and_grads(patched)
    want_loss, want = loss_and_grads(plain)
    assert loss == pytest.approx(want_loss, rel=tol)
    assert grads.keys() == want.keys() and any("lora_A" in n for n in grads)
    for name, grad in want.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grads[name], grad) < tol, name


def kernel_calls(model: nn.Module, monkeypatch) -> dict[str, int]:
    """How often one training step calls each LoRA kernel, to see that the patches ran."""
    from tunegraph.kernels import lora_patch

    calls = dict.fromkeys(("lora_mlp", "lora_projections", "lora_linear"), 0)

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    for name in calls:
        monkeypatch.setattr(lora_patch, name, counting(name, getattr(lora_patch, name)))
    loss_and_grads(model)
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_patched_model_trains_like_peft(model_type, monkeypatch):
    plain = peft_model(tiny_model(model_type))
    patched = copy.deepcopy(plain)
    assert apply_lora_kernels(patched, ALL_ON) == {"lora_mlp": 1, "lora_qkv": 1, "lora_o": 1}
    # the MLP, q/k/v together, o_proj
    assert kernel_calls(patched, monkeypatch) == {"lora_mlp": 1, "lora_projections": 1,
                                                  "lora_linear": 1}
    assert_same_training(patched, plain)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_with_gradient_checkpointing(reentrant):
    """The decoder layers run again in the backward; the recomputation draws the same dropout
    masks (checkpoint restores the RNG state), and the in-place MLP backward sees fresh buffers."""
    plain = peft_model(tiny_model("llama"))
    patched = copy.deepcopy(plain)
    apply_lora_kernels(patched, ALL_ON)
    for model in (plain, patched):
        model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.enable_input_require_grads()
    assert_same_training(patched, plain)


def test_with_the_norm_glu_rope_kernels_on_too():
    """apply_kernels (RMSNorm, GLU, RoPE) before the adapter, LoRA kernels after: the LoRA MLP
    supersedes the GLU patch, RoPE runs inside the q/k/v-patched attention."""
    from tunegraph.kernels import KernelOptions, apply_kernels

    hf = tiny_model("qwen3")
    plain = peft_model(copy.deepcopy(hf))
    apply_kernels(hf, KernelOptions(rms_norm=True, glu=True, rope=True))
    patched = peft_model(hf)
    apply_lora_kernels(patched, ALL_ON)
    assert_same_training(patched, plain)


def test_merge_disable_and_save_are_unaffected(tmp_path):
    from peft.utils import get_peft_model_state_dict

    plain = peft_model(tiny_model("llama"), dropout=0.0)
    patched = copy.deepcopy(plain)
    apply_lora_kernels(patched, ALL_ON)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    patched.eval()
    with torch.no_grad():
        adapted = patched(input_ids=ids).logits
        with patched.disable_adapter():
            base = patched(input_ids=ids).logits
        plain.eval()
        with plain.disable_adapter():
            assert rel_err(base, plain(input_ids=ids).logits) < FP32_TOL
        assert rel_err(adapted, plain(input_ids=ids).logits) < FP32_TOL
        assert rel_err(adapted, base) > 1e-3
    assert get_peft_model_state_dict(patched).keys() == get_peft_model_state_dict(plain).keys()
    patched.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = patched.merge_and_unload()
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).logits, adapted) < FP32_TOL


# ------------------------------------------------------------------ errors name the recipe key

def error_model(**config: Any) -> nn.Module:
    return peft_model(tiny_model("llama"), **config)


def _set_fan_in_fan_out(model):
    model.base_model.model.model.layers[0].mlp.up_proj.fan_in_fan_out = True


def _quantize(model):
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    layer.base_layer.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.uint8),
                                           requires_grad=False)


def _second_adapter(model):
    model.add_adapter("other", LoraConfig(r=2, target_modules=ALL_LINEAR))
    model.base_model.set_adapter(["default", "other"])


def _unfreeze(model):
    model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.weight.requires_grad_()


ERRORS = {  # case -> (LoRA config, model change, the op on, message)
    "dora": ({"use_dora": True}, None, "lora_mlp", "DoRA"),
    "lora_bias": ({"lora_bias": True}, None, "lora_o", "lora_bias"),
    "fan_in_fan_out": ({}, _set_fan_in_fan_out, "lora_mlp", "fan_in_fan_out"),
    "quantized": ({}, _quantize, "lora_o", "unquantized"),
    "two_active_adapters": ({}, _second_adapter, "lora_qkv", "2 active adapters"),
    "trainable_base": ({}, _unfreeze, "lora_qkv", "trainable"),
    "k_proj_without_lora": ({"targets": ["q_proj", "v_proj", "o_proj"]}, None, "lora_qkv",
                            "k_proj has no LoRA adapter"),
    "down_proj_without_lora": ({"targets": ["gate_proj", "up_proj"]}, None, "lora_mlp",
                               "down_proj has no LoRA adapter"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_unsupported_setups_name_the_key(case):
    config, change, op, message = ERRORS[case]
    model = error_model(**config)
    if change is not None:
        change(model)
    options = Options(**{op: True})
    key = options.recipe_keys[op]
    with pytest.raises(ValueError, match=key) as raised:
        apply_lora_kernels(model, options)
    assert message in str(raised.value)


def test_unsupported_model_type_names_the_key():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("phi3", hidden_size=32, intermediate_size=44,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=97, pad_token_id=0)
    model = peft_model(AutoModelForCausalLM.from_config(config), targets=["qkv_proj", "o_proj"])
    with pytest.raises(ValueError, match="kernels.lora_o: model_type 'phi3'"):
        apply_lora_kernels(model, Options(lora_o=True, recipe_keys={}))


@pytest.mark.parametrize("keys", [{"kernels": {"lora_mlp": True}}, {"lora_qkv_kernel": True},
                                  {"lora_o_kernel": True, "kernels": {"rope": True}}],
                         ids=["kernels.lora_mlp", "lora_qkv_kernel", "lora_o_kernel"])
def test_recipe_without_lora_adapter_is_a_config_error(keys, make_recipe):
    from tunegraph.config.loader import RecipeError

    key = next(k for k in ("kernels.lora_mlp", "lora_qkv_kernel", "lora_o_kernel")
               if k.split(".")[-1] in json.dumps(keys))
    data = [{"path": "data.jsonl", "type": "alpaca"}]
    with pytest.raises(RecipeError, match=key):
        make_recipe(datasets=data, **keys)
    assert make_recipe(datasets=data, adapter="lora", **keys).kernel_options().lora_on


# ------------------------------------------------------------------ golden trajectory

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "lora_kernels_llama_tiny.json"
# RUNS["lora_tiny"] (tests/ops/test_train.py's LoRA golden) with dropout on the LoRA inputs,
# so kernels-on must also draw PEFT's masks; 8 steps keep the interpreter run ~6-10 s.
GOLDEN_KEYS = {**RUNS["lora_tiny"], "lora_dropout": 0.1, "max_steps": 8, "val_set_size": 0}
LORA_KEYS = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}
# Kernels off vs the golden: other CPUs and library patch releases sum in another order
# (train_support.GOLDEN_RTOL). Kernels on vs off, fp32: the kernels' sums run in another order
# (1e-7 per op, above), which 8 Adam steps at lr 1e-2 amplify; a wrong gradient moves the loss
# by 1e-2 within 2 steps.
GOLDEN_RTOL = 1e-4
KERNELS_RTOL = 1e-4
# bf16 autocast on a GPU, 8 steps: the kernels round in other places than PEFT (one rounding
# of base + LoRA instead of three), a few 1e-3 per step (tests/kernels/test_patch_training.py).
BF16_KERNELS_RTOL = 2e-2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("lora_kernels_train")
    return prepare_training(folder, make(folder, **GOLDEN_KEYS), num_rows=48)


def golden_losses(prepared: dict[str, Any], out: Path, **keys: Any) -> list[float]:
    from tunegraph.ops.train import train

    recipe = make(prepared["folder"], **{**GOLDEN_KEYS, **keys})
    metrics = train(recipe, prepared["base_dir"], prepared["tokenized_dir"], out)
    return [loss for _, loss in metrics["losses"]]


def golden(actual: list[float] | None = None) -> list[float]:
    recipe = {**COMMON, **GOLDEN_KEYS, "tiny_model": TINY}
    if UPDATE_GOLDEN and actual is not None:
        libraries = {lib: metadata.version(lib) for lib in ("torch", "transformers", "peft",
                                                             "triton")}
        GOLDEN.write_text(json.dumps({
            "about": "Per-step training loss of tests/kernels/test_lora.py's tiny LoRA Llama "
                     "without the LoRA kernels (CPU, fp32, one thread); runs with "
                     "lora_mlp_kernel, lora_qkv_kernel and lora_o_kernel must follow it. "
                     "Regenerate: TUNEGRAPH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
                     "tests/kernels/test_lora.py; say why in the commit.",
            "recipe": recipe, "libraries": libraries, "rtol": GOLDEN_RTOL,
            "kernels_rtol": KERNELS_RTOL, "losses": actual}, indent=2) + "\n")
    stored = json.loads(GOLDEN.read_text())
    assert stored["recipe"] == json.loads(json.dumps(recipe)), (
        f"{GOLDEN.name} was made with other recipe keys: regenerate it (module docstring)")
    return stored["losses"]


def test_lora_kernels_follow_golden(prepared, tmp_path, cpu_one_thread):
    off = golden_losses(prepared, tmp_path / "off")
    expected = golden(off)
    assert off == pytest.approx(expected, rel=GOLDEN_RTOL, abs=0)
    on = golden_losses(prepared, tmp_path / "on", **LORA_KEYS)
    print(f"LoRA kernels on vs golden (CPU, fp32): max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(on, expected, strict=True)):.2e}")
    assert on == pytest.approx(expected, rel=KERNELS_RTOL, abs=0)
    assert sum(on[-3:]) < sum(on[:3]), "the loss should go down"


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_lora_kernels_on_off_same_trajectory_on_gpu(prepared, tmp_path, bf16):
    off = golden_losses(prepared, tmp_path / "off", bf16=bf16)
    on = golden_losses(prepared, tmp_path / "on", bf16=bf16, liger_rms_norm=True,
                       liger_glu_activation=True, liger_rope=True, **LORA_KEYS)
    print(f"LoRA kernels on vs off ({'bf16' if bf16 else 'fp32'}): max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(on, off, strict=True)):.2e}")
    assert on == pytest.approx(off, rel=BF16_KERNELS_RTOL if bf16 else KERNELS_RTOL, abs=0)


# ------------------------------------------------------------------ K3's real shapes on a GPU

def real_weights(out: int, inp: int, rank: int, dtype: torch.dtype, gen: torch.Generator,
                 bias: bool = False) -> LoRAWeights:
    def rand(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)
    return LoRAWeights(rand(out, inp, scale=inp**-0.5), rand(out, scale=0.1) if bias else None,
                       rand(rank, inp, scale=inp**-0.5).requires_grad_(),
                       rand(out, rank, scale=rank**-0.5).requires_grad_(), 2.0)


def upcast(w: LoRAWeights, dtype: torch.dtype) -> LoRAWeights:
    return LoRAWeights(w.weight.to(dtype), None if w.bias is None else w.bias.to(dtype),
                       w.lora_a.detach().to(dtype).requires_grad_(),
                       w.lora_b.detach().to(dtype).requires_grad_(), w.scaling)


def grads_of(fn, x, ws, dy):
    x = x.detach().clone().requires_grad_()
    out = fn(x, ws)
    out.backward(dy)
    return [out, x.grad] + [g for w in ws for g in (w.lora_a.grad, w.lora_b.grad)]


# fp32 at real sizes: sums of 4096-14336 products in fp32 (cuBLAS and the kernels' tl.dot in
# ieee mode) against float64: ~sqrt(K) 2^-24 ~ 1e-5 at worst, ~3e-7 measured at small sizes;
# TF32 (~3e-4) fails.
REAL_TOL = {torch.bfloat16: BF16_TOL, torch.float32: 5e-5}


@pytest.fixture
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", ["mlp", "linear", "qkv"])
def test_real_shapes_on_gpu(op, dtype, no_tf32):
    """8192 tokens, H 4096, I 14336 (q 4096, k/v 1024), r 16, against the same math in a wider
    dtype (bf16 vs fp32; fp32 vs float64)."""
    tokens, hidden, inter = 8192, 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.float32 if dtype == torch.bfloat16 else torch.float64
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dtype)
    if op == "mlp":
        ws = [real_weights(inter, hidden, 16, dtype, gen),
              real_weights(inter, hidden, 16, dtype, gen),
              real_weights(hidden, inter, 16, dtype, gen)]
        out_dim = hidden

        def ours(x, ws):
            return lora_mlp(x, *ws)

        def ref(x, ws):
            return lora_mlp_reference(x, *ws)
    else:
        outs = [inter] if op == "linear" else [hidden, 1024, 1024]
        ws = [real_weights(o, hidden, 16, dtype, gen, bias=op == "qkv") for o in outs]
        out_dim = sum(outs)

        def ours(x, ws):
            return torch.cat(lora_projections(x, ws), dim=-1)

        def ref(x, ws):
            return torch.cat([lora_linear_reference(x, w) for w in ws], dim=-1)
    dy = torch.randn(tokens, out_dim, device="cuda", generator=gen).to(dtype)
    got = grads_of(ours, x, ws, dy)
    want = grads_of(ref, x.to(wide), [upcast(w, wide) for w in ws], dy.to(wide))
    errors = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
    print(f"{op} {dtype}: output, dx, dA/dB errors vs {wide}: "
          + ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < REAL_TOL[dtype], errors
