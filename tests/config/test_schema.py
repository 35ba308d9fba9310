"""The recipe schema (tunegraph.config.schema): types, supported values, cross-field rules, and how
keys are grouped into concerns (which decides what each stage hashes)."""

from __future__ import annotations

from typing import Any

import pytest

from tunegraph.config import TINY_LLAMA, Recipe, RecipeError, recipe_from_mapping
from tunegraph.config.schema import (
    AdapterConcern,
    DataConcern,
    TokenizerConcern,
    TrainingConcern,
)

DATA = [{"path": "data.jsonl", "type": "alpaca"}]


def build(**keys: Any) -> Recipe:
    raw = {"base_model": TINY_LLAMA, "learning_rate": 1e-3, "datasets": DATA, **keys}
    return recipe_from_mapping(raw, source="test.yaml", name="t")


def problems(**keys: Any) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        build(**keys)
    assert str(caught.value).startswith("recipe test.yaml is invalid:\n")
    return caught.value.problems


def test_defaults():
    recipe = build()
    assert (recipe.micro_batch_size, recipe.sequence_len, recipe.optimizer) == (1, 2048,
                                                                                 "adamw_torch")
    assert recipe.tiny_model is not None and recipe.tiny_model.hidden_size == 64
    assert recipe.adapter is None and not recipe.is_lora
    assert recipe.data_seed == recipe.seed == 42
    assert build(dataset_seed=7).data_seed == 7


@pytest.mark.parametrize(("keys", "message"), [
    ({"micro_batch_size": "two"},
     "micro_batch_size: Input should be a valid integer, unable to parse string as an integer"),
    ({"micro_batch_size": 0}, "micro_batch_size: Input should be greater than or equal to 1"),
    ({"learning_rate": "fast"}, "learning_rate: Input should be a valid number"),
    ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
    ({"gradient_checkpointing": "offload"}, "gradient_checkpointing: 'offload' is an Axolotl "
                                            "value that tunegraph does not support yet"),
    ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing: unknown value 'sometimes'"),
    ({"datasets": "data.jsonl"}, "datasets: Input should be a valid list"),
    ({"datasets": []}, "datasets: List should have at least 1 item after validation"),
    ({"datasets": [{"path": "d.jsonl", "type": 3}]}, "datasets[0].type"),
    ({"lora_target_modules": 3, "adapter": "lora"}, "lora_target_modules"),
    ({"special_tokens": {"pad": "<pad>"}}, "special_tokens.pad: unknown special token "
                                           "(allowed: bos_token, eos_token, pad_token, "
                                           "unk_token)"),
    ({"tiny_model": {"hidden_size": 30}}, "tiny_model.hidden_size must be divisible by "
                                          "tiny_model.num_attention_heads"),
    ({"attn_implementation": "fast"}, "attn_implementation: unknown value 'fast' (supported: "
                                      "eager, sdpa, flash_attention_2"),
])
def test_wrong_types_and_ranges_name_the_key(keys, message):
    found = problems(**keys)
    assert any(message in p for p in found), found


def test_missing_required_keys():
    with pytest.raises(RecipeError) as caught:
        recipe_from_mapping({}, source="empty.yaml", name="t")
    assert sorted(caught.value.problems) == ["base_model: Field required",
                                             "datasets: Field required",
                                             "learning_rate: Field required"]


@pytest.mark.parametrize(("keys", "key", "value", "supported"), [
    ({"adapter": "qlora"}, "adapter", "qlora", "lora"),
    ({"optimizer": "adamw_8bit"}, "optimizer", "adamw_8bit",
     "adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, rmsprop"),
    ({"lr_scheduler": "one_cycle"}, "lr_scheduler", "one_cycle", "linear, cosine"),
    ({"chat_template": "deepseek_v3"}, "chat_template", "deepseek_v3",
     "tokenizer_default, jinja, chatml"),
    ({"datasets": [{"path": "d.jsonl", "type": "sharegpt"}]}, "datasets[0].type", "sharegpt",
     "alpaca, alpaca_chat"),
    ({"datasets": [{"path": "d.jsonl", "type": "chat_template", "chat_template": "gemma3n"}]},
     "datasets[0].chat_template", "gemma3n", "tokenizer_default, jinja, chatml"),
])
def test_axolotl_only_values_are_not_supported_yet(keys, key, value, supported):
    (problem,) = problems(**keys)
    assert problem.startswith(f"{key}: ")
    assert (f"'{value}' is an Axolotl value that tunegraph does not support yet "
            f"(supported: {supported}") in problem


