"""Single-turn prompt strategies: the exact text and trained tokens of hand-built rows for alpaca,
Axolotl's instruction family, the custom `type:` mapping, completion, input_output and
pre-tokenized rows; row errors name file, row and field. Chat lives in test_prompts_chat.py."""

from __future__ import annotations

import pytest
from prompts_support import assert_golden, encode, trained_spans

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy, reference_answer, row_texts

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\nWhat is the capital "
                   "of france?\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\nadd two numbers\n\n### Input:\n2 and 2\n\n"
                     "### Response:\n")
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n")
ALPACA_SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n")
CONTEXT = "Use the following contextual information to concisely answer the question.\n"
CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]


def test_alpaca_without_input_trains_response_and_eos(tokenizer):
    row = {"instruction": "What is the capital of france?", "input": "", "output": "paris"}
    encoded = encode(tokenizer, row, type="alpaca")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + ALPACA_NO_INPUT + "paris</s>"
    assert trained_spans(tokenizer, encoded) == ["paris</s>"]
    # One tokenization of the whole text, not prompt + response glued together.
    assert encoded["input_ids"][:-1] == tokenizer(ALPACA_NO_INPUT + "paris")["input_ids"]
    assert_golden("alpaca", tokenizer, encoded)


def test_alpaca_with_input(tokenizer):
    row = {"instruction": "add two numbers", "input": "2 and 2", "output": "four"}
    encoded = encode(tokenizer, row, type="alpaca")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + ALPACA_WITH_INPUT + "four</s>"
    assert trained_spans(tokenizer, encoded) == ["four</s>"]
    assert encoded["labels"][-1] == tokenizer.eos_token_id
    assert_golden("alpaca_with_input", tokenizer, encoded)


def test_alpaca_train_on_inputs_trains_everything(tokenizer):
    row = {"instruction": "add two numbers", "input": "2 and 2", "output": "four"}
    encoded = encode(tokenizer, row, train_on_inputs=True, type="alpaca")
    assert encoded["labels"] == encoded["input_ids"]
    assert trained_spans(tokenizer, encoded) == ["<s>" + ALPACA_WITH_INPUT + "four</s>"]


# type, row, the prompt text Axolotl writes (hand-copied from its prompters), the trained text.
INSTRUCTION_FAMILY = [
    ("alpaca_chat", {"instruction": "add two numbers", "input": "2 and 2", "output": "four"},
     ALPACA_SYSTEM + "USER: add two numbers\n2 and 2\nASSISTANT:", "four</s>"),
    ("alpaca_chat", {"instruction": "hi", "response": "hello"},
     ALPACA_SYSTEM_NO_INPUT + "USER: hi\nASSISTANT:", "hello</s>"),
    ("alpaca_chat.load_qa", {"question": "what is the capital of france?", "answer": "paris"},
     ALPACA_SYSTEM_NO_INPUT + "USER: what is the capital of france?\nASSISTANT:", "paris</s>"),
    ("alpaca_w_system.load_open_orca",
     {"system_prompt": "be brief", "question": "hi", "response": "hello"},
     "### System:\nbe brief\n### Human:\nhi\n### Assistant:\n", "hello</s>"),
    ("alpaca_w_system.load_open_orca", {"system_prompt": "", "question": "hi", "response": "hi"},
     "### Human:\nhi\n### Assistant:\n", "hi</s>"),
    ("jeopardy", {"question": "capital of france", "category": "the capital", "answer": "paris"},
     ALPACA_SYSTEM + "### Instruction:\ncapital of france\n\n### Input:\nthe capital\n\n"
                     "### Response:\n", "what is paris</s>"),
    ("oasst", {"INSTRUCTION": "hi there", "RESPONSE": "hello"},
     ALPACA_SYSTEM_NO_INPUT + "### Instruction:\nhi there\n\n### Response:\n", "hello</s>"),
    ("gpteacher", {"instruction": "add two numbers", "input": "", "response": "four"},
     ALPACA_SYSTEM_NO_INPUT + "### Instruction:\nadd two numbers\n\n### Response:\n", "four</s>"),
    ("summarizetldr", {"article": "the cat sat on the mat", "summary": "cat sat"},
     "USER: Summarize the following article as a TL;DR.\nthe cat sat on the mat\nASSISTANT:",
     "cat sat</s>"),
    ("context_qa", {"article": "paris is the capital", "question": "what is the capital?",
                    "answer": "paris"},
     CONTEXT + "USER: paris is the capital\n===\nwhat is the capital?\nASSISTANT:", "paris</s>"),
    ("context_qa.load_v2", {"context": "paris is the capital", "question": "capital?",
                            "answer": "paris"},
     "Context: paris is the capital\nQuestion: capital?\n", "Answer: paris</s>"),
    ("context_qa.load_404", {"article": "the cat sat", "unanswerable_question": "capital?"},
     CONTEXT + "USER: the cat sat\n===\ncapital?\nASSISTANT:",
     "The context provided does not contain any information about your inquiry. Therefore, "
     "I'm unable to answer your question based on the given context.</s>"),
    ("explainchoice", {"question": "capital of france?", "choices": ["paris", "rome"],
                       "explanation": "paris is"},
     "Choose the answer that best answers the question. Explain your reasoning.\n"
     "### Instruction:\ncapital of france?\n\n### Input:\n- \"paris\"\n- \"rome\"\n\n"
     "### Response:\n", "paris is</s>"),
    ("concisechoice", {"question": "capital?", "choices": ["paris"], "solution": "paris"},
     "Choose the answer that best answers the question. Be concise in your response.\n\n"
     "USER: capital?\n- \"paris\"\nASSISTANT:", "paris</s>"),
    ("metharme", {"prompt": "<|user|>hi<|model|>", "generation": "hello there"},
     "<|user|>hi<|model|>", "hello there</s></s></s>"),
]


