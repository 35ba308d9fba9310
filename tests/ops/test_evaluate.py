"""Held-out loss against hand computations and HF's own loss; exact-match against a greedy
decode written here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tunegraph.config import Recipe, recipe_from_mapping
from tunegraph.ops.artifacts import ArtifactStore
from tunegraph.ops.base_model import load_model, load_tokenizer
from tunegraph.ops.evaluate import evaluate, exact_match, heldout_loss
from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.stages import base_model_stage, model_dir, tokenized_stage
from tunegraph.ops.tokenize import load_tokenized

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}
# fp32 sums of a few hundred log-probabilities, taken in another order or batch shape.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(folder: Path, **keys: Any) -> Recipe:
    raw = {"base_model": "tunegraph:tiny-llama", "tiny_model": TINY, "learning_rate": 1e-3,
           "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "sequence_len": 64,
           "val_set_size": 6, "micro_batch_size": 4, "eval_max_new_tokens": 4,
           "eval_generation_rows": 3, **keys}
    return recipe_from_mapping(raw, source="test", name="t", source_path=folder / "r.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("evaluate")
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w}
            for w in "hot cold big small milk ink sky snow".split()]
    rows += [{"instruction": "What number comes after this one?", "input": str(n),
              "output": str(n + 1)} for n in (7, 19, 98, 999)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = make(folder)
    store = ArtifactStore(folder / "store")
    base = base_model_stage(recipe, store, "tiny")
    tokenized = tokenized_stage(recipe, store, base.artifact)
    base_dir = model_dir(base.artifact)
    validation = load_tokenized(tokenized.artifact.path, "validation")
    return {"recipe": recipe, "base_dir": base_dir, "tokenized_dir": tokenized.artifact.path,
            "model": load_model(recipe, base_dir).eval(),
            "tokenizer": load_tokenizer(recipe, base_dir),
            "rows": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in validation],
            "references": [json.loads(r) for r in validation["reference"]]}


@torch.no_grad()
def hand_loss(model, row: dict[str, list[int]]) -> tuple[float, int]:
    """Sum of -log p(label[t+1] | tokens[:t+1]) over trained positions, and their count."""
    logits_TV = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    log_probs_TV = torch.log_softmax(logits_TV.double(), dim=-1)
    total, count = 0.0, 0
    for t in range(len(row["labels"]) - 1):
        target = row["labels"][t + 1]
        if target != IGNORE_INDEX:
            total -= float(log_probs_TV[t, target])
            count += 1
    return total, count


def test_heldout_loss_is_mean_cross_entropy_per_trained_token(setup):
    rows = setup["rows"]
    loss, count = heldout_loss(setup["model"], rows, setup["tokenizer"].pad_token_id, 4)
    sums, counts = zip(*(hand_loss(setup["model"], row) for row in rows), strict=True)
    assert count == sum(counts) and 0 < count < sum(len(r["input_ids"]) for r in rows)
    assert loss == pytest.approx(sum(sums) / sum(counts), rel=LOSS_RTOL)


def test_single_row_equals_hf_loss(setup):
    row = setup["rows"][0]
    with torch.no_grad():
        hf = setup["model"](input_ids=torch.tensor([row["input_ids"]]),
                            labels=torch.tensor([row["labels"]])).loss
    loss, _ = heldout_loss(setup["model"], [row], setup["tokenizer"].pad_token_id, 1)
    assert loss == pytest.approx(float(hf), rel=LOSS_RTOL)


def test_padding_does_not_change_the_loss(setup):
    rows = sorted(setup["rows"], key=lambda r: len(r["input_ids"]))
    rows = [rows[0], rows[-1]]  # the shortest is padded to the longest
    assert len(rows[0]["input_ids"]) < len(rows[1]["input_ids"])
    pad = setup["tokenizer"].pad_token_id
    together = heldout_loss(setup["model"], rows, pad, batch_size=2)
    one_by_one = heldout_loss(setup["model"], rows, pad, batch_size=1)
    assert together[1] == one_by_one[1]
    assert together[0] == pytest.approx(one_by_one[0], rel=LOSS_RTOL)


def test_rows_without_trained_tokens_are_an_error(setup):
    row = {**setup["rows"][0], "labels": [IGNORE_INDEX] * len(setup["rows"][0]["labels"])}
    with pytest.raises(ValueError, match="val_set_size: the held-out rows have no trained tokens"):
        heldout_loss(setup["model"], [row], setup["tokenizer"].pad_token_id, 1)


@torch.no_grad()
def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding by hand: argmax of the last position, until EOS or the token budget."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[len(prompt_ids):], skip_special_tokens=True).strip()


def test_exact_match_scores_the_models_own_greedy_answer(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    prompts: list[Any] = [ref["prompt"] for ref in setup["references"]]
    prompts.append([{"role": "user", "content": "Repeat the word. hot"}])  # a chat prompt
    answers = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt)["input_ids"]
        else:
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"]
        answers.append(greedy(model, tokenizer, prompt_ids, max_new_tokens=4))
    assert any(answers), "the random model should say something, or the test shows nothing"

    own = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    score, samples = exact_match(model, tokenizer, own, max_new_tokens=4)
    assert score == 1.0
    assert [s["generated"] for s in samples] == answers[:5] and all(s["match"] for s in samples)

    wrong = [{"prompt": p, "answer": a + " extra"} for p, a in zip(prompts, answers, strict=True)]
    assert exact_match(model, tokenizer, wrong, max_new_tokens=4)[0] == 0.0
    half = own[:2] + wrong[2:4]
    assert exact_match(model, tokenizer, half, max_new_tokens=4)[0] == 0.5


def test_exact_match_prompts_are_tokenized_as_in_training(setup):
    """The held-out row's prompt part is exactly what exact_match feeds the model."""
    tokenizer = setup["tokenizer"]
    for row, ref in zip(setup["rows"], setup["references"], strict=True):
        prompt_ids = tokenizer(ref["prompt"])["input_ids"]
        assert row["input_ids"][:len(prompt_ids)] == prompt_ids
        assert set(row["labels"][:len(prompt_ids)]) == {IGNORE_INDEX}


def test_evaluate_scores_base_and_trained(setup):
    scores = evaluate(setup["recipe"], setup["base_dir"], setup["base_dir"],
                      setup["tokenized_dir"])
    base, trained = scores["base"], scores["trained"]
    assert base == trained and scores["heldout_loss_delta"] == 0.0
    loss, count = heldout_loss(setup["model"], setup["rows"], setup["tokenizer"].pad_token_id, 4)
    assert base["heldout_loss"] == pytest.approx(loss, rel=LOSS_RTOL)
    assert base["num_heldout_tokens"] == count
    assert base["perplexity"] == pytest.approx(math.exp(base["heldout_loss"]))
    assert base["num_exact_match_rows"] == 3  # eval_generation_rows
    assert 0.0 <= base["exact_match"] <= 1.0 and len(base["samples"]) == 3
