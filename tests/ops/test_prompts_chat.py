"""chat_template masks, token by token: multi-turn, end-of-turn tokens that are not EOS (Gemma),
system and tool turns, per-message and per-span training flags, truncation, agreement with
transformers' and TRL's assistant masks, and one render per conversation."""

from __future__ import annotations

import json

import pytest
from prompts_support import assert_golden, encode, trained_spans, with_template_tokens

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy
from tunegraph.ops.prompts import chat as chat_module
from tunegraph.ops.templates import BUILT_IN

CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]


@pytest.fixture
def template_tokenizer(tokenizer):
    """The tiny tokenizer knowing every built-in template's special tokens."""
    return with_template_tokens(tokenizer)


def with_template(tokenizer, name):
    tokenizer.chat_template = BUILT_IN[name]
    return tokenizer


@pytest.mark.parametrize("train_on_eos, expected", [
    ("turn", ["hello there<|im_end|>", "fine thanks<|im_end|>"]),
    ("last", ["hello there", "fine thanks<|im_end|>"]),
    ("none", ["hello there", "fine thanks"]),
    ("all", ["<|im_end|>", "<|im_end|>", "hello there<|im_end|>", "<|im_end|>",
             "fine thanks<|im_end|>"]),
])
def test_multi_turn_train_on_eos(tokenizer, train_on_eos, expected):
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     train_on_eos=train_on_eos)
    assert trained_spans(tokenizer, encoded) == expected
    if train_on_eos == "turn":
        assert_golden("chat_template_chatml", tokenizer, encoded)


def test_roles_mapping_and_message_property_mappings(tokenizer):
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"},
                {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine thanks"}]
    legacy = encode(tokenizer, {"conversations": sharegpt}, type="chat_template",
                    field_messages="conversations", message_field_role="from",
                    message_field_content="value", roles={"user": ["human"], "assistant": ["gpt"]})
    mapped = encode(tokenizer, {"conversations": sharegpt}, type="chat_template",
                    field_messages="conversations",
                    message_property_mappings={"role": "from", "content": "value"})
    assert legacy == mapped
    assert trained_spans(tokenizer, mapped) == ["hello there<|im_end|>", "fine thanks<|im_end|>"]
    assert "<|im_start|>user\nhi" in tokenizer.decode(mapped["input_ids"])


def test_roles_to_train_and_train_on_inputs(tokenizer):
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     roles_to_train=["user"])
    assert trained_spans(tokenizer, encoded) == ["hi<|im_end|>", "how are you<|im_end|>"]
    everything = encode(tokenizer, {"messages": CONVERSATION}, train_on_inputs=True,
                        type="chat_template")
    assert everything["labels"] == everything["input_ids"]


def test_system_turn_trained_on_request_and_dropped_on_request(tokenizer):
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     roles_to_train=["system", "assistant"])
    assert trained_spans(tokenizer, encoded)[0] == "be brief<|im_end|>"
    dropped = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     drop_system_message=True)
    assert "be brief" not in tokenizer.decode(dropped["input_ids"])


def test_gemma_end_of_turn_is_trained_although_it_is_not_eos(template_tokenizer):
    """Gemma's assistant turn ends with <end_of_turn>; its EOS never appears in a conversation.
    Training only EOS (Axolotl's default) would never teach the model to stop."""
    tokenizer = with_template(template_tokenizer, "gemma")
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") != tokenizer.eos_token_id
    encoded = encode(tokenizer, {"messages": CONVERSATION[1:]}, type="chat_template")
    assert tokenizer.decode(encoded["input_ids"]).startswith("<s><start_of_turn>user\nhi")
    assert tokenizer.eos_token_id not in encoded["input_ids"]
    assert trained_spans(tokenizer, encoded) == ["hello there<end_of_turn>",
                                                 "fine thanks<end_of_turn>"]
    assert_golden("chat_template_gemma", tokenizer, encoded)
    with pytest.raises(ValueError, match="row 7 .*rejects this conversation: System role"):
        encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")


