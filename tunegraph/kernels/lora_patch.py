"""Swap tunegraph's LoRA kernels into a PEFT-wrapped Hugging Face model, module by module.

    model = get_peft_model(hf_model, LoraConfig(...))
    apply_lora_kernels(model, options)   # options.lora_mlp / lora_qkv / lora_o, recipe_keys

The recipe keys `lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel` (or the `kernels:` block's
lora_mlp, lora_qkv, lora_o) reach this through `Recipe.kernel_options()`, after the adapter is
added (tunegraph.ops.train.prepare_model). Model types: those tunegraph.kernels.patch.SUPPORTED
lists (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3).

- lora_mlp: each <Type>MLP's forward becomes `lora_mlp` (gate, up, down and the GLU in one
  autograd node). It includes the GLU, so it takes over from `kernels.glu` on those modules.
- lora_qkv: each <Type>Attention's forward first computes q, k, v with `lora_projections` (x read
  once, one dX), hands each result to its q_proj/k_proj/v_proj, then runs the attention's own
  forward (HF's, or the RoPE-patched one), whose `self.q_proj(hidden_states)` calls return them.
  Everything else (q_norm/k_norm, RoPE, sdpa/eager attention, caches) is HF's code unchanged.
- lora_o: each o_proj's forward becomes `lora_linear`.

Each module gets a subclass of its current class (same name; patch.py's RMSNorm/GLU/RoPE patches
stay underneath), never a bound method: nn.DataParallel copies a module's __dict__ into replicas.
The patched forwards check their LoRA layers at every call and run the class underneath when
PEFT's own path is what the state asks for: adapters disabled (`disable_adapter()`), merged
(`merge_adapter()`), another adapter set active, or under torch.compile (Inductor then fuses
PEFT's code itself). merge_and_unload() replaces the LoRA layers with their base nn.Linear, and
the patched MLP/attention then run the class underneath too. Structural mismatches are errors
when patching, naming the recipe key: DoRA and other LoRA variants, quantized base layers,
lora_bias, fan_in_fan_out, several active adapters, a projection without LoRA, a trainable base
weight, an MLP activation without a GLU kernel, another model_type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tunegraph.kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_projections
from tunegraph.kernels.patch import GLU_KERNELS, SUPPORTED
from tunegraph.kernels.swiglu import geglu

LORA_OPS = ("lora_mlp", "lora_qkv", "lora_o")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# Where the attention forward leaves q/k/v for its projection modules (popped on use).
_STASH = "_tunegraph_lora_output"


def _recipe_key(options: Any, op: str) -> str:
    keys: Mapping[str, str] = getattr(options, "recipe_keys", {}) or {}
    return dict(keys).get(op, f"kernels.{op}")


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT's wrappers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_linear_class() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


def _check_layer(layer: torch.nn.Module, key: str, where: str) -> None:
    """Raise ValueError naming `key` unless `layer` is a PEFT lora.Linear the kernels can run."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        raise ValueError(f"{key}: {where} has no LoRA adapter (it is a {type(layer).__name__}); "
                         f"add it to lora_target_modules (or lora_target_linear: true), or turn "
                         f"{key} off")
    base = layer.get_base_layer()
    if (not isinstance(layer, _lora_linear_class()) or not isinstance(base, torch.nn.Linear)
            or not base.weight.dtype.is_floating_point or hasattr(base.weight, "quant_state")):
        raise ValueError(f"{key}: {where} is a {type(layer).__module__}.{type(layer).__name__} "
                         f"over a {type(base).__name__} ({base.weight.dtype}): the LoRA kernels "
                         f"need an unquantized nn.Linear base layer (no bitsandbytes 4/8-bit, "
                         f"GPTQ, ...); turn {key} off for this model")
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise ValueError(f"{key}: {where} has {len(active)} active adapters {active}; the LoRA "
                         f"kernels run exactly one; turn {key} off or activate one adapter")
    name = active[0]
    if name not in layer.lora_A:
        raise ValueError(f"{key}: {where} has no LoRA weights for the active adapter '{name}'")
    variants = getattr(layer, "lora_variant", {})  # newer PEFT; older ones only had DoRA
    dora = getattr(layer, "use_dora", {}).get(name, False)
    if dora or name in variants:
        variant = "DoRA" if dora else type(variants[name]).__name__
        raise ValueError(f"{key}: {where} uses {variant} (use_dora / a LoRA variant), which the "
                         f"LoRA kernels do not compute; turn {key} off or train plain LoRA")
    if getattr(layer, "lora_bias", {}).get(name, False):
        raise ValueError(f"{key}: {where} has a LoRA bias (lora_bias: true), which the LoRA "
                         f"kernels do not compute; turn {key} off")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{key}: {where} stores its weight transposed (lora_fan_in_fan_out: "
                         f"true), which the LoRA kernels do not read; turn {key} off")
    if base.weight.requires_grad:
        raise ValueError(f"{key}: {where}'s base weight is trainable; the LoRA kernels compute no "
                         f"base-weight gradient; freeze it or turn {key} off")


def _weights(layer: torch.nn.Module) -> LoRAWeights | None:
    """The LoRA layer's tensors when the kernels compute what PEFT's forward would; None when
    PEFT's own path must run (adapters disabled or merged, another adapter state)."""
    if not isinstance(layer, _lora_linear_class()) or layer.merged or layer.disable_adapters:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    base = layer.get_base_layer()
    if (name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name)
            or getattr(layer, "lora_bias", {}).get(name) or layer.fan_in_fan_out
            or base.weight.requires_grad):
        return None
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return LoRAWeights(base.weight, base.bias, layer.lora_A[name].weight,
                       layer.lora_B[name].weight, layer.scaling[name], p)


