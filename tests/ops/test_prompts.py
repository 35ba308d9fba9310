"""Prompt strategies: the exact trained spans of hand-built rows, and parity with transformers."""

from __future__ import annotations

import pytest

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy, reference_answer

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\nWhat is the capital "
                   "of france?\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\nadd two numbers\n\n### Input:\n2 and 2\n\n"
                     "### Response:\n")

CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]

# Gemma's layout: the assistant is "model" and turns end with <end_of_turn>, which is not EOS.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def trained_spans(tokenizer, encoded: dict[str, list[int]]) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    spans, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def encode(tokenizer, row, train_on_inputs=False, **dataset_keys):
    dataset_cfg = DatasetConfig(path="data/rows.jsonl", **dataset_keys)
    return make_strategy(tokenizer, dataset_cfg, train_on_inputs)(row, 7)


def test_alpaca_without_input_trains_response_and_eos(tokenizer):
    row = {"instruction": "What is the capital of france?", "input": "", "output": "paris"}
    encoded = encode(tokenizer, row, type="alpaca")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + ALPACA_NO_INPUT + "paris</s>"
    assert trained_spans(tokenizer, encoded) == ["paris</s>"]
    # One tokenization of the whole text, not prompt + response glued together.
    assert encoded["input_ids"][:-1] == tokenizer(ALPACA_NO_INPUT + "paris")["input_ids"]


def test_alpaca_with_input(tokenizer):
    row = {"instruction": "add two numbers", "input": "2 and 2", "output": "four"}
    encoded = encode(tokenizer, row, type="alpaca")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + ALPACA_WITH_INPUT + "four</s>"
    assert trained_spans(tokenizer, encoded) == ["four</s>"]
    assert encoded["labels"][-1] == tokenizer.eos_token_id


def test_alpaca_train_on_inputs_trains_everything(tokenizer):
    row = {"instruction": "add two numbers", "input": "2 and 2", "output": "four"}
    encoded = encode(tokenizer, row, train_on_inputs=True, type="alpaca")
    assert encoded["labels"] == encoded["input_ids"]
    assert trained_spans(tokenizer, encoded) == ["<s>" + ALPACA_WITH_INPUT + "four</s>"]


@pytest.mark.parametrize("train_on_eos, expected", [
    ("turn", ["hello there<|im_end|>", "fine thanks<|im_end|>"]),
    ("last", ["hello there", "fine thanks<|im_end|>"]),
    ("none", ["hello there", "fine thanks"]),
    ("all", ["<|im_end|>", "<|im_end|>", "hello there<|im_end|>", "<|im_end|>",
             "fine thanks<|im_end|>"]),
])
def test_chat_template_multi_turn(tokenizer, train_on_eos, expected):
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     train_on_eos=train_on_eos)
    assert trained_spans(tokenizer, encoded) == expected


def test_chat_template_roles_mapping_and_custom_fields(tokenizer):
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"},
                {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine thanks"}]
    encoded = encode(tokenizer, {"conversations": sharegpt}, type="chat_template",
                     field_messages="conversations", message_field_role="from",
                     message_field_content="value",
                     roles={"user": ["human"], "assistant": ["gpt"]})
    assert trained_spans(tokenizer, encoded) == ["hello there<|im_end|>", "fine thanks<|im_end|>"]
    assert "<|im_start|>user\nhi" in tokenizer.decode(encoded["input_ids"])


def test_chat_template_roles_to_train_and_train_on_inputs(tokenizer):
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     roles_to_train=["user"])
    assert trained_spans(tokenizer, encoded) == ["hi<|im_end|>", "how are you<|im_end|>"]
    everything = encode(tokenizer, {"messages": CONVERSATION}, train_on_inputs=True,
                        type="chat_template")
    assert everything["labels"] == everything["input_ids"]


def test_gemma_style_end_of_turn_is_trained(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>",
                                                                "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") != tokenizer.eos_token_id
    encoded = encode(tokenizer, {"messages": CONVERSATION[1:]}, type="chat_template")
    assert tokenizer.decode(encoded["input_ids"]).startswith("<s><start_of_turn>user\nhi")
    assert trained_spans(tokenizer, encoded) == ["hello there<end_of_turn>",
                                                 "fine thanks<end_of_turn>"]


