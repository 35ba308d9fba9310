"""creative_acr (answer, critique, revise): Axolotl's fields and layout, token-by-token masks.
The instruction wording is tunegraph's own; what is checked against Axolotl's source by hand is
the layout: "USER: ...\\nASSISTANT:", the "Question:/Answer:/Evaluation:" labels, and the trained
answer (the revision, or the YAML of `scores` then `critiques`)."""

from __future__ import annotations

import re

import pytest
from prompts_support import assert_golden, encode, trained_spans

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts import reference_answer, row_texts
from tunegraph.ops.prompts.instruct import CREATIVE_ANSWER_SYSTEM

ROW = {"instruction": "write about a cat", "answer": "the cat sat",
       "revision": "the cat sat on the mat",
       "scores": {"refusal": 10, "prescriptive_bias": 9, "creativity": 3, "comprehensiveness": 2},
       "critiques": {"creativity": {"explanation": "plain", "improvements": "add a dog"}}}
# yaml.safe_dump, block style, keys sorted: scores, then critiques (Axolotl's evaluation text).
EVALUATION = ("comprehensiveness: 2\ncreativity: 3\nprescriptive_bias: 9\nrefusal: 10\n"
              "creativity:\n  explanation: plain\n  improvements: add a dog\n")


def test_load_answer_trains_the_revision(tokenizer):
    encoded = encode(tokenizer, ROW, type="creative_acr.load_answer")
    prompt = CREATIVE_ANSWER_SYSTEM + "USER: write about a cat\nASSISTANT:"
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + prompt + "the cat sat on the mat</s>"
    assert trained_spans(tokenizer, encoded) == ["the cat sat on the mat</s>"]
    assert_golden("creative_acr_load_answer", tokenizer, encoded)
    cfg = DatasetConfig(path="d", type="creative_acr.load_answer")
    assert reference_answer(cfg, ROW) == (prompt, "the cat sat on the mat")
    assert list(row_texts(cfg, ROW)) == [prompt + "the cat sat on the mat"]


def test_load_critique_trains_the_yaml_evaluation(tokenizer):
    encoded = encode(tokenizer, ROW, type="creative_acr.load_critique")
    text = tokenizer.decode(encoded["input_ids"])
    assert text.startswith("<s>USER: ")
    assert text.endswith("\n\nQuestion: write about a cat\nAnswer: the cat sat\n\nASSISTANT:"
                         + EVALUATION + "</s>")
    for criterion in ("refusal", "prescriptive_bias", "creativity", "comprehensiveness"):
        assert f"\n{criterion}: " in text
    assert trained_spans(tokenizer, encoded) == [EVALUATION + "</s>"]
    assert_golden("creative_acr_load_critique", tokenizer, encoded)


def test_load_revise_shows_the_evaluation_and_trains_the_revision(tokenizer):
    encoded = encode(tokenizer, ROW, type="creative_acr.load_revise")
    text = tokenizer.decode(encoded["input_ids"])
    assert text.startswith("<s>USER: ")
    assert text.endswith("\n\nQuestion: write about a cat\nAnswer: the cat sat\nEvaluation:\n"
                         + EVALUATION + "\n\nASSISTANT:the cat sat on the mat</s>")
    assert trained_spans(tokenizer, encoded) == ["the cat sat on the mat</s>"]
    assert_golden("creative_acr_load_revise", tokenizer, encoded)
    everything = encode(tokenizer, ROW, train_on_inputs=True, type="creative_acr.load_revise")
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("kind, row, message", [
    ("creative_acr.load_answer", {"instruction": "x"}, "field 'revision' is missing"),
    ("creative_acr.load_critique", {**ROW, "scores": "refusal: 10"},
     "field 'scores' is a str, not a mapping (it is written as YAML)"),
    ("creative_acr.load_revise", {k: v for k, v in ROW.items() if k != "critiques"},
     "field 'critiques' is missing"),
])
def test_bad_rows(tokenizer, kind, row, message):
    with pytest.raises(ValueError, match=f"data/rows.jsonl, row 7 .*{re.escape(message)}"):
        encode(tokenizer, row, type=kind)
