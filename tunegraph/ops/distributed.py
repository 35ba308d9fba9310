"""The recipe's sharding keys as transformers' TrainingArguments, and DeepSpeed config lookup.

    sharding_arguments(recipe)        -> {"fsdp": [...], "fsdp_config": {...}} or {"deepspeed": path}
    resolve_deepspeed_config(recipe)  -> Path of the JSON file `deepspeed:` names

transformers and accelerate do the sharding (FSDP2 `fully_shard`, DeepSpeed ZeRO); this module
only translates Axolotl's keys into their arguments, so one recipe key keeps one meaning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunegraph.config import Recipe

# Stock DeepSpeed configs (ZeRO 1/2/3, bf16, CPU offload), named as Axolotl's deepspeed_configs/.
STOCK_DEEPSPEED = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"


def resolve_deepspeed_config(recipe: Recipe) -> Path:
    """The file `deepspeed:` names: relative to the recipe, then the working folder, then a stock
    config of that file name (so Axolotl's `deepspeed_configs/zero3.json` works as it is)."""
    assert recipe.deepspeed is not None
    named = Path(recipe.deepspeed).expanduser()
    candidates = [named] if named.is_absolute() else [recipe.base_dir / named, Path.cwd() / named]
    candidates.append(STOCK_DEEPSPEED / named.name)
    for candidate in candidates:
        if candidate.is_file():
            try:
                json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"deepspeed: {candidate} is not valid JSON: {exc}") from exc
            return candidate.resolve()
    stock = ", ".join(sorted(p.name for p in STOCK_DEEPSPEED.glob("*.json")))
    raise ValueError(f"deepspeed: {recipe.deepspeed} not found (looked in "
                     f"{', '.join(str(c) for c in candidates)}); stock configs: {stock}")


def deepspeed_fingerprint(recipe: Recipe) -> dict[str, Any] | None:
    """The DeepSpeed config's content, for the training key (editing the JSON retrains)."""
    if recipe.deepspeed is None:
        return None
    return json.loads(resolve_deepspeed_config(recipe).read_text())


def fsdp_config(recipe: Recipe) -> dict[str, Any]:
    """transformers' `fsdp_config` from the recipe (its key names, without `fsdp_`)."""
    settings = recipe.fsdp_config
    config: dict[str, Any] = {"version": recipe.fsdp_major}
    if settings is None:
        return config
    config.update(auto_wrap_policy=settings.auto_wrap_policy,
                  state_dict_type=settings.state_dict_type,
                  reshard_after_forward=settings.reshard_after_forward,
                  cpu_offload=settings.offload_params,
                  activation_checkpointing=settings.activation_checkpointing,
                  cpu_ram_efficient_loading=settings.cpu_ram_efficient_loading)
    if settings.transformer_layer_cls_to_wrap:
        layers = settings.transformer_layer_cls_to_wrap
        config["transformer_layer_cls_to_wrap"] = [layers] if isinstance(layers, str) else layers
    if settings.min_num_params:
        config["min_num_params"] = settings.min_num_params
    if recipe.fsdp_major == 1:
        config.update(sync_module_states=settings.sync_module_states,
                      use_orig_params=settings.use_orig_params,
                      limit_all_gathers=settings.limit_all_gathers,
                      forward_prefetch=settings.forward_prefetch,
                      backward_prefetch=settings.backward_prefetch or "NO_PREFETCH")
        if settings.sharding_strategy:
            config["reshard_after_forward"] = settings.sharding_strategy.lower()
    return config


def sharding_arguments(recipe: Recipe) -> dict[str, Any]:
    """TrainingArguments keywords for FSDP, DeepSpeed and DDP settings the recipe sets."""
    import torch

    arguments: dict[str, Any] = {}
    engine = "fsdp" if recipe.fsdp else "deepspeed" if recipe.deepspeed else None
    if engine and not torch.cuda.is_available():
        # accelerate turns FSDP on for GPU back ends only and would silently fall back to DDP
        # on CPUs; DeepSpeed needs an accelerator too.
        raise ValueError(f"{engine}: sharded training runs on CUDA GPUs and this machine has "
                         f"none; remove {engine} to train with DDP on CPU processes")
    if recipe.fsdp:
        # The option list still works on transformers 5.0-5.19 (5.19 prefers fsdp=True with
        # everything in fsdp_config; fsdp_config is filled either way, so both read the same).
        arguments.update(fsdp=list(recipe.fsdp), fsdp_config=fsdp_config(recipe))
    if recipe.deepspeed:
        arguments["deepspeed"] = str(resolve_deepspeed_config(recipe))
    for key in ("ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers"):
        if getattr(recipe, key) is not None:
            arguments[key] = getattr(recipe, key)
    return arguments
