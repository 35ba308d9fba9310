"""The sharding keys: Axolotl's spellings load, mistakes name the key, and they reach
transformers' TrainingArguments as transformers documents them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tunegraph.config import RecipeError, recipe_from_mapping
from tunegraph.ops.distributed import STOCK_DEEPSPEED, resolve_deepspeed_config, sharding_arguments
from tunegraph.ops.stages import training_key_values

AXOLOTL_CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "axolotl-configs"


def recipe(tmp_path: Path, **keys):
    raw = {"base_model": "tunegraph:tiny-llama", "learning_rate": 1e-4, "datasets": [{"path": "d.jsonl",
                                                               "type": "alpaca"}], **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=tmp_path / "r.yaml")


def test_axolotl_fsdp_block_loads_with_and_without_prefix(tmp_path):
    prefixed = recipe(tmp_path, fsdp=["full_shard", "auto_wrap"], fsdp_config={
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": True,
        "fsdp_reshard_after_forward": True})
    plain = recipe(tmp_path, fsdp="full_shard auto_wrap", fsdp_config={
        "version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "offload_params": True})
    assert prefixed.fsdp == plain.fsdp == ["full_shard", "auto_wrap"]
    assert prefixed.fsdp_config == plain.fsdp_config
    assert prefixed.fsdp_major == 2


@pytest.mark.parametrize("keys, message", [
    ({"fsdp": ["full_shard", "zero3"]}, "fsdp: unknown option(s) zero3"),
    ({"fsdp": ["full_shard"], "deepspeed": "zero3.json"}, "pick one sharding engine"),
    ({"fsdp_config": {"version": 2}}, "fsdp_config/fsdp_version set but fsdp is not"),
    ({"fsdp": ["full_shard"], "fsdp_version": 1, "fsdp_config": {"fsdp_version": 2}},
     "disagree"),
    ({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_state_dict_type": "LOCAL"}},
     "state_dict_type"),
    ({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_wrap_evrything": True}},
     "wrap_evrything"),
])
def test_mistakes_name_the_key(tmp_path, keys, message):
    with pytest.raises(RecipeError) as error:
        recipe(tmp_path, **keys)
    assert message in str(error.value)


def test_fsdp_reaches_training_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaded = recipe(tmp_path, fsdp=["full_shard", "auto_wrap"], fsdp_config={
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_offload_params": True,
        "fsdp_activation_checkpointing": True}, ddp_timeout=600)
    arguments = sharding_arguments(loaded)
    assert arguments["fsdp"] == ["full_shard", "auto_wrap"]
    assert arguments["fsdp_config"] == {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
        "cpu_offload": True, "activation_checkpointing": True,
        "cpu_ram_efficient_loading": False, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert arguments["ddp_timeout"] == 600


def test_sharding_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="deepspeed: sharded training runs on CUDA GPUs"):
        sharding_arguments(recipe(tmp_path, deepspeed="zero2.json"))


def test_deepspeed_configs_resolve_like_axolotl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Axolotl's recipes name `deepspeed_configs/zero3_bf16.json` in its repository: the stock
    # config of that name is used.
    stock = resolve_deepspeed_config(recipe(tmp_path, deepspeed="deepspeed_configs/zero3_bf16.json"))
    assert stock == STOCK_DEEPSPEED / "zero3_bf16.json"
    # A file beside the recipe wins over the stock one.
    (tmp_path / "deepspeed_configs").mkdir()
    mine = tmp_path / "deepspeed_configs" / "zero3_bf16.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert resolve_deepspeed_config(recipe(tmp_path, deepspeed="deepspeed_configs/zero3_bf16.json")
                                    ) == mine
    with pytest.raises(ValueError, match="deepspeed: zero4.json not found .* stock configs: zero1"):
        resolve_deepspeed_config(recipe(tmp_path, deepspeed="zero4.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="deepspeed: .*broken.json is not valid JSON"):
        resolve_deepspeed_config(recipe(tmp_path, deepspeed="broken.json"))


def test_stock_deepspeed_configs_are_zero_1_2_3():
    stages = {p.name: json.loads(p.read_text())["zero_optimization"]["stage"]
              for p in STOCK_DEEPSPEED.glob("*.json")}
    assert stages["zero1.json"] == 1 and stages["zero2.json"] == 2 and stages["zero3.json"] == 3
    assert set(stages) >= {"zero3_bf16.json", "zero3_bf16_cpuoffload_params.json",
                           "zero3_bf16_cpuoffload_all.json"}


def test_training_key_hashes_sharding_only_when_set(tmp_path):
    plain = training_key_values(recipe(tmp_path))
    assert not {"fsdp", "fsdp_config", "deepspeed", "ddp_timeout"} & set(plain)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    sharded = training_key_values(recipe(tmp_path, deepspeed="ds.json"))
    assert sharded["deepspeed_config"] == {"zero_optimization": {"stage": 2}}
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert training_key_values(recipe(tmp_path, deepspeed="ds.json")) != sharded


@pytest.mark.skipif(not AXOLOTL_CONFIGS.is_dir(), reason="needs ../shared/axolotl-configs")
@pytest.mark.parametrize("name", ["llama-3__qlora-fsdp-70b.yaml",
                                  "mistral__bigstral__bigstral-ds-zero3.yaml",
                                  "mistral__mixtral__mixtral.yml"])
def test_axolotl_sharding_keys_are_no_longer_refused(name):
    raw = yaml.safe_load((AXOLOTL_CONFIGS / name).read_text())
    with pytest.raises(RecipeError) as error:  # they still fail, for qlora / 8-bit optimizers
        recipe_from_mapping(raw, source=name, name="x")
    problems = [line.strip("- ").split(":")[0] for line in str(error.value).splitlines()[1:]]
    assert not {"fsdp", "fsdp_config", "deepspeed"} & set(problems), problems
    assert problems, "the recipe failed for nothing"