@pytest.mark.parametrize("kind, row, prompt, trained", INSTRUCTION_FAMILY,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(INSTRUCTION_FAMILY)])
def test_instruction_family(tokenizer, kind, row, prompt, trained):
    encoded = encode(tokenizer, row, type=kind)
    answer = trained.replace("</s>", "")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>" + prompt + trained
    assert trained_spans(tokenizer, encoded) == [trained]
    cfg = DatasetConfig(path="d", type=kind)
    assert reference_answer(cfg, row) == (prompt, answer)
    assert list(row_texts(cfg, row)) == [prompt + answer]
    everything = encode(tokenizer, row, train_on_inputs=True, type=kind)
    assert everything["labels"] == everything["input_ids"]


def test_instruction_family_goldens(tokenizer):
    """Token-by-token goldens of a few family members (prompt/answer boundaries differ)."""
    for kind, row, *_ in (INSTRUCTION_FAMILY[0], INSTRUCTION_FAMILY[5], INSTRUCTION_FAMILY[14]):
        assert_golden(kind.replace(".", "_"), tokenizer, encode(tokenizer, row, type=kind))


def test_custom_type_mapping(tokenizer):
    mapping = {"field_instruction": "q", "field_input": "ctx", "field_output": "a",
               "field_system": "sys", "system_prompt": "be brief", "system_format": "[{system}] ",
               "format": "Q: {instruction} C: {input} A:", "no_input_format": "Q: {instruction} A:"}
    with_input = encode(tokenizer, {"q": "capital?", "ctx": "france", "a": " paris"}, type=mapping)
    assert tokenizer.decode(with_input["input_ids"]) == (
        "<s>[be brief] Q: capital? C: france A: paris</s>")
    assert trained_spans(tokenizer, with_input) == [" paris</s>"]
    assert_golden("custom_mapping", tokenizer, with_input)
    own_system = encode(tokenizer, {"q": "hi", "a": " hello", "sys": "be kind"}, type=mapping)
    assert tokenizer.decode(own_system["input_ids"]) == "<s>[be kind] Q: hi A: hello</s>"
    assert trained_spans(tokenizer, own_system) == [" hello</s>"]
    defaults = encode(tokenizer, {"instruction": "hi", "output": "hello"}, type={})
    assert tokenizer.decode(defaults["input_ids"]) == "<s>hi  hello</s>"  # format, empty input


