"""`type: my_module.my_fn`: a user's transform imported from the recipe's folder or the working
directory; its output's shape picks the masking (chat, prompt/completion, segments, tokens, text)."""

from __future__ import annotations

import pytest
from prompts_support import encode, trained_spans

TRANSFORMS = '''
def to_chat(cfg):
    def transform(row, tokenizer=None):
        assert tokenizer is not None
        return {"messages": [{"role": "user", "content": row["q"]},
                             {"role": "assistant", "content": row["a"]}]}
    return transform, {"remove_columns": ["q", "a"]}


def to_pair(cfg):
    return lambda row: {"prompt": "Q: " + row["q"] + " A:", "completion": " " + row["a"]}


def to_segments(cfg):
    return lambda row: {"segments": [{"text": row["q"] + " ", "label": False},
                                     {"text": row["a"], "label": True}]}


def to_tokens(cfg):
    return lambda row: {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}


def to_text(cfg):
    return lambda row: {"text": row["q"] + " " + row["a"]}


def to_nothing(cfg):
    return lambda row: {"question": row["q"]}


def not_a_mapping(cfg):
    return lambda row: [row["q"]]
'''
ROW = {"q": "what is the capital of france?", "a": "paris"}


@pytest.fixture
def transforms(tmp_path, monkeypatch):
    """The module lives beside a recipe, not in the working directory or on sys.path."""
    module = f"transforms_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(TRANSFORMS)
    monkeypatch.chdir(tmp_path.parent)
    return module, tmp_path


def test_transform_to_chat_uses_chat_template_masks(tokenizer, transforms):
    module, folder = transforms
    encoded = encode(tokenizer, ROW, type=f"{module}.to_chat", search_dirs=(folder,))
    assert tokenizer.decode(encoded["input_ids"]) == (
        "<|im_start|>user\nwhat is the capital of france?<|im_end|>\n"
        "<|im_start|>assistant\nparis<|im_end|>\n")
    assert trained_spans(tokenizer, encoded) == ["paris<|im_end|>"]


@pytest.mark.parametrize("function, text, trained", [
    ("to_pair", "<s>Q: what is the capital of france? A: paris</s>", [" paris</s>"]),
    ("to_segments", "what is the capital of france? paris", [" paris"]),
    ("to_text", "<s>what is the capital of france? paris</s>",
     ["<s>what is the capital of france? paris</s>"]),
])
def test_transform_shapes(tokenizer, transforms, function, text, trained):
    module, folder = transforms
    encoded = encode(tokenizer, ROW, type=f"{module}.{function}", search_dirs=(folder,))
    assert tokenizer.decode(encoded["input_ids"]) == text
    assert trained_spans(tokenizer, encoded) == trained


def test_transform_to_tokens(tokenizer, transforms):
    module, folder = transforms
    assert encode(tokenizer, ROW, type=f"{module}.to_tokens", search_dirs=(folder,)) == {
        "input_ids": [1, 5, 6], "labels": [-100, 5, 6]}


def test_transform_from_the_working_directory(tokenizer, transforms, monkeypatch):
    module, folder = transforms
    monkeypatch.chdir(folder)
    assert trained_spans(tokenizer, encode(tokenizer, ROW, type=f"{module}.to_chat")) == [
        "paris<|im_end|>"]


@pytest.mark.parametrize("function, message", [
    ("to_nothing", "returned keys \\['question'\\]; expected input_ids, messages"),
    ("not_a_mapping", "returned list, not a mapping"),
])
def test_transform_errors_name_row(tokenizer, transforms, function, message):
    module, folder = transforms
    with pytest.raises(ValueError, match=f"data/rows.jsonl, row 7 .*{message}"):
        encode(tokenizer, ROW, type=f"{module}.{function}", search_dirs=(folder,))


def test_missing_module_or_function(tokenizer, transforms):
    module, folder = transforms
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        encode(tokenizer, ROW, type="no_such_module.fn", search_dirs=(folder,))
    with pytest.raises(ValueError, match=f"module '{module}' .* has no function 'missing'"):
        encode(tokenizer, ROW, type=f"{module}.missing", search_dirs=(folder,))
