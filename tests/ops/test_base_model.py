"""Base models: the seeded tiny Llama, loading through from_pretrained, tokenizer set-up, and
local-folder / hub base models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaForCausalLM

from tunegraph.config import recipe_from_mapping
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.base_model import build_tiny_model, load_model, load_tokenizer, locate_pretrained
from tunegraph.ops.data import iter_texts
from tunegraph.ops.hashing import hash_file
from tunegraph.ops.stages import base_model_stage, model_dir
from tunegraph.ops.templates import CHATML

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Holds data.jsonl (the recipe's data) and tiny/ (a tiny model built from it, seed 3)."""
    root = tmp_path_factory.mktemp("base_model")
    words = "hot cold big small milk ink sky blue red green one two three".split()
    (root / "data.jsonl").write_text("".join(
        json.dumps({"text": f"the {a} and the {b} are {c}"}) + "\n"
        for a, b, c in zip(words, words[3:] + words[:3], words[5:] + words[:5], strict=True)))
    recipe = make(root)
    build_tiny_model(recipe, iter_texts(recipe), root / "tiny")
    return root


def make(root: Path, **keys: Any):
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "seed": 3,
           "learning_rate": 1e-3, "datasets": [{"path": "data.jsonl", "type": "completion"}],
           **keys}
    if raw["base_model"] != "tunegraph:tiny-llama":
        raw.pop("tiny_model")
    return recipe_from_mapping(raw, source="test", name="t", source_path=root / "r.yaml")


def file_hashes(directory: Path) -> dict[str, str]:
    return {name: hash_file(directory / name) for name in ("model.safetensors", "tokenizer.json")}


def test_tiny_model_is_deterministic_per_seed(folder, tmp_path):
    recipe = make(folder)
    build_tiny_model(recipe, iter_texts(recipe), tmp_path / "again")
    other_seed = make(folder, seed=4)
    build_tiny_model(other_seed, iter_texts(other_seed), tmp_path / "seed4")
    assert file_hashes(tmp_path / "again") == file_hashes(folder / "tiny")
    seed4 = file_hashes(tmp_path / "seed4")
    assert seed4["model.safetensors"] != file_hashes(folder / "tiny")["model.safetensors"]
    # The tokenizer is trained on the data alone, so the seed does not change it.
    assert seed4["tokenizer.json"] == file_hashes(folder / "tiny")["tokenizer.json"]


def test_tiny_model_loads_through_from_pretrained(folder):
    recipe = make(folder)
    model = load_model(recipe, folder / "tiny")
    tokenizer = load_tokenizer(recipe, folder / "tiny")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    assert model.config.vocab_size == len(tokenizer) <= 320  # BPE stops when no pair repeats
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template == CHATML
    ids = tokenizer("the hot and the cold")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_model_type_picks_the_class(folder):
    assert isinstance(load_model(make(folder, model_type="LlamaForCausalLM"), folder / "tiny"),
                      LlamaForCausalLM)
    with pytest.raises(ValueError, match="model_type: transformers has no class 'NoSuchModel'"):
        load_model(make(folder, model_type="NoSuchModel"), folder / "tiny")


def test_special_tokens(folder):
    tokenizer = load_tokenizer(make(folder, special_tokens={"pad_token": "</s>"}), folder / "tiny")
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="special_tokens.pad_token: '<nope>' is not in"):
        load_tokenizer(make(folder, special_tokens={"pad_token": "<nope>"}), folder / "tiny")


@pytest.mark.parametrize(("keys", "dataset_template", "expected"), [
    ({}, None, CHATML),                                       # unset: the tokenizer's own
    ({"chat_template": "tokenizer_default"}, None, CHATML),
    ({"chat_template": "chatml"}, None, CHATML),
    ({"chat_template_jinja": "{{ 'J' }}"}, None, "{{ 'J' }}"),  # implies chat_template: jinja
    ({"chat_template_jinja": "{{ 'J' }}"}, "chatml", CHATML),   # a dataset's template wins
])
def test_chat_template_choices(folder, keys, dataset_template, expected):
    tokenizer = load_tokenizer(make(folder, **keys), folder / "tiny", chat_template=dataset_template)
    assert tokenizer.chat_template == expected


def test_tokenizer_without_template_or_pad(folder, tmp_path):
    tokenizer = load_tokenizer(make(folder), folder / "tiny")
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chat_template: tokenizer_default, but the tokenizer "
                                         "has no chat template; set chat_template: chatml"):
        load_tokenizer(make(folder, chat_template="tokenizer_default"), tmp_path)
    loaded = load_tokenizer(make(folder), tmp_path)  # unset template: fine for non-chat data
    assert loaded.chat_template is None
    assert loaded.pad_token == loaded.eos_token == "</s>"  # no pad token: EOS pads
    assert load_tokenizer(make(folder, chat_template="chatml"), tmp_path).chat_template == CHATML


def test_local_directory_base_model(folder, tmp_path):
    recipe = make(folder, base_model=str(folder / "tiny"))
    assert locate_pretrained(recipe) == (folder / "tiny").resolve()
    store = ArtifactStore(tmp_path / "store")
    first = base_model_stage(recipe, store, "tiny-local")
    assert not first.cache_hit
    # The store holds a reference, not a copy of the weights.
    assert model_dir(first.artifact) == (folder / "tiny").resolve()
    assert not (first.artifact.path / "model.safetensors").exists()
    second = base_model_stage(recipe, store, "tiny-local")
    assert second.cache_hit and second.artifact.key == first.artifact.key
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        via_stage = load_model(recipe, model_dir(first.artifact))(input_ids=ids).logits
        direct = LlamaForCausalLM.from_pretrained(folder / "tiny")(input_ids=ids).logits
    torch.testing.assert_close(via_stage, direct, rtol=0, atol=0)
    assert load_tokenizer(recipe, model_dir(first.artifact)).chat_template == CHATML


def test_unknown_hub_model_is_a_value_error(folder, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = make(folder, base_model="tunegraph-tests/no-such-model")
    with pytest.raises(ValueError, match="base_model: could not find "
                                         "'tunegraph-tests/no-such-model'"):
        locate_pretrained(recipe)