def test_eot_tokens_and_train_on_eot_apart_from_eos(template_tokenizer):
    tokenizer = with_template(template_tokenizer, "mistral_v2v3")
    # Mistral ends answers with EOS; [/INST] ends user turns. " hello" ends in the answer, so it
    # is trained although the template writes its space before the answer.
    plain = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
    assert trained_spans(tokenizer, plain) == [" hello there</s>", " fine thanks</s>"]
    eos_off = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     train_on_eos="none", train_on_eot="all")
    assert trained_spans(tokenizer, eos_off) == ["[/INST] hello there", "[/INST] fine thanks"]
    tokenizer = with_template(template_tokenizer, "phi_3")
    # Phi-3: <|end|> ends every turn, an EOS ends the conversation (it belongs to no turn).
    encoded = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
                     eot_tokens=["<|end|>"], train_on_eot="last")
    assert tokenizer.decode(encoded["input_ids"]).endswith("fine thanks<|end|>\n</s>")
    assert trained_spans(tokenizer, encoded) == ["hello there", "fine thanks<|end|>"]
    with pytest.raises(ValueError, match="EOS token is one of the end-of-turn tokens"):
        encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
               eot_tokens=["</s>"], train_on_eos="turn", train_on_eot="none")
    with pytest.raises(ValueError, match="eot_tokens: '<\\|turn_end\\|>' is not one token"):
        encode(tokenizer, {"messages": CONVERSATION}, type="chat_template",
               eot_tokens=["<|turn_end|>"])


def test_tool_calls_and_tool_turns(template_tokenizer):
    """Qwen2.5's tool format: the assistant's tool call is trained (it is generated), the tool's
    response is not; tools reach the template from the `tools` column (JSON text works too)."""
    tokenizer = with_template(template_tokenizer, "qwen_25")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "what is the weather in paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "paris"}}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "it is sunny"}]
    for row_tools in (tools, json.dumps(tools)):
        encoded = encode(tokenizer, {"messages": messages, "tools": row_tools},
                         type="chat_template")
        text = tokenizer.decode(encoded["input_ids"])
        assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
        assert trained_spans(tokenizer, encoded) == [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
            '<|im_end|>', "it is sunny<|im_end|>"]
    assert_golden("chat_template_qwen25_tools", tokenizer, encoded)
    tool_trained = encode(tokenizer, {"messages": messages}, type="chat_template",
                          roles_to_train=["tool"])
    # The tool turn's terminator is the <|im_end|> closing the <tool_response> block.
    assert trained_spans(tokenizer, tool_trained) == ["sunny", "<|im_end|>"]
    # Without generation markers a tool call's tokens cannot be told apart: an error, not a guess.
    tokenizer.chat_template = BUILT_IN["qwen_25"].replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    with pytest.raises(ValueError, match="row 7 .*message 1 holds tool_calls but no content"):
        encode(tokenizer, {"messages": messages}, type="chat_template")


def test_message_field_training_and_detail(tokenizer):
    """Axolotl's documented example: per-message `train` flags and character spans."""
    conversation = [
        {"from": "system", "value": "you are an assistant", "train": False},
        {"from": "human", "value": "hello", "train": False},
        {"from": "assistant", "value": "hello", "train": True},
        {"from": "human", "value": "how are you?", "train": True},
        {"from": "assistant", "value": "i am fine, thanks a lot!",
         "train_detail": [{"begin_offset": 0, "end_offset": 8, "train": False},
                          {"begin_offset": 9, "end_offset": 16, "train": True},
                          {"begin_offset": 17, "end_offset": 23, "train": False}]},
        {"from": "assistant", "value": "hi there", "train": True}]
    encoded = encode(tokenizer, {"conversations": conversation}, type="chat_template",
                     field_messages="conversations",
                     message_property_mappings={"role": "from", "content": "value"},
                     roles_to_train=[], train_on_eos="turn", message_field_training="train",
                     message_field_training_detail="train_detail")
    # "i am fine" is 0..8 (end_offset inclusive), ", thanks" 9..16 (trained), " a lot!" 17..23;
    # the untrained turn's <|im_end|> is not trained (train_on_eos: turn).
    assert trained_spans(tokenizer, encoded) == [
        "hello<|im_end|>", "how are you?<|im_end|>", ", thanks", "hi there<|im_end|>"]
    assert_golden("chat_template_training_detail", tokenizer, encoded)


@pytest.mark.parametrize("detail, message", [
    ([{"begin_offset": 3, "end_offset": 1, "train": True}], "must satisfy 0 <= begin_offset"),
    ([{"begin_offset": 0, "train": True}], "needs integer begin_offset and end_offset"),
    ("0-3", "must be a list"),
])
def test_bad_training_detail(tokenizer, detail, message):
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "detail": detail}]}
    with pytest.raises(ValueError, match=f"row 7 .*messages\\[1\\].detail.*{message}"):
        encode(tokenizer, row, type="chat_template", message_field_training_detail="detail")


