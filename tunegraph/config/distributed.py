"""Training on several processes: FSDP (1 or 2) or DeepSpeed ZeRO, and DDP's settings.

The keys only say *how* to shard; how many processes run is the launcher's business (`tunegraph
materialize --launcher torchrun --num-processes 2`, or the Dagster `launcher` resource), as with
`accelerate launch` / `axolotl train --num-processes` in Axolotl. Axolotl's spellings are accepted:
`fsdp: [full_shard, auto_wrap]`, and `fsdp_config` keys with or without the `fsdp_` prefix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunegraph.config.base import StrictModel

# transformers' `fsdp` options (TrainingArguments.fsdp), as Axolotl passes them.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard",
                "offload", "auto_wrap")


class FSDPConfig(StrictModel):
    """`fsdp_config:`, Axolotl's keys without their `fsdp_` prefix (both spellings load)."""

    version: Literal[1, 2] | None = Field(None, description="int, default the recipe's "
                                                            "fsdp_version (2): FSDP1 or FSDP2 "
                                                            "(torch fully_shard).")
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="str, default TRANSFORMER_BASED_WRAP: shard unit; "
                                              "one per decoder layer by default.")
    transformer_layer_cls_to_wrap: str | list[str] | None = Field(
        None, description="str or list, default the model's `_no_split_modules` (e.g. "
                          "LlamaDecoderLayer): decoder layer class(es) to wrap.")
    min_num_params: int | None = Field(None, ge=1, description="int: parameters per unit with "
                                                               "SIZE_BASED_WRAP.")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "FULL_STATE_DICT", description="str, default FULL_STATE_DICT: how checkpoints are "
                                       "written; FULL_STATE_DICT checkpoints load with plain "
                                       "from_pretrained.")
    reshard_after_forward: bool = Field(True, description="bool, default true: free gathered "
                                                          "parameters after forward (ZeRO-3 "
                                                          "style); false keeps them (ZeRO-2).")
    offload_params: bool = Field(False, description="bool, default false: keep parameters and "
                                                    "optimizer state in CPU memory.")
    activation_checkpointing: bool = Field(False, description="bool, default false: FSDP's "
                                                              "activation checkpointing.")
    cpu_ram_efficient_loading: bool = Field(False, description="bool, default false: only rank 0 "
                                                               "loads weights; others receive "
                                                               "them.")
    sync_module_states: bool = Field(True, description="bool, default true: broadcast rank 0's "
                                                       "weights at start.")
    use_orig_params: bool = Field(True, description="bool, default true (FSDP1 only).")
    limit_all_gathers: bool = Field(True, description="bool, default true (FSDP1 only).")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] | None \
        = Field(None, description="str (FSDP1 only): the strategy, else taken from `fsdp`.")
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"] | None = Field(
        None, description="str (FSDP1 only).")
    forward_prefetch: bool = Field(False, description="bool, default false (FSDP1 only).")

    @model_validator(mode="before")
    @classmethod
    def _strip_prefix(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = key[len("fsdp_"):] if isinstance(key, str) and key.startswith("fsdp_") else key
            if name in out:
                raise ValueError(f"fsdp_config: {key} given twice (with and without 'fsdp_')")
            out[name] = value
        return out


class DistributedConcern(StrictModel):
    """Sharding across processes. None of these start processes; the launcher does."""

    fsdp: list[str] | None = Field(None, description="list (or space-separated str), default "
                                                     "none: FSDP options, e.g. [full_shard, "
                                                     "auto_wrap].")
    fsdp_version: Literal[1, 2] | None = Field(None, description="int, default 2 when fsdp is "
                                                                 "set: FSDP1 or FSDP2.")
    fsdp_config: FSDPConfig | None = Field(None, description="mapping: FSDP settings (see "
                                                             "FSDPConfig).")
    deepspeed: str | None = Field(None, description="str, default none: a DeepSpeed JSON config "
                                                    "(path relative to the recipe, or a stock "
                                                    "one by name: zero1.json, zero2.json, "
                                                    "zero3.json, zero3_bf16.json, ... from "
                                                    "examples/deepspeed/).")
    ddp_timeout: int | None = Field(None, ge=1, description="int, seconds, default transformers' "
                                                            "1800: collective-operation timeout.")
    ddp_bucket_cap_mb: int | None = Field(None, ge=1, description="int, MB, default DDP's 25: "
                                                                  "gradient bucket size.")
    ddp_broadcast_buffers: bool | None = Field(None, description="bool, default DDP's: broadcast "
                                                                 "buffers each step.")

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list):
            unknown = [v for v in value if v not in FSDP_OPTIONS]
            if unknown:
                raise ValueError(f"fsdp: unknown option(s) {', '.join(map(str, unknown))} "
                                 f"(supported: {', '.join(FSDP_OPTIONS)})")
            return value or None
        return value

    @field_validator("fsdp_config", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == {} else value  # `fsdp_config: {}` asks for nothing

    @model_validator(mode="after")
    def _one_strategy(self) -> DistributedConcern:
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed are both set: pick one sharding engine")
        if (self.fsdp_config is not None or self.fsdp_version is not None) and not self.fsdp:
            raise ValueError("fsdp_config/fsdp_version set but fsdp is not: add "
                             "fsdp: [full_shard, auto_wrap]")
        if self.fsdp_config and self.fsdp_config.version and self.fsdp_version \
                and self.fsdp_config.version != self.fsdp_version:
            raise ValueError(f"fsdp_version {self.fsdp_version} and fsdp_config.fsdp_version "
                             f"{self.fsdp_config.version} disagree")
        return self

    @property
    def fsdp_major(self) -> int | None:
        """1 or 2 when FSDP is on (2 unless a recipe asks for 1), else None."""
        if not self.fsdp:
            return None
        return self.fsdp_version or (self.fsdp_config.version if self.fsdp_config else None) or 2