@pytest.mark.parametrize("mapping, message", [
    ({"format": "{instruction} {question}"}, "format: unknown placeholder(s) {question}"),
    ({"no_input_format": "{instruction} {input}"}, "no_input_format: unknown placeholder(s) {input}"),
    ({"format": "{input}"}, "format: must contain {instruction}"),
    ({"format": "{instruction"}, "format: not a format string"),
    ({"field_instruktion": "q"}, "field_instruktion: unknown key (did you mean "
                                 "'field_instruction'?)"),
])
def test_custom_type_mapping_errors(mapping, message):
    with pytest.raises(ValueError, match="datasets\\[\\].type"):
        DatasetConfig(path="d", type=mapping)
    with pytest.raises(ValueError) as error:
        DatasetConfig(path="d", type=mapping)
    assert message in str(error.value)


def test_completion_trains_text_and_eos(tokenizer):
    encoded = encode(tokenizer, {"body": "the cat sat"}, type="completion", field="body")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>the cat sat</s>"
    assert encoded["labels"] == encoded["input_ids"]
    assert_golden("completion", tokenizer, encoded)


def test_input_output_segments(tokenizer):
    """Axolotl's template-free example: segments glued as they are, label false masked."""
    row = {"segments": [{"label": True, "text": "<s>hello\n"}, {"label": True, "text": "hi there. "},
                        {"label": False, "text": "what is "}, {"label": True, "text": "paris</s>"}]}
    encoded = encode(tokenizer, row, type="input_output")
    assert tokenizer.decode(encoded["input_ids"]) == "<s>hello\nhi there. what is paris</s>"
    assert encoded["input_ids"][0] == tokenizer.bos_token_id  # the data's <s>, none added
    # " what" starts with the trained segment's last space but ends in masked text: untrained.
    assert trained_spans(tokenizer, encoded) == ["<s>hello\nhi there.", " paris</s>"]
    assert_golden("input_output", tokenizer, encoded)
    everything = encode(tokenizer, row, train_on_inputs=True, type="input_output")
    assert everything["labels"] == everything["input_ids"]


def test_pre_tokenized_rows_pass_through(tokenizer):
    row = {"input_ids": [1, 50, 60, 2], "attention_mask": [1, 1, 1, 1],
           "labels": [-100, -100, 60, 2]}
    assert encode(tokenizer, row) == {"input_ids": [1, 50, 60, 2], "labels": [-100, -100, 60, 2]}
    assert encode(tokenizer, {"input_ids": [1, 50]}) == {"input_ids": [1, 50], "labels": [1, 50]}
    assert encode(tokenizer, row, train_on_inputs=True)["labels"] == [1, 50, 60, 2]
    assert DatasetConfig(path="d").type is None  # Axolotl's empty `type:`


@pytest.mark.parametrize("row, dataset_keys, message", [
    ({"instruction": "hi", "input": ""}, {"type": "alpaca"}, "field 'output' is missing"),
    ({"instruction": 3, "output": "x"}, {"type": "alpaca"}, "field 'instruction' must be a string"),
    ({"question": "q"}, {"type": "jeopardy"}, "field 'category' is missing"),
    ({"question": "q", "choices": "ab", "solution": "a"}, {"type": "explainchoice"},
     "field 'choices' must be a list of strings"),
    ({"messages": [{"role": "user"}]}, {"type": "chat_template"},
     "field 'messages[0].content' is missing"),
    ({"messages": "hi"}, {"type": "chat_template"}, "field 'messages' is a str"),
    ({"messages": [{"role": "narrator", "content": "once"}]}, {"type": "chat_template"},
     "unknown role 'narrator'"),
    ({"content": "x"}, {"type": "completion"}, "field 'text' is missing"),
    ({"segments": [{"text": "a", "label": "yes"}]}, {"type": "input_output"},
     "field 'segments[0].label' must be true or false"),
    ({"segments": [{"label": True}]}, {"type": "input_output"}, "field 'segments[0].text' is missing"),
    ({"text": "x"}, {}, "field 'input_ids' is missing"),
    ({"input_ids": [1, "a"]}, {}, "field 'input_ids' must be a list of integers"),
    ({"input_ids": [1, 99999]}, {}, "holds 99999, outside the tokenizer's vocabulary"),
    ({"input_ids": [1, 2], "labels": [1]}, {}, "field 'labels' has 1 values but 'input_ids' has 2"),
    ({"input_ids": [1, 2], "labels": [1, -5]}, {}, "field 'labels' holds -5"),
])
def test_bad_rows_name_dataset_row_and_field(tokenizer, row, dataset_keys, message):
    with pytest.raises(ValueError) as error:
        encode(tokenizer, row, **dataset_keys)
    assert "data/rows.jsonl" in str(error.value)
    assert "row 7" in str(error.value)
    assert message in str(error.value)