def test_content_that_also_occurs_in_template_text(tokenizer):
    """A user message "user" next to "<|im_start|>user": the marker render finds the content."""
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "im"},
                {"role": "user", "content": "start"}, {"role": "assistant", "content": "assistant"}]
    tokenizer.chat_template = BUILT_IN["chatml"].replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")  # content search for every message
    encoded = encode(tokenizer, {"messages": messages}, type="chat_template",
                     roles_to_train=["user", "assistant"])
    assert trained_spans(tokenizer, encoded) == ["user<|im_end|>", "im<|im_end|>",
                                                 "start<|im_end|>", "assistant<|im_end|>"]


def test_truncation_at_sequence_len_keeps_the_exact_mask(tokenizer, make_recipe, tmp_path):
    from tunegraph.ops.tokenize import load_tokenized, tokenize_dataset

    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    full = encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
    cut = len(full["input_ids"]) - 3  # ... "fine" | " thanks" "<|im_end|>" "\n"
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    recipe = make_recipe(datasets=[{"path": "chat.jsonl", "type": "chat_template"}],
                         sequence_len=cut, chat_template="chatml")
    stats = tokenize_dataset(recipe, tokenizer_dir, tmp_path / "out")
    assert stats["num_truncated"] == 1
    row = load_tokenized(tmp_path / "out", "train")[0]
    assert row["input_ids"] == full["input_ids"][:cut]
    assert row["labels"] == full["labels"][:cut]
    assert trained_spans(tokenizer, row) == ["hello there<|im_end|>", "fine"]


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_agrees_with_transformers_assistant_masks(template_tokenizer, name):
    """For every built-in template, the trained tokens are exactly transformers' assistant mask
    (the {% generation %} blocks: content + end-of-turn token) on the same tokenizer and data."""
    tokenizer = with_template(template_tokenizer, name)
    conversations = [CONVERSATION,
                     [{"role": "user", "content": "what is the capital of france?"},
                      {"role": "assistant", "content": " paris, the capital\n"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]]
    for messages in conversations:
        if name == "gemma" and messages[0]["role"] == "system":
            messages = messages[1:]
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        ours = encode(tokenizer, {"messages": messages}, type="chat_template")
        assert ours["input_ids"] == reference["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in ours["labels"]] == reference[
            "assistant_masks"]


def test_agrees_with_trl_sft_assistant_only_loss(tokenizer, tmp_path):
    """TRL's SFTTrainer with assistant_only_loss prepares the same labels as tunegraph."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": CONVERSATION},
            {"messages": [{"role": "user", "content": "add two numbers"},
                          {"role": "assistant", "content": "four"}]}]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None,
                     report_to=[], bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows))
    strategy = make_strategy(tokenizer, DatasetConfig(path="d", type="chat_template"), False)
    ours = strategy.encode_batch(rows)
    assert [row["labels"] for row in trainer.train_dataset] == [o["labels"] for o in ours]
    assert [row["input_ids"] for row in trainer.train_dataset] == [o["input_ids"] for o in ours]


def test_a_conversation_is_rendered_once(tokenizer, monkeypatch):
    """Linear in turns: one template render per conversation, however long (Axolotl renders
    once per turn), and one batched tokenizer call for these rows (one per 64 rows)."""
    renders, tokenizer_calls = [], []
    render = chat_module.render_jinja_template
    monkeypatch.setattr(chat_module, "render_jinja_template",
                        lambda *a, **k: renders.append(1) or render(*a, **k))
    backend = tokenizer.backend_tokenizer
    encode_batch = backend.encode_batch

    class Counting:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode_batch(self, *a, **k):
            tokenizer_calls.append(1)
            return encode_batch(*a, **k)

    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: Counting()))
    messages = [{"role": ("user", "assistant")[t % 2], "content": f"answer {t}"}
                for t in range(400)]
    strategy = make_strategy(tokenizer, DatasetConfig(path="d", type="chat_template"), False)
    encoded = strategy.encode_batch([{"messages": messages}] * 3)
    assert (len(renders), len(tokenizer_calls)) == (3, 1)
    assert trained_spans(tokenizer, encoded[0]) == [f"answer {t}<|im_end|>"
                                                    for t in range(1, 400, 2)]


def test_template_changing_content_is_reported(tokenizer):
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


def test_no_chat_template_is_a_dataset_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="data/rows.jsonl: type chat_template, but the tokenizer "
                                         "has no chat template"):
        encode(tokenizer, {"messages": CONVERSATION}, type="chat_template")
