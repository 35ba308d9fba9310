"""Swap tunegraph's MoE experts kernel (tunegraph/kernels/moe.py) into a Hugging Face MoE model.

    apply_moe_kernels(model, "use_scattermoe")   # through apply_kernels when options.moe is on

Each `<Model>Experts` module of the model gets a subclass of its class, same name, whose forward
runs `moe_experts` (patch.py's `_patch`: only this model changes). HF's router and sparse-MoE
block stay as they are: the router's top-k weights reach the kernel and its gradient flows back
through them, and shared experts run beside it as HF runs them.

| model_type  | experts class     | routing (HF's router, unchanged)                          | shared experts              |
|-------------|-------------------|-----------------------------------------------------------|-----------------------------|
| qwen3_moe   | Qwen3MoeExperts   | softmax -> top-k, renormalised if norm_topk_prob          | -                           |
| qwen2_moe   | Qwen2MoeExperts   | same                                                      | MLP x sigmoid(its gate)     |
| olmoe       | OlmoeExperts      | same                                                      | -                           |
| mixtral     | MixtralExperts    | softmax (fp32) -> top-k, renormalised                     | -                           |
| deepseek_v3 | DeepseekV3Experts | sigmoid + correction bias -> top groups -> top-k, scaled  | MLP                         |
| glm4_moe    | Glm4MoeExperts    | same                                                      | MLP                         |

LoRA on the experts (PEFT `target_parameters`, e.g. Axolotl's `lora_target_parameters:
[mlp.experts.gate_up_proj, mlp.experts.down_proj]`): PEFT's ParamWrapper registers, for the
duration of each forward, a parametrization on the experts' 3D weight that would fold
W + scale * B @ A into a new weight. The patched forward reads the base weight and PEFT's own
A and B factors from that parametrization instead and passes them to the kernel, which adds the
low-rank path inside its grouped GEMMs, so the folded weight is never formed and its gradient
never computed. Where PEFT folds a precomputed delta instead (several adapters at once, fp8
weights), the kernel gets PEFT's folded weight: right, not fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from tunegraph.kernels.moe import moe_experts
from tunegraph.kernels.patch import _base, _patch

MOE_EXPERTS: dict[str, str] = {
    "qwen3_moe": "Qwen3MoeExperts",
    "qwen2_moe": "Qwen2MoeExperts",
    "olmoe": "OlmoeExperts",
    "mixtral": "MixtralExperts",
    "deepseek_v3": "DeepseekV3Experts",
    "glm4_moe": "Glm4MoeExperts",
}
SILU = ("SiLU", "SiLUActivation")


def _weight_and_lora(module: torch.nn.Module, name: str):
    """(weight, lora): the base 3D weight and PEFT's (A [E, r, in], B [E, out, r], scale) while
    one LoRA adapter's factors parametrize it; else the weight as the module sees it."""
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name), None
    parametrizations = module.parametrizations[name]
    proxies = list(parametrizations)
    weight = parametrizations.original
    if len(proxies) == 1 and type(proxies[0]).__name__ == "_LoraFactorsProxy":
        proxy = proxies[0]
        b_factor, a_factor = proxy.lhs, proxy.rhs  # PEFT folds W + scaling * lhs @ rhs
        experts, out_features, in_features = weight.shape
        if (b_factor.shape[:2] == (experts, out_features) and a_factor.shape[0] == experts
                and a_factor.shape[2] == in_features and a_factor.shape[1] == b_factor.shape[2]):
            return weight, (a_factor, b_factor, float(proxy.scaling))
    return getattr(module, name), None  # PEFT's folded weight (a right result, not fused)


def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """HF's `<Model>Experts.forward(hidden_states, top_k_index, top_k_weights)` on the kernel."""
    gate_up_proj, gate_up_lora = _weight_and_lora(self, "gate_up_proj")
    down_proj, down_lora = _weight_and_lora(self, "down_proj")
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj,
                       gate_up_lora=gate_up_lora, down_lora=down_lora)


def _check_experts(module: torch.nn.Module, key: str, class_name: str) -> None:
    """The layout the kernel computes: fused [gate; up] rows, no bias, not transposed, silu."""
    activation = type(getattr(module, "act_fn", None)).__name__
    problems = []
    if activation not in SILU:
        problems.append(f"activation {activation} (the kernel fuses silu only)")
    for flag, wanted in (("has_bias", False), ("is_transposed", False), ("has_gate", True),
                         ("is_concatenated", True)):
        if getattr(module, flag, wanted) != wanted:
            problems.append(f"{flag}={not wanted}")
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3
            and down.shape == (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2)):
        problems.append("expert weights are not gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
    if problems:
        raise ValueError(f"{key}: {class_name} in this transformers version has "
                         f"{'; '.join(problems)}; the MoE kernel cannot replace it")


def apply_moe_kernels(model: Any, key: str = "kernels.moe") -> int:
    """Patch every experts module of `model` (before PEFT wraps it, or after: PEFT calls the
    same module); returns how many. Raises ValueError naming `key` (the recipe key that asked
    for it) for a model type without the kernel or experts of another layout."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MOE_EXPERTS:
        raise ValueError(f"{key}: model_type '{model_type}' has no MoE experts kernel "
                         f"(supported: {', '.join(MOE_EXPERTS)}); remove {key} for this model")
    class_name = MOE_EXPERTS[model_type]
    experts = [m for m in model.modules() if _base(type(m)).__name__ == class_name]
    if not experts:
        raise ValueError(f"{key}: model_type '{model_type}' has no {class_name} module in this "
                         f"model; the kernel has nothing to replace")
    for module in experts:
        _check_experts(module, key, class_name)
    _patch(experts, _experts_forward)
    return len(experts)
