"""merge_lora against base+adapter (unmerged) and against PEFT's merge_and_unload run here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.base_model import build_tiny_model, load_model, load_tokenizer
from tunegraph.ops.data import iter_texts
from tunegraph.ops.merge import max_logit_difference, merge_lora
from tunegraph.ops.train import add_lora

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320}
# The merged-model asset check's tolerance: fp32 logits of W x + s B A x vs (W + s B A) x.
LOGIT_TOL = 1e-5
TEXTS = ["the hot and the cold", "milk is white", "what comes after 41", "sky"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "learning_rate": 1e-3,
           "datasets": [{"path": "data.jsonl", "type": "completion"}], "adapter": "lora",
           "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge")
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": text}) + "\n"
                                               for text in TEXTS * 5))
    recipe = make(folder)
    build_tiny_model(recipe, iter_texts(recipe), folder / "base")
    return folder / "base"


def write_adapter(recipe: Recipe, base_dir: Path, adapter_dir: Path) -> None:
    """An adapter as train() saves it, with every lora_B (zero at initialisation, which would
    make merging trivially exact) and any modules_to_save copy moved to random values."""
    torch.manual_seed(0)
    model = add_lora(recipe, load_model(recipe, base_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
            elif "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(adapter_dir, safe_serialization=True)
    load_tokenizer(recipe, base_dir).save_pretrained(adapter_dir)


@pytest.fixture(scope="module", params=[None, ["lm_head"]], ids=["lora", "lora+lm_head"])
def merged(request, base_dir, tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("merged")
    keys = {"lora_modules_to_save": request.param} if request.param else {}
    recipe = make(base_dir.parent, **keys)
    write_adapter(recipe, base_dir, folder / "adapter")
    merge_lora(recipe, base_dir, folder / "adapter", folder / "merged")
    return {"recipe": recipe, "adapter_dir": folder / "adapter", "merged_dir": folder / "merged",
            "modules_to_save": request.param}


def input_rows(base_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


@torch.no_grad()
def logits(model: torch.nn.Module, rows: list[list[int]]) -> list[torch.Tensor]:
    return [model.eval()(input_ids=torch.tensor([ids])).logits for ids in rows]


def test_merged_logits_equal_base_plus_adapter(merged, base_dir):
    rows = input_rows(base_dir)
    diff = max_logit_difference(merged["recipe"], base_dir, merged["adapter_dir"],
                                merged["merged_dir"], rows)
    assert diff < LOGIT_TOL
    # Not vacuous: the adapter moves the logits far more than the tolerance.
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir), rows)
    merged_model = logits(AutoModelForCausalLM.from_pretrained(merged["merged_dir"]), rows)
    assert max(float((a - b).abs().max()) for a, b in zip(base, merged_model, strict=True)) > 1e-2


def test_merged_folder_is_a_plain_transformers_model(merged):
    model, info = AutoModelForCausalLM.from_pretrained(merged["merged_dir"],
                                                       output_loading_info=True)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert not any("lora" in name or "modules_to_save" in name
                   for name in load_file(merged["merged_dir"] / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(merged["merged_dir"])
    assert tokenizer.chat_template and tokenizer.pad_token == "<pad>"


def test_weights_equal_peft_merge_and_unload(merged, base_dir):
    """STYLE 8: the outside implementation is PEFT's merge, run here on its own."""
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                          merged["adapter_dir"]).merge_and_unload()
    expected = reference.state_dict()
    actual = load_file(merged["merged_dir"] / "model.safetensors")
    assert set(actual) == set(expected)
    for name, tensor in actual.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_one_merged_weight_by_hand(merged, base_dir):
    """W + (lora_alpha / r) * B @ A for one projection, from the saved files alone."""
    adapter = load_file(merged["adapter_dir"] / "adapter_model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    actual = load_file(merged["merged_dir"] / "model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    lora_a, lora_b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    scale = merged["recipe"].lora_alpha / merged["recipe"].lora_r
    expected = base["model.layers.1.self_attn.q_proj.weight"] + scale * lora_b @ lora_a
    torch.testing.assert_close(actual["model.layers.1.self_attn.q_proj.weight"], expected,
                               rtol=0, atol=1e-6)  # fp32 rounding of a rank-4 product
    if merged["modules_to_save"]:
        # The trained copy of lm_head replaces the base head (it is not a LoRA delta).
        [head_key] = [k for k in adapter if k.endswith("lm_head.weight")]
        torch.testing.assert_close(actual["lm_head.weight"], adapter[head_key], rtol=0, atol=0)
        assert not torch.equal(actual["lm_head.weight"], base["lm_head.weight"])
    else:
        torch.testing.assert_close(actual["lm_head.weight"], base["lm_head.weight"], rtol=0, atol=0)
