"""chat_template masks of the newer built-in families, token by token: Gemma 3 (system text inside
the first user turn), Qwen3 (reasoning blocks: trained where the template writes them, dropped
from earlier answers), Llama 4 (<|eot|>); each agrees with transformers' assistant masks. And a
dataset's own `chat_template_jinja`, which overrides the recipe's template for that dataset."""

from __future__ import annotations

import json

import pytest
from prompts_support import assert_golden, encode, trained_spans, with_template_tokens

from tunegraph.config import DatasetConfig, recipe_from_mapping
from tunegraph.ops.prompts import IGNORE_INDEX
from tunegraph.ops.templates import BUILT_IN

CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]
# Reasoning given both ways Qwen3's template reads it: inline <think> and reasoning_content.
REASONING = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nhello there"},
             {"role": "user", "content": "how are you"},
             {"role": "assistant", "content": "fine thanks", "reasoning_content": "a polite answer"}]


@pytest.fixture
def template_tokenizer(tokenizer):
    return with_template_tokens(tokenizer)


def with_template(tokenizer, name):
    tokenizer.chat_template = BUILT_IN[name]
    return tokenizer


def assistant_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) from transformers' own apply_chat_template."""
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    return reference["input_ids"], reference["assistant_masks"]


def assert_agrees_with_transformers(tokenizer, messages, encoded):
    ids, mask = assistant_mask(tokenizer, messages)
    assert encoded["input_ids"] == ids
    assert [int(label != IGNORE_INDEX) for label in encoded["labels"]] == mask


def test_gemma3_system_text_opens_the_first_user_turn(template_tokenizer):
    tokenizer = with_template(template_tokenizer, "gemma3")
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
    assert tokenizer.decode(encoded["input_ids"]).startswith(
        "<s><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert trained_spans(tokenizer, encoded) == ["hello there<end_of_turn>",
                                                 "fine thanks<end_of_turn>"]
    assert_golden("chat_template_gemma3", tokenizer, encoded)
    assert_agrees_with_transformers(tokenizer, CONVERSATION, encoded)
    # The system text is found inside the user turn; no end-of-turn token follows it there.
    system = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                    roles_to_train=["system"])
    assert trained_spans(tokenizer, system) == ["be brief"]


def test_qwen3_trains_reasoning_where_the_template_writes_it(template_tokenizer):
    """The last answer's reasoning block is written, so trained; the earlier answer's reasoning
    is not written at all (Qwen3's template drops it), and its answer is trained as rendered."""
    tokenizer = with_template(template_tokenizer, "qwen3")
    encoded = encode(tokenizer, {"messages": REASONING}, type="chat_template")
    text = tokenizer.decode(encoded["input_ids"])
    assert "the user greets" not in text
    assert "<|im_start|>assistant\nhello there<|im_end|>" in text
    assert trained_spans(tokenizer, encoded) == [
        "hello there<|im_end|>", "<think>\na polite answer\n</think>\n\nfine thanks<|im_end|>"]
    assert_golden("chat_template_qwen3", tokenizer, encoded)
    assert_agrees_with_transformers(tokenizer, REASONING, encoded)
    # End-of-turn tokens are still found after a rewritten content (searched from the block).
    no_eos = encode(tokenizer, {"messages": REASONING}, type="chat_template", train_on_eos="none")
    assert trained_spans(tokenizer, no_eos) == [
        "hello there", "<think>\na polite answer\n</think>\n\nfine thanks"]


def test_qwen3_plain_answers_get_the_empty_reasoning_block(template_tokenizer):
    """Without reasoning, the last answer still opens with Qwen3's empty <think> block (its
    non-thinking format), which the model must learn to write; earlier answers do not."""
    tokenizer = with_template(template_tokenizer, "qwen3")
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
    assert trained_spans(tokenizer, encoded) == [
        "hello there<|im_end|>", "<think>\n\n</think>\n\nfine thanks<|im_end|>"]
    assert_agrees_with_transformers(tokenizer, CONVERSATION, encoded)


def test_qwen3_training_detail_needs_the_content_as_written(template_tokenizer):
    tokenizer = with_template(template_tokenizer, "qwen3")
    detail = [{"begin_offset": 0, "end_offset": 2, "train": True}]
    messages = [*REASONING[:2], {**REASONING[2], "detail": detail}, *REASONING[3:]]
    with pytest.raises(ValueError, match=r"row 7 .*content of message 2 \(assistant\) is not in "
                                         r"the chat template's rendering"):
        encode(tokenizer, {"messages": messages}, type="chat_template",
               message_field_training_detail="detail")


