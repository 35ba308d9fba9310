"""Kernel recipe keys (tunegraph.config.kernels): Axolotl's liger_* names and the kernels: block
resolve to one set of options, contradictions and typos are errors naming the key, the keys
change the training stage's hash and nothing upstream of it."""

from __future__ import annotations

from typing import Any

import pytest

from tunegraph.config import TINY_LLAMA, Recipe, RecipeError, recipe_from_mapping
from tunegraph.config.schema import DataConcern, TokenizerConcern

DATA = [{"path": "data.jsonl", "type": "alpaca"}]


def build(**keys: Any) -> Recipe:
    raw = {"base_model": TINY_LLAMA, "learning_rate": 1e-3, "datasets": DATA, **keys}
    return recipe_from_mapping(raw, source="test.yaml", name="t")


def problems(**keys: Any) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        build(**keys)
    return caught.value.problems


def switches(recipe: Recipe) -> dict[str, bool]:
    options = recipe.kernel_options()
    return {op: getattr(options, op) for op in ("rms_norm", "glu", "rope",
                                                "fused_linear_cross_entropy")}


def test_off_by_default():
    options = build().kernel_options()
    assert not options.any_on and options.recipe_keys == {}


def test_axolotl_names_and_the_block_mean_the_same():
    liger = build(liger_rms_norm=True, liger_glu_activation=True, liger_rope=True,
                  liger_fused_linear_cross_entropy=True)
    block = build(kernels={"rms_norm": True, "glu": True, "rope": True,
                           "fused_linear_cross_entropy": True})
    assert switches(liger) == switches(block) == dict.fromkeys(switches(liger), True)
    assert liger.kernel_options().recipe_keys == {
        "rms_norm": "liger_rms_norm", "glu": "liger_glu_activation", "rope": "liger_rope",
        "fused_linear_cross_entropy": "liger_fused_linear_cross_entropy"}
    assert block.kernel_options().recipe_keys["rope"] == "kernels.rope"
    # Axolotl's older name for the GLU switch; an empty block; off values.
    assert switches(build(liger_swiglu=True))["glu"]
    assert not build(kernels={}, liger_rope=False).kernel_options().any_on
    assert build(liger_rope=True, kernels={"rope": True}).kernel_options().rope


def test_contradictions_and_typos_are_errors_naming_the_keys():
    [problem] = problems(liger_rope=True, kernels={"rope": False})
    assert "kernels.rope and liger_rope disagree" in problem
    [problem] = problems(kernels={"rms_nrom": True})
    assert "kernels.rms_nrom: unknown key (did you mean 'rms_norm'?)" in problem
    # Liger keys tunegraph has no kernel for stay "known to Axolotl but not supported".
    [problem] = problems(liger_layer_norm=True)
    assert "liger_layer_norm: known to Axolotl but not supported by tunegraph yet" in problem


def test_kernel_keys_change_the_training_hash_only():
    from tunegraph.ops.stages import training_key_values

    plain, with_kernels = build(), build(liger_rope=True)
    assert training_key_values(plain) != training_key_values(with_kernels)
    assert training_key_values(with_kernels)["kernels"]["rope"] is True
    # One setting, two spellings: one key. No kernel on: no kernel entry (keys stay as before).
    assert training_key_values(with_kernels) == training_key_values(build(kernels={"rope": True}))
    assert not {"kernels", "liger_rope"} & set(training_key_values(plain))
    assert (plain.concern_values(DataConcern, TokenizerConcern)
            == with_kernels.concern_values(DataConcern, TokenizerConcern))


def test_lora_and_moe_kernel_keys():
    axolotl = build(adapter="lora", lora_mlp_kernel=True, lora_qkv_kernel=True,
                    lora_o_kernel=True, use_kernels=True, use_scattermoe=True)
    options = axolotl.kernel_options()
    assert options.lora_mlp and options.lora_qkv and options.lora_o and options.moe
    assert options.lora_on and options.recipe_keys["moe"] == "use_scattermoe"
    block = build(adapter="lora", kernels={"lora_qkv": True})
    assert block.kernel_options().lora_on and not block.kernel_options().lora_mlp
    assert not build(kernels={"moe": True}).kernel_options().lora_on
    # Axolotl's scattermoe switch needs its plugin switch; use_kernels alone means HF's hub.
    [problem] = problems(use_scattermoe=True)
    assert "use_scattermoe: true needs use_kernels: true" in problem
    [problem] = problems(use_kernels=True)
    assert "use_kernels: true without use_scattermoe" in problem

