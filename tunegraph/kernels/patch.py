"""Swap tunegraph's kernels into a Hugging Face model, module instance by module instance.

    apply_kernels(model, KernelOptions(rms_norm=True, glu=True, rope=True))

Only this model's modules change (each gets a subclass of its class, same name, with the
kernel's forward): other models of the same class in the process keep HF's code, and nothing is
patched globally. The recipe
keys (`liger_*`, or the `kernels:` block) reach this through `Recipe.kernel_options()`.

| model_type           | rms_norm                    | glu (MLP act)         | rope                 |
|----------------------|-----------------------------|-----------------------|----------------------|
| llama, mistral,      | <Type>RMSNorm, llama style  | <Type>MLP: silu ->    | <Type>Attention's    |
| qwen2, qwen3         | (qwen3: q_norm/k_norm too)  | swiglu                | apply_rotary_pos_emb |
| gemma                | GemmaRMSNorm, 1 + w         | gelu_pytorch_tanh ->  | same                 |
|                      |                             | geglu                 |                      |
| gemma2, gemma3,      | 1 + w; backward not in      | same                  | same                 |
| gemma3_text          | place (post-norms: below)   |                       |                      |

In-place memory savings (what Liger does, and why each is safe here): the norm backward writes
dx over dy, but only for models whose norms feed linear layers alone; Gemma 2/3's post-norms
are added to the residual, which shares their dy, so their backward allocates. The MLP backward
writes its gradients over the gate/up projections (fresh tensors nothing else reads), and the
RoPE backward writes over the attention's dq/dk. Any other model_type raises `ValueError` naming the
recipe key: a kernel key never silently does nothing.

`moe` (MoE experts of qwen3_moe, qwen2_moe, olmoe, mixtral, deepseek_v3, glm4_moe) is
tunegraph/kernels/moe_patch.py's `apply_moe_kernels`, imported only when asked for.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunegraph.kernels.rms_norm import rms_norm
from tunegraph.kernels.rope import apply_rotary
from tunegraph.kernels.swiglu import geglu, swiglu


class KernelSwitches(Protocol):
    """What `apply_kernels` reads: this module's KernelOptions, or the recipe's kernels config
    (tunegraph.config.kernels.KernelsConfig), which has the same fields."""

    rms_norm: bool
    glu: bool
    rope: bool
    fused_linear_cross_entropy: bool
    moe: bool
    recipe_keys: Mapping[str, str]


@dataclass(frozen=True)
class KernelOptions:
    rms_norm: bool = False
    glu: bool = False
    rope: bool = False
    fused_linear_cross_entropy: bool = False
    moe: bool = False  # MoE experts as grouped GEMMs (tunegraph/kernels/moe_patch.py)
    # op -> the recipe key that turned it on, for error messages ("liger_rope").
    recipe_keys: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelKernels:
    """Which classes of one model family get which kernel."""

    norm: str
    gemma_norm: bool  # scale is 1 + weight, applied in fp32 before the cast
    norm_inplace_backward: bool  # every norm's output feeds linear layers only
    mlp: str
    attention: str
    # Attribute names of the norms whose output feeds linear layers alone (the pre-norms and the
    # final norm before lm_head): under autocast they emit the autocast dtype (_norm_forward).
    linear_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm", "norm")


def _family(prefix: str, gemma: bool = False, post_norms: bool = False) -> ModelKernels:
    # Gemma 2/3: post_attention_layernorm is a post-norm added to the residual; the MLP's
    # pre-norm is pre_feedforward_layernorm.
    linear_norms = (("input_layernorm", "pre_feedforward_layernorm", "norm") if post_norms
                    else ("input_layernorm", "post_attention_layernorm", "norm"))
    return ModelKernels(f"{prefix}RMSNorm", gemma, not post_norms, f"{prefix}MLP",
                        f"{prefix}Attention", linear_norms)


SUPPORTED: dict[str, ModelKernels] = {
    "llama": _family("Llama"),
    "mistral": _family("Mistral"),
    "qwen2": _family("Qwen2"),
    "qwen3": _family("Qwen3"),
    "gemma": _family("Gemma", gemma=True),
    "gemma2": _family("Gemma2", gemma=True, post_norms=True),
    "gemma3": _family("Gemma3", gemma=True, post_norms=True),
    "gemma3_text": _family("Gemma3", gemma=True, post_norms=True),
}
# The MLP's act_fn class -> the fused kernel (HF's ACT2CLS names; GELUTanh is gelu_pytorch_tanh,
# NewGELU and FastGELU are the same tanh formula).
GLU_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "SiLU": swiglu, "SiLUActivation": swiglu,
    "GELUTanh": geglu, "PytorchGELUTanh": geglu, "NewGELUActivation": geglu,
    "FastGELUActivation": geglu,
}
OPS = ("rms_norm", "glu", "rope")


def _recipe_key(options: Any, op: str) -> str:
    return dict(getattr(options, "recipe_keys", {}) or {}).get(op, f"kernels.{op}")


def _modules(model: torch.nn.Module, class_name: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


@functools.cache  # one function, so one patched class, per variant
def _norm_forward(gemma: bool, inplace_backward: bool, feeds_linear: bool = False
                  ) -> Callable[..., torch.Tensor]:
    """The norm's forward on the kernel. `feeds_linear` (pre-norms, the final norm): under
    autocast an fp32 input (the residual stream over fp32 weights) gives an output already in
    the autocast dtype. Autocast would cast it before each linear layer (q, k and v: three
    casts, three more in the backward); rounding in the kernel's store gives the same bits once.
    The backward then sums the layers' input gradients in that dtype, not in fp32: rounding
    that the kernels-on trajectory test bounds (tests/kernels/test_patch_training.py)."""
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = self.eps if gemma else self.variance_epsilon
        out_dtype = None
        device = hidden_states.device.type
        if (feeds_linear and hidden_states.dtype == torch.float32
                and torch.is_autocast_enabled(device)):
            out_dtype = torch.get_autocast_dtype(device)
        return rms_norm(hidden_states, self.weight, eps, gemma=gemma,
                        inplace_backward=inplace_backward, out_dtype=out_dtype)
    return forward


@functools.cache
def _glu_forward(glu: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF: down_proj(act_fn(gate_proj(x)) * up_proj(x)), the middle fused.
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), inplace_backward=True))
    return forward


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """HF's apply_rotary_pos_emb signature, on the kernel (q/k are fresh projections there)."""
    return apply_rotary(q, k, cos, sin, unsqueeze_dim, inplace_backward=True)