def test_chat_template_agrees_with_transformers_assistant_masks(tokenizer):
    """transformers marks the {% generation %} block of our ChatML template, which covers the
    content and its <|im_end|>: identical to train_on_eos turn; with train_on_eos none the masks
    differ by exactly the <|im_end|> tokens."""
    conversations = [CONVERSATION,
                     [{"role": "user", "content": "what is the capital of france?"},
                      {"role": "assistant", "content": " paris, the capital\n"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for messages in conversations:
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        for train_on_eos in ("turn", "none"):
            ours = encode(tokenizer, {"messages": messages}, type="chat_template",
                          train_on_eos=train_on_eos)
            assert ours["input_ids"] == reference["input_ids"]
            ours_mask = [int(label != IGNORE_INDEX) for label in ours["labels"]]
            expected = [m if train_on_eos == "turn" or token != im_end else 0
                        for token, m in zip(reference["input_ids"], reference["assistant_masks"],
                                               strict=True)]
            assert ours_mask == expected


def test_long_conversation_is_rendered_once(tokenizer, monkeypatch):
    renders = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template",
                        lambda *args, **kwargs: renders.append(1) or render(*args, **kwargs))
    messages = [{"role": ("user", "assistant")[t % 2], "content": f"answer {t}"}
                for t in range(400)]
    encoded = encode(tokenizer, {"messages": messages}, type="chat_template")
    assert renders == [1]
    assert trained_spans(tokenizer, encoded) == [f"answer {t}<|im_end|>" for t in range(1, 400, 2)]


def test_completion_trains_text_and_eos(tokenizer):
    encoded = encode(tokenizer, {"body": "the cat sat"}, type="completion", field="body")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>the cat sat</s>"
    assert encoded["labels"] == encoded["input_ids"]


@pytest.mark.parametrize("row, dataset_keys, message", [
    ({"instruction": "hi", "input": ""}, {"type": "alpaca"}, "field 'output' is missing"),
    ({"instruction": 3, "output": "x"}, {"type": "alpaca"}, "field 'instruction' must be a string"),
    ({"messages": [{"role": "user"}]}, {"type": "chat_template"},
     "field 'messages[0].content' is missing"),
    ({"messages": "hi"}, {"type": "chat_template"}, "field 'messages' is a str"),
    ({"messages": [{"role": "narrator", "content": "once"}]}, {"type": "chat_template"},
     "unknown role 'narrator'"),
    ({"content": "x"}, {"type": "completion"}, "field 'text' is missing"),
])
def test_bad_rows_name_dataset_row_and_field(tokenizer, row, dataset_keys, message):
    with pytest.raises(ValueError) as error:
        encode(tokenizer, row, **dataset_keys)
    assert "data/rows.jsonl" in str(error.value)
    assert "row 7" in str(error.value)
    assert message in str(error.value)


def test_content_changed_by_template_is_reported(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper "
                               "+ '\n' }}{% endfor %}")
    with pytest.raises(ValueError, match=r"row 7 .*content of message 0 \(user\) is not in"):
        encode(tokenizer, {"messages": CONVERSATION[1:3]}, type="chat_template")


def test_template_rejecting_a_row_is_a_row_error(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="row 7 .*rejects this conversation: no system role"):
        encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")


def test_reference_answer():
    alpaca = DatasetConfig(path="a", type="alpaca")
    prompt, answer = reference_answer(alpaca, {"instruction": "What is the capital of france?",
                                               "output": "paris"})
    assert (prompt, answer) == (ALPACA_NO_INPUT, "paris")
    chat = DatasetConfig(path="c", type="chat_template")
    assert reference_answer(chat, {"messages": CONVERSATION}) == (CONVERSATION[:4], "fine thanks")
    assert reference_answer(chat, {"messages": CONVERSATION[:2]}) is None
    assert reference_answer(DatasetConfig(path="t", type="completion"), {"text": "x"}) is None