def _all_weights(layers: list[torch.nn.Module]) -> list[LoRAWeights] | None:
    if torch.compiler.is_compiling():
        return None
    weights = [_weights(layer) for layer in layers]
    return None if any(w is None for w in weights) else weights  # type: ignore[return-value]


# ------------------------------------------------------------------ patched forwards

@functools.cache
def _mlp_forward(gelu: bool) -> Callable[[type], Callable[..., Any]]:
    def make(parent: type) -> Callable[..., Any]:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weights = _all_weights([getattr(self, name) for name in MLP_PROJECTIONS])
            if weights is None:
                return parent.forward(self, x)
            return lora_mlp(x, *weights, gelu=gelu)
        return forward
    return make


def _attention_forward(parent: type) -> Callable[..., Any]:
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layers = [getattr(self, name) for name in QKV_PROJECTIONS]
        weights = _all_weights(layers)
        if weights is None:
            return parent.forward(self, *args, **kwargs)
        for layer, output in zip(layers, lora_projections(hidden_states, weights), strict=True):
            layer.__dict__[_STASH] = (hidden_states, output)
        try:
            result = parent.forward(self, *args, **kwargs)
        finally:
            unused = [name for name, layer in zip(QKV_PROJECTIONS, layers, strict=True)
                      if layer.__dict__.pop(_STASH, None) is not None]
        if unused:
            raise RuntimeError(f"{type(self).__name__}.forward did not call {', '.join(unused)} "
                               f"on its hidden_states as transformers' attention does: "
                               f"lora_qkv_kernel cannot be used with this transformers version")
        return result
    return forward


def _linear_forward(parent: type) -> Callable[..., Any]:
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        stash = self.__dict__.get(_STASH)
        if stash is not None and stash[0] is x and not args and not kwargs:
            del self.__dict__[_STASH]
            return stash[1]
        weights = None if args or kwargs else _all_weights([self])
        if weights is None:
            return parent.forward(self, x, *args, **kwargs)
        return lora_linear(x, weights[0])
    return forward


_PATCHED_CLASSES: dict[tuple[type, Callable[..., Any]], type] = {}


def _patch(modules: list[torch.nn.Module],
           make_forward: Callable[[type], Callable[..., Any]]) -> None:
    """Give each module a subclass of its current class, same name, whose forward is
    `make_forward(current class)`; that forward falls back to the current class's."""
    for module in modules:
        parent = type(module)
        if getattr(parent, "_tunegraph_lora_forward", None) is make_forward:
            continue  # already patched with this forward
        if (parent, make_forward) not in _PATCHED_CLASSES:
            _PATCHED_CLASSES[parent, make_forward] = type(parent.__name__, (parent,), {
                "forward": make_forward(parent), "_tunegraph_lora_forward": make_forward,
                "_tunegraph_base": getattr(parent, "_tunegraph_base", parent),
                "__module__": __name__, "__qualname__": f"patched.{parent.__qualname__}"})
        module.__class__ = _PATCHED_CLASSES[parent, make_forward]


def _named(model: torch.nn.Module, class_name: str) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == class_name]


def apply_lora_kernels(model: torch.nn.Module, options: Any) -> dict[str, int]:
    """Patch a PEFT LoRA model for each of options.lora_mlp / lora_qkv / lora_o that is on;
    returns op -> modules patched. Raises ValueError naming the recipe key (module docstring)."""
    wanted = [op for op in LORA_OPS if getattr(options, op, False)]
    if not wanted:
        return {}
    hf_model = _hf_model(model)
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        key = _recipe_key(options, wanted[0])
        raise ValueError(f"{key}: model_type '{model_type}' has no LoRA kernels (supported: "
                         f"{', '.join(SUPPORTED)}); remove {key} for this model")
    family = SUPPORTED[model_type]
    patched: dict[str, int] = {}
    if "lora_mlp" in wanted:
        key = _recipe_key(options, "lora_mlp")
        mlps = _named(hf_model, family.mlp)
        if not mlps:
            raise ValueError(f"{key}: model_type '{model_type}' has no {family.mlp} module")
        activations = sorted({type(m.act_fn).__name__ for _, m in mlps})
        if len(activations) != 1 or activations[0] not in GLU_KERNELS:
            raise ValueError(f"{key}: {family.mlp}'s activation {activations} has no fused "
                             f"kernel (silu and gelu_pytorch_tanh have)")
        for name, mlp in mlps:
            for projection in MLP_PROJECTIONS:
                _check_layer(getattr(mlp, projection, None), key, f"{name}.{projection}")
        _patch([m for _, m in mlps], _mlp_forward(GLU_KERNELS[activations[0]] is geglu))
        patched["lora_mlp"] = len(mlps)
    if "lora_qkv" in wanted or "lora_o" in wanted:
        attentions = _named(hf_model, family.attention)
        for op, projections in (("lora_qkv", QKV_PROJECTIONS), ("lora_o", ("o_proj",))):
            if op not in wanted:
                continue
            key = _recipe_key(options, op)
            if not attentions:
                raise ValueError(f"{key}: model_type '{model_type}' has no {family.attention} "
                                 f"module")
            for name, attention in attentions:
                for projection in projections:
                    _check_layer(getattr(attention, projection, None), key, f"{name}.{projection}")
            _patch([getattr(a, p) for _, a in attentions for p in projections], _linear_forward)
            if op == "lora_qkv":
                _patch([a for _, a in attentions], _attention_forward)
            patched[op] = len(attentions)
    return patched