_ROTARY_FORWARDS: dict[type, Callable[..., Any]] = {}


def _rotary_forward(attention_class: type, key: str) -> Callable[..., Any]:
    """The class's own forward, compiled against globals where `apply_rotary_pos_emb` is ours:
    HF's attention code runs unchanged and calls the kernel, and no module global changes."""
    if attention_class not in _ROTARY_FORWARDS:
        forward = attention_class.forward
        if (not isinstance(forward, types.FunctionType) or forward.__closure__
                or "apply_rotary_pos_emb" not in forward.__code__.co_names):
            raise ValueError(f"{key}: {attention_class.__name__}.forward does not call "
                             f"apply_rotary_pos_emb as this transformers version's does; the "
                             f"RoPE kernel cannot be applied to it")
        namespace = {**forward.__globals__, "apply_rotary_pos_emb": apply_rotary_pos_emb}
        patched = types.FunctionType(forward.__code__, namespace, forward.__name__,
                                     forward.__defaults__)
        patched.__kwdefaults__ = forward.__kwdefaults__
        patched.__doc__ = forward.__doc__
        _ROTARY_FORWARDS[attention_class] = patched
    return _ROTARY_FORWARDS[attention_class]


_PATCHED_CLASSES: dict[tuple[type, Callable[..., Any]], type] = {}


