"""Kernel keys: which of tunegraph's Triton kernels replace a model's layers while training.

Axolotl's names (its Liger plugin's keys) and tunegraph's own `kernels:` block mean the same:

    liger_rms_norm: true                     # kernels: {rms_norm: true}
    liger_glu_activation: true               # kernels: {glu: true}
    liger_rope: true                         # kernels: {rope: true}
    liger_fused_linear_cross_entropy: true   # kernels: {fused_linear_cross_entropy: true}
    lora_mlp_kernel: true                    # kernels: {lora_mlp: true}
    lora_qkv_kernel: true                    # kernels: {lora_qkv: true}
    lora_o_kernel: true                      # kernels: {lora_o: true}
    use_kernels: true + use_scattermoe: true # kernels: {moe: true}

All are off by default (HF's own modules run). tunegraph.kernels.patch lists the model types
each kernel supports; any other model type is an error at training time, naming the key.
Kernels move the numbers within rounding (tests/kernels), so the training stage hashes the
options they resolve to when one is on (tunegraph.ops.stages.training_key_values).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from tunegraph.config.base import StrictModel

# kernels: block field -> the Axolotl keys that mean the same (liger_swiglu is Axolotl's older
# name for liger_glu_activation; use_scattermoe also needs use_kernels, as in Axolotl).
KERNEL_KEYS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("liger_rms_norm",),
    "glu": ("liger_glu_activation", "liger_swiglu"),
    "rope": ("liger_rope",),
    "fused_linear_cross_entropy": ("liger_fused_linear_cross_entropy",),
    "lora_mlp": ("lora_mlp_kernel",),
    "lora_qkv": ("lora_qkv_kernel",),
    "lora_o": ("lora_o_kernel",),
    "moe": ("use_scattermoe",),
}
# The ops that patch the model after the LoRA adapter is added (they replace PEFT's layers).
LORA_OPS = ("lora_mlp", "lora_qkv", "lora_o")


class KernelsConfig(StrictModel):
    """`kernels:`, tunegraph's block; also what `Recipe.kernel_options()` returns, which
    tunegraph.kernels.apply_kernels reads."""

    rms_norm: bool = Field(False, description="bool, default false: RMSNorm forward and backward "
                                              "as one Triton kernel each (Llama and Gemma "
                                              "conventions).")
    glu: bool = Field(False, description="bool, default false: the MLP's act(gate) * up fused "
                                         "(SwiGLU for silu models, GeGLU for Gemma's "
                                         "gelu_pytorch_tanh), recomputed in the backward.")
    rope: bool = Field(False, description="bool, default false: rotary embedding of q and k in "
                                          "one kernel.")
    fused_linear_cross_entropy: bool = Field(
        False, description="bool, default false: the output projection and the loss fused, "
                           "so the [tokens, vocab] logits are never materialized in training.")
    lora_mlp: bool = Field(False, description="bool, default false: the LoRA MLP (gate, up, "
                                              "down with their adapters and the GLU) as one "
                                              "autograd function with a hand-derived backward; "
                                              "needs adapter: lora/qlora.")
    lora_qkv: bool = Field(False, description="bool, default false: the LoRA q, k, v "
                                              "projections as one autograd function; needs "
                                              "adapter: lora/qlora.")
    lora_o: bool = Field(False, description="bool, default false: the LoRA output projection "
                                            "as one autograd function; needs adapter: "
                                            "lora/qlora.")
    moe: bool = Field(False, description="bool, default false: MoE experts as sorted, grouped "
                                         "GEMMs that gather and scatter in the kernel "
                                         "(ScatterMoE-style), LoRA on expert weights fused in.")

    adamw_master_weights: bool = Field(
        False, description="bool, default false (tunegraph only; full fine-tunes with bf16 and "
                           "optimizer adamw_torch or adamw_torch_fused): the linear layers' "
                           "weights held in bf16 for the matmuls and fp32 master weights "
                           "updated by one fused Triton AdamW with clipping folded in "
                           "(tunegraph/kernels/adamw.py): the fp32-weights-under-autocast "
                           "numbers without its per-step casts.")

    _recipe_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), list(cls.model_fields), 1, 0.6)
                    raise ValueError(f"kernels.{key}: unknown key"
                                     + (f" (did you mean '{close[0]}'?)" if close else "")
                                     + f"; known: {', '.join(cls.model_fields)}")
        return data

    @property
    def recipe_keys(self) -> dict[str, str]:
        """op -> the recipe key that turned it on, for error messages."""
        return dict(self._recipe_keys)

    @property
    def any_on(self) -> bool:
        return self.adamw_master_weights or any(getattr(self, op) for op in KERNEL_KEYS)

    @property
    def lora_on(self) -> bool:
        return any(getattr(self, op) for op in LORA_OPS)


class KernelsConcern(StrictModel):
    """Triton kernels swapped into the model for training (tunegraph.kernels)."""

    kernels: KernelsConfig | None = Field(None, description="mapping, default none (all off): "
                                                            "rms_norm, glu, rope, "
                                                            "fused_linear_cross_entropy, "
                                                            "lora_mlp, lora_qkv, lora_o, moe, "
                                                            "adamw_master_weights, each a bool "
                                                            "(see KernelsConfig).")
    liger_rms_norm: bool | None = Field(None, description="bool, default false: Axolotl's name "
                                                          "for kernels.rms_norm.")
    liger_glu_activation: bool | None = Field(None, description="bool, default false: Axolotl's "
                                                                "name for kernels.glu.")
    liger_swiglu: bool | None = Field(None, description="bool, default false: Axolotl's older "
                                                        "name for kernels.glu.")
    liger_rope: bool | None = Field(None, description="bool, default false: Axolotl's name for "
                                                      "kernels.rope.")
    liger_fused_linear_cross_entropy: bool | None = Field(
        None, description="bool, default false: Axolotl's name for "
                          "kernels.fused_linear_cross_entropy.")
    lora_mlp_kernel: bool | None = Field(None, description="bool, default false: Axolotl's name "
                                                           "for kernels.lora_mlp.")
    lora_qkv_kernel: bool | None = Field(None, description="bool, default false: Axolotl's name "
                                                           "for kernels.lora_qkv.")
    lora_o_kernel: bool | None = Field(None, description="bool, default false: Axolotl's name "
                                                         "for kernels.lora_o.")
    use_kernels: bool | None = Field(None, description="bool, default false: Axolotl's kernels "
                                                       "plugin switch; tunegraph reads it only "
                                                       "with use_scattermoe.")
    use_scattermoe: bool | None = Field(None, description="bool, default false (needs "
                                                          "use_kernels: true): Axolotl's name "
                                                          "for kernels.moe.")

    @field_validator("kernels", mode="before")
    @classmethod
    def _empty_block(cls, value: Any) -> Any:
        return KernelsConfig() if value == {} else value

    @model_validator(mode="after")
    def _keys_agree(self) -> KernelsConcern:
        block = self.kernels.model_fields_set if self.kernels is not None else set()
        if self.use_scattermoe and not self.use_kernels:
            raise ValueError("use_scattermoe: true needs use_kernels: true (as in Axolotl), or "
                             "write kernels: {moe: true}")
        if self.use_kernels and not self.use_scattermoe:
            raise ValueError("use_kernels: true without use_scattermoe asks Axolotl to kernelize "
                             "the model from the Hugging Face kernels hub, which tunegraph does "
                             "not do; add use_scattermoe: true for the MoE kernels, or use the "
                             "kernels: block")
        for op, aliases in KERNEL_KEYS.items():
            given = [(f"kernels.{op}", getattr(self.kernels, op))] if op in block else []
            given += [(key, getattr(self, key)) for key in aliases if getattr(self, key) is not None]
            if len({value for _, value in given}) > 1:
                said = ", ".join(f"{key}: {str(value).lower()}" for key, value in given)
                raise ValueError(f"{' and '.join(key for key, _ in given)} disagree ({said}): "
                                 f"set one")
        return self

    def kernel_options(self) -> KernelsConfig:
        """The kernels to apply, from the block and the liger_* keys together."""
        options = KernelsConfig()
        keys: dict[str, str] = {}
        for op, aliases in KERNEL_KEYS.items():
            for key in aliases:
                if getattr(self, key):
                    setattr(options, op, True)
                    keys[op] = key
            if self.kernels is not None and getattr(self.kernels, op):
                setattr(options, op, True)
                keys[op] = f"kernels.{op}"
        if self.kernels is not None and self.kernels.adamw_master_weights:
            options.adamw_master_weights = True
            keys["adamw_master_weights"] = "kernels.adamw_master_weights"
        options._recipe_keys = keys
        return options