def test_unknown_values_are_told_apart_from_axolotl_values():
    (problem,) = problems(optimizer="adamw_9bit")
    assert problem.startswith("optimizer: unknown value 'adamw_9bit' (supported: adamw_torch")


@pytest.mark.parametrize(("keys", "message"), [
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio are both set: "
                                                "choose one"),
    ({"save_steps": 10, "saves_per_epoch": 2}, "save_steps and saves_per_epoch are both set"),
    ({"eval_steps": 10, "evals_per_epoch": 2}, "eval_steps and evals_per_epoch are both set"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true: choose one"),
    ({"flash_attention": True, "sdp_attention": True}, "flash_attention and sdp_attention are "
                                                       "both true: choose one"),
    ({"lora_r": 16}, "lora_r set but adapter is not set: add adapter: lora, or remove them for a "
                     "full fine-tune"),
    ({"lora_r": 16, "lora_target_linear": True}, "lora_r, lora_target_linear set but adapter is "
                                                 "not set"),
    ({"base_model": "NousResearch/Llama-3.2-1B", "tiny_model": {"hidden_size": 64}},
     "tiny_model is set but base_model is 'NousResearch/Llama-3.2-1B', not "
     "'tunegraph:tiny-llama'"),
    ({"chat_template": "jinja"}, "chat_template is 'jinja' but chat_template_jinja is not set"),
    ({"chat_template": "chatml", "chat_template_jinja": "{{ x }}"},
     "chat_template_jinja is set but chat_template is 'chatml': set chat_template: jinja"),
    ({"datasets": [{"path": "d.jsonl", "type": "alpaca", "field": "text"}]},
     "datasets[0].field is for type completion, not 'alpaca'"),
])
def test_cross_field_rules(keys, message):
    found = problems(**keys)
    assert any(message in p for p in found), found


def test_cross_field_defaults():
    assert build(chat_template_jinja="{{ x }}").chat_template == "jinja"
    assert build(flash_attention=True).resolved_attn_implementation == "flash_attention_2"
    assert build(sdp_attention=True).resolved_attn_implementation == "sdpa"
    assert build(attn_implementation="eager", sdp_attention=True
                 ).resolved_attn_implementation == "eager"
    # lora_* at their "off" values do not need an adapter.
    assert build(lora_target_linear=False, lora_modules_to_save=[]).adapter is None


def test_strict_is_accepted_either_way_and_changes_nothing_else():
    # Axolotl's strictness flag: tunegraph is always strict, so both values load the same recipe.
    loose, strict = build(strict=False), build(strict=True)
    assert loose.model_dump(exclude={"strict"}) == strict.model_dump(exclude={"strict"})
    assert any("zzz: unknown key" in p for p in problems(strict=False, zzz=1))
    # No stage hashes it: it belongs to no concern.
    assert all("strict" not in concern.model_fields
               for concern in (DataConcern, TokenizerConcern, AdapterConcern, TrainingConcern))


def test_concerns_split_tokenization_keys_from_training_keys():
    tokenization = set(Recipe.concern_fields(DataConcern)) | set(
        Recipe.concern_fields(TokenizerConcern))
    training = set(Recipe.concern_fields(TrainingConcern))
    assert {"sequence_len", "chat_template", "datasets", "train_on_inputs"} <= tokenization
    assert {"learning_rate", "pad_to_sequence_len", "group_by_length",
            "loss_watchdog_threshold"} <= training
    assert not tokenization & training
    recipe = build()
    assert "learning_rate" not in recipe.concern_values(DataConcern, TokenizerConcern)
    values = recipe.concern_values(TrainingConcern)
    assert list(values) == sorted(values) and values["learning_rate"] == 1e-3


def test_every_field_documents_its_type_and_default():
    for name, field in Recipe.model_fields.items():
        assert field.description, name