def _base(cls: type) -> type:
    return getattr(cls, "_tunegraph_base", cls)


def _patch(modules: list[torch.nn.Module], forward: Callable[..., Any]) -> None:
    """Give each module a subclass of its class, same name, whose forward is `forward`. A class
    and not an instance attribute: nn.DataParallel (the Trainer's on a multi-GPU host) copies
    a module's __dict__ into its replicas, so an instance's bound forward would run the
    original's weights on every device."""
    for module in modules:
        base = _base(type(module))
        if (base, forward) not in _PATCHED_CLASSES:
            _PATCHED_CLASSES[base, forward] = type(base.__name__, (base,), {
                "forward": forward, "_tunegraph_base": base, "__module__": __name__,
                "__qualname__": f"patched.{base.__qualname__}"})
        module.__class__ = _PATCHED_CLASSES[base, forward]


def _require(modules: list[torch.nn.Module], key: str, model_type: str, class_name: str) -> None:
    if not modules:
        raise ValueError(f"{key}: model_type '{model_type}' has no {class_name} module in this "
                         f"model; the kernel has nothing to replace")


def apply_kernels(model: torch.nn.Module, options: KernelSwitches) -> dict[str, int]:
    """Patch `model`'s modules for each op `options` turns on; returns op -> modules patched.

    Raises ValueError, naming the recipe key, for a model_type without kernels (SUPPORTED) or an
    MLP activation without a fused kernel."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    wanted = [op for op in OPS if getattr(options, op)]
    patched: dict[str, int] = {}
    if wanted and model_type not in SUPPORTED:
        key = _recipe_key(options, wanted[0])
        raise ValueError(f"{key}: model_type '{model_type}' has no tunegraph kernels (supported: "
                         f"{', '.join(SUPPORTED)}); remove {key} for this model")
    family = SUPPORTED.get(model_type)  # type: ignore[arg-type]
    if options.rms_norm:
        named = [(name, m) for name, m in model.named_modules()
                 if type(m).__name__ == family.norm]
        _require([m for _, m in named], _recipe_key(options, "rms_norm"), model_type,
                 family.norm)
        for feeds_linear in (False, True):
            _patch([m for name, m in named
                    if (name.rsplit(".", 1)[-1] in family.linear_norms) == feeds_linear],
                   _norm_forward(family.gemma_norm, family.norm_inplace_backward, feeds_linear))
        patched["rms_norm"] = len(named)
    if options.glu:
        key = _recipe_key(options, "glu")
        mlps = _modules(model, family.mlp)
        _require(mlps, key, model_type, family.mlp)
        activations = sorted({type(m.act_fn).__name__ for m in mlps})
        if len(activations) != 1 or activations[0] not in GLU_KERNELS:
            raise ValueError(f"{key}: {family.mlp}'s activation {activations} has no fused "
                             f"kernel (silu and gelu_pytorch_tanh have)")
        _patch(mlps, _glu_forward(GLU_KERNELS[activations[0]]))
        patched["glu"] = len(mlps)
    if options.rope:
        key = _recipe_key(options, "rope")
        attentions = _modules(model, family.attention)
        _require(attentions, key, model_type, family.attention)
        _patch(attentions, _rotary_forward(_base(type(attentions[0])), key))
        patched["rope"] = len(attentions)
    if options.fused_linear_cross_entropy:
        # Another module's kernel; imported only when asked for.
        from tunegraph.kernels.fused_linear_cross_entropy import apply_fused_linear_cross_entropy

        apply_fused_linear_cross_entropy(model)
        patched["fused_linear_cross_entropy"] = 1
    if getattr(options, "moe", False):
        # MoE models' experts; imported only when asked for. Raises naming the key for model
        # types without experts the kernel computes.
        from tunegraph.kernels.moe_patch import apply_moe_kernels

        patched["moe"] = apply_moe_kernels(model, _recipe_key(options, "moe"))
    return patched
