"""Kernel keys: which of tunegraph's Triton kernels replace a model's layers while training.

Axolotl's names (its Liger plugin's keys) and tunegraph's own `kernels:` block mean the same:

    liger_rms_norm: true                     # kernels: {rms_norm: true}
    liger_glu_activation: true               # kernels: {glu: true}
    liger_rope: true                         # kernels: {rope: true}
    liger_fused_linear_cross_entropy: true   # kernels: {fused_linear_cross_entropy: true}

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
# name for liger_glu_activation).
LIGER_KEYS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("liger_rms_norm",),
    "glu": ("liger_glu_activation", "liger_swiglu"),
    "rope": ("liger_rope",),
    "fused_linear_cross_entropy": ("liger_fused_linear_cross_entropy",),
}


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
        return any(getattr(self, op) for op in LIGER_KEYS)


class KernelsConcern(StrictModel):
    """Triton kernels swapped into the model for training (tunegraph.kernels)."""

    kernels: KernelsConfig | None = Field(None, description="mapping, default none (all off): "
                                                            "rms_norm, glu, rope, "
                                                            "fused_linear_cross_entropy, each a "
                                                            "bool (see KernelsConfig).")
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

    @field_validator("kernels", mode="before")
    @classmethod
    def _empty_block(cls, value: Any) -> Any:
        return KernelsConfig() if value == {} else value

    @model_validator(mode="after")
    def _keys_agree(self) -> KernelsConcern:
        block = self.kernels.model_fields_set if self.kernels is not None else set()
        for op, aliases in LIGER_KEYS.items():
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
        for op, aliases in LIGER_KEYS.items():
            for key in aliases:
                if getattr(self, key):
                    setattr(options, op, True)
                    keys[op] = key
            if self.kernels is not None and getattr(self.kernels, op):
                setattr(options, op, True)
                keys[op] = f"kernels.{op}"
        options._recipe_keys = keys
        return options