def test_encode_batch_equals_one_row_at_a_time(tokenizer):
    """Batching (one tokenizer call for many rows) changes nothing, and row errors keep their
    row numbers."""
    cfg = DatasetConfig(path="d.jsonl", type="alpaca")
    strategy = make_strategy(tokenizer, cfg, train_on_inputs=False)
    rows = [{"instruction": f"add {i} numbers", "output": "four" * i} for i in range(1, 6)]
    assert strategy.encode_batch(rows, 10) == [strategy(row, 10 + i) for i, row in enumerate(rows)]
    with pytest.raises(ValueError, match="row 12 "):
        strategy.encode_batch([*rows[:2], {"instruction": "x"}], 10)


def test_dataset_type_choices():
    assert DatasetConfig(path="d", type="my_transforms.to_chat").type == "my_transforms.to_chat"
    with pytest.raises(ValueError, match="'alpaca_chat.load_camel_ai' is an Axolotl value that "
                                         "tunegraph does not support yet"):
        DatasetConfig(path="d", type="alpaca_chat.load_camel_ai")
    with pytest.raises(ValueError, match="'chatml.intel' is an Axolotl value .*: a preference \\(rl:\\) format"):
        DatasetConfig(path="d", type="chatml.intel")
    with pytest.raises(ValueError, match="'llama3.foo' is an Axolotl value|unknown value 'llama3"):
        DatasetConfig(path="d", type="llama3.foo")
    with pytest.raises(ValueError, match="unknown value 'alpacka'"):
        DatasetConfig(path="d", type="alpacka")


def test_reference_answer():
    alpaca = DatasetConfig(path="a", type="alpaca")
    prompt, answer = reference_answer(alpaca, {"instruction": "What is the capital of france?",
                                               "output": "paris"})
    assert (prompt, answer) == (ALPACA_NO_INPUT, "paris")
    chat = DatasetConfig(path="c", type="chat_template")
    assert reference_answer(chat, {"messages": CONVERSATION}) == (CONVERSATION[:4], "fine thanks")
    assert reference_answer(chat, {"messages": CONVERSATION[:2]}) is None
    assert reference_answer(DatasetConfig(path="t", type="completion"), {"text": "x"}) is None
    assert reference_answer(DatasetConfig(path="t"), {"input_ids": [1]}) is None


def test_labels_are_minus_100_or_the_token(tokenizer):
    for kind, row, *_ in INSTRUCTION_FAMILY:
        encoded = encode(tokenizer, row, type=kind)
        assert all(label in (IGNORE_INDEX, token)
                   for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True))


def test_char_index_and_offset_index_agree(tokenizer):
    """The two ways of finding a span's tokens (Rust char -> token map; sorted offsets) agree,
    BOS (added by the tokenizer, no characters) included."""
    import random

    from tunegraph.ops.prompts.common import OffsetIndex, TokenIndex

    text = "the cat sat on the mat. what is the capital of france? paris, hello there"
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=True)
    assert encoding.offsets[0] == (0, 0)  # <s>
    by_char, by_offset = TokenIndex(encoding, len(text)), OffsetIndex(encoding.offsets)
    rng = random.Random(0)
    for _ in range(300):
        start = rng.randrange(len(text) + 1)
        end = rng.randrange(start, len(text) + 2)
        tokens = by_char.ending_in(start, end)
        assert tokens == by_offset.ending_in(start, end), (start, end)
        assert all(start < encoding.offsets[k][1] <= end for k in tokens)

