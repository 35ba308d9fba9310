"""Built-in chat templates: each renders a sample conversation to the exact text its model family
publishes, marks assistant turns for transformers' assistant masks, and is a recipe choice."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tunegraph.config.schema import CHAT_TEMPLATES
from tunegraph.ops.templates import BUILT_IN, QWEN_DEFAULT_SYSTEM, has_generation_markers

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": " See you. "}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
              "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\n See you. <|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>",
    "gemma": "<s><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nSee you.<end_of_turn>\n",
    "phi_3": "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\n See you. <|end|>\n</s>",
    "phi_35": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n"
              "<|user|>\nBye<|end|>\n<|assistant|>\n See you. <|end|>\n</s>",
    "mistral_v1": "<s> [INST] Be brief.\n\nHi! [/INST] Hello.</s> [INST] Bye [/INST]  See you. </s>",
    "mistral_v2v3": "<s>[INST] Be brief.\n\nHi![/INST] Hello.</s>[INST] Bye[/INST]  See you. </s>",
    "mistral_v3_tekken": "<s>[INST]Be brief.\n\nHi![/INST]Hello.</s>[INST]Bye[/INST] See you. </s>",
    "qwen_25": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
               "<|im_start|>assistant\n See you. <|im_end|>\n",
    "cohere": "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi!<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello.<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Bye<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|> See you. <|END_OF_TURN_TOKEN|>",
    "alpaca": "Be brief.\n\n### Instruction: Hi!\n\n### Response: Hello.</s>"
              "### Instruction: Bye\n\n### Response:  See you. </s>",
    # Gemma 3 writes the system text at the start of the first user turn.
    "gemma3": "<s><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello."
              "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
              "See you.<end_of_turn>\n",
    # Qwen3: the last answer, after the last user query, gets its (here empty) reasoning block.
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
             "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n\n</think>\n\n See you. <|im_end|>\n",
    "llama4": "<s><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
              "<|header_start|>user<|header_end|>\n\nHi!<|eot|>"
              "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>"
              "<|header_start|>user<|header_end|>\n\nBye<|eot|>"
              "<|header_start|>assistant<|header_end|>\n\n See you. <|eot|>",
}
# The text each template leaves open for the model's answer after the first user message.
GENERATION_PROMPT_END = {
    "chatml": "Hi!<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "Hi!<end_of_turn>\n<start_of_turn>model\n", "phi_3": "Hi!<|end|>\n<|assistant|>\n",
    "phi_35": "Hi!<|end|>\n<|assistant|>\n", "mistral_v1": "Hi! [/INST]",
    "mistral_v2v3": "Hi![/INST]", "mistral_v3_tekken": "Hi![/INST]",
    "qwen_25": "Hi!<|im_end|>\n<|im_start|>assistant\n",
    "cohere": "Hi!<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "alpaca": "### Instruction: Hi!\n\n### Response: ",
    "gemma3": "Hi!<end_of_turn>\n<start_of_turn>model\n",
    "qwen3": "Hi!<|im_end|>\n<|im_start|>assistant\n",
    "llama4": "Hi!<|eot|><|header_start|>assistant<|header_end|>\n\n",
}
# What each template's generation blocks cover: the answers and their end-of-turn token.
ASSISTANT_BLOCKS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
                    "phi_3": "<|end|>", "phi_35": "<|end|>", "mistral_v1": "</s>",
                    "mistral_v2v3": "</s>", "mistral_v3_tekken": "</s>", "qwen_25": "<|im_end|>",
                    "cohere": "<|END_OF_TURN_TOKEN|>", "alpaca": "</s>",
                    "gemma3": "<end_of_turn>", "qwen3": "<|im_end|>", "llama4": "<|eot|>"}


def render(name: str, messages: list[dict], **kwargs) -> tuple[str, list[str]]:
    rendered, blocks = render_jinja_template([messages], chat_template=BUILT_IN[name],
                                             return_assistant_tokens_mask=True, **SPECIAL,
                                             **kwargs)
    return rendered[0], [rendered[0][a:b] for a, b in blocks[0]]


def sample(name: str) -> list[dict]:
    # Gemma has no system role: its template rejects one (tested below).
    return CONVERSATION[1:] if name == "gemma" else CONVERSATION


def test_every_built_in_template_is_a_recipe_choice_and_tested():
    assert set(BUILT_IN) == set(CHAT_TEMPLATES) - {"tokenizer_default", "jinja"}
    assert set(EXPECTED) == set(BUILT_IN) == set(GENERATION_PROMPT_END) == set(ASSISTANT_BLOCKS)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_template_renders_the_exact_text(name):
    text, blocks = render(name, sample(name))
    assert text == EXPECTED[name]
    assert has_generation_markers(BUILT_IN[name])
    trimmed = name in ("llama3", "gemma", "gemma3")  # these templates trim message contents
    end = ASSISTANT_BLOCKS[name]
    last = "See you." if trimmed else " See you. "
    if name == "qwen3":  # the model writes the reasoning block too: it is in the block
        last = "<think>\n\n</think>\n\n" + last
    assert blocks == ["Hello." + end, last + end]


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_generation_prompt(name):
    messages = sample(name)[: 2 if name != "gemma" else 1]
    text, _ = render(name, messages, add_generation_prompt=True)
    assert text.endswith(GENERATION_PROMPT_END[name])


@pytest.mark.parametrize("name, messages, message", [
    ("gemma", CONVERSATION, "System role not supported"),
    ("gemma", CONVERSATION[2:], "roles must alternate"),
    ("gemma3", CONVERSATION[2:], "roles must alternate"),
    ("llama4", [CONVERSATION[1], {"role": "tool", "content": "22C"}], "tool turns"),
    ("mistral_v2v3", [CONVERSATION[1], CONVERSATION[1]], "roles must alternate"),
])
def test_templates_reject_what_the_model_family_rejects(name, messages, message):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match=message):
        render(name, messages)


def test_qwen_default_system_and_tool_calls():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "22C"}, {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "22C and sunny."}]
    text, blocks = render("qwen_25", messages, tools=tools)
    assert text.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}\n\n# Tools\n")
    assert ('\n<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": '
            '{}}}\n</tools>\n') in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\nsunny\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n22C and sunny.<|im_end|>\n")
    assert blocks == [call + "<|im_end|>", "22C and sunny.<|im_end|>"]


def test_qwen3_reasoning_is_kept_only_after_the_last_query():
    """Qwen3's own rule: an answer before the last user query loses its reasoning (given inline
    as <think>...</think> or as reasoning_content); tool-calling steps after it keep theirs; the
    last answer always has a reasoning block. Tools go into the system turn."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                {"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": "", "reasoning_content": "ask the tool",
                 "tool_calls": [call]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny.", "reasoning_content": "\nit said so\n"}]
    text, blocks = render("qwen3", messages, tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "add them" not in text
    tool_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert blocks == ["4<|im_end|>",
                      f"<think>\nask the tool\n</think>\n\n{tool_call}<|im_end|>",
                      "<think>\nit said so\n</think>\n\nSunny.<|im_end|>"]
    assert text.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n" + blocks[-1] + "\n")
    prompt, _ = render("qwen3", messages[1:2], add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