def test_llama4_ends_turns_with_eot(template_tokenizer):
    tokenizer = with_template(template_tokenizer, "llama4")
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
    assert tokenizer.decode(encoded["input_ids"]).startswith(
        "<s><|header_start|>system<|header_end|>\n\nbe brief<|eot|>")
    assert trained_spans(tokenizer, encoded) == ["hello there<|eot|>", "fine thanks<|eot|>"]
    assert_golden("chat_template_llama4", tokenizer, encoded)
    assert_agrees_with_transformers(tokenizer, CONVERSATION, encoded)
    last = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template", train_on_eos="last")
    assert trained_spans(tokenizer, last) == ["hello there", "fine thanks<|eot|>"]
    with pytest.raises(ValueError, match="row 7 .*rejects this conversation: the llama4 template"):
        encode(tokenizer, {"messages": [*CONVERSATION[1:3], {"role": "tool", "content": "x"}]},
               type="chat_template")


# A dataset's own template: "Q:"/"A:" turns, assistant turns ending with EOS.
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' }}"
               "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
               "{% else %}{{ 'Q: ' + m['content'] + '\n' }}{% endif %}{% endfor %}")


def test_dataset_chat_template_jinja_overrides_the_tokenizer_template(tokenizer):
    encoded = encode(tokenizer, {"messages": CONVERSATION[1:3]}, type="chat_template",
                     chat_template_jinja=QA_TEMPLATE)
    assert tokenizer.decode(encoded["input_ids"]) == "Q: hi\nA: hello there</s>"
    # " hello" starts in the template's space and ends in the answer: trained (common.py's rule).
    assert trained_spans(tokenizer, encoded) == [" hello there</s>"]
    # The tokenizer keeps its own (ChatML) template for every other dataset.
    assert tokenizer.chat_template == BUILT_IN["chatml"]


@pytest.mark.parametrize("keys, message", [
    ({"chat_template": "jinja"}, "datasets[].chat_template is 'jinja' but chat_template_jinja is "
                                 "not set"),
    ({"chat_template": "chatml", "chat_template_jinja": QA_TEMPLATE},
     "datasets[].chat_template_jinja is set but chat_template is 'chatml': set chat_template: "
     "jinja"),
    ({"type": "alpaca", "chat_template_jinja": QA_TEMPLATE},
     "datasets[].chat_template_jinja is for type chat_template (or a module.function transform), "
     "not 'alpaca'"),
])
def test_dataset_chat_template_jinja_rules(keys, message):
    assert DatasetConfig(path="d", type="chat_template",
                         chat_template_jinja=QA_TEMPLATE).chat_template == "jinja"
    with pytest.raises(ValueError) as error:
        DatasetConfig(**{"path": "d", "type": "chat_template", **keys})
    assert message in str(error.value)


def test_dataset_chat_template_jinja_end_to_end(tokenizer, tmp_path):
    """Through the recipe loader (Axolotl's per-dataset key) and tokenize_dataset: each dataset
    is rendered with its own template, and the template is part of the tokenized data's key."""
    from tunegraph.ops.tokenize import tokenization_fingerprint, tokenize_dataset

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    raw = {"base_model": "tunegraph:tiny-llama", "learning_rate": 1e-3, "chat_template": "chatml",
           "datasets": [{"path": "a.jsonl", "type": "chat_template"},
                        {"path": "b.jsonl", "type": "chat_template",
                         "chat_template_jinja": QA_TEMPLATE}]}
    recipe = recipe_from_mapping(raw, source="test", name="t", source_path=tmp_path / "r.yaml")
    tokenize_dataset(recipe, tmp_path / "tok", tmp_path / "out")
    samples = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [s["text"] for s in samples] == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n«hello there<|im_end|>»\n",
        "Q: hi\nA:« hello there</s>»"]
    other = {**raw, "datasets": [raw["datasets"][0], {**raw["datasets"][1],
                                                      "chat_template_jinja": QA_TEMPLATE + " "}]}
    changed = recipe_from_mapping(other, source="test", name="t", source_path=tmp_path / "r.yaml")
    assert tokenization_fingerprint(recipe, {}) != tokenization_fingerprint(changed, {})
