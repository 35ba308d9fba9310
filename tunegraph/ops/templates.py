"""Built-in chat templates (Jinja), by the names recipes use in `chat_template:`.

    from tunegraph.ops.templates import BUILT_IN
    tokenizer.chat_template = BUILT_IN["llama3"]

Each template reproduces the model family's published prompt format (the text a model of that
family sees at inference) and wraps every assistant turn, its end-of-turn token included, in
`{% generation %}`, so transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss`
work with them, and tunegraph's masks cover tool calls (see `tunegraph.ops.prompts.chat`).
transformers compiles templates with `trim_blocks` and `lstrip_blocks`, so every template here
writes its text through `{{ ... }}` expressions only: the layout of the Jinja source never leaks
into the rendering. `tests/ops/test_templates.py` renders each one with a sample conversation and
checks the exact text.
"""

from __future__ import annotations

# <|im_start|>role\ncontent<|im_end|>\n (OpenHermes, Qwen, SmolLM, ...); no default system prompt.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 / 3.1 Instruct without the 3.1 date preamble: contents are trimmed, turns end with
# <|eot_id|>, BOS once at the start.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Gemma (1 and 2): the assistant is "model", turns end with <end_of_turn> (not EOS), no system
# role, strictly alternating user/model turns: Google's template rejects anything else.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}"
    "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _phi(bos: str) -> str:
    # Phi-3 / Phi-3.5 mini: <|role|>\ncontent<|end|>\n, EOS after the last turn when the prompt is
    # not left open for generation. Phi-3 starts with BOS, Phi-3.5 does not.
    return (
        bos
        + "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' }}"
        "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )


PHI_3 = _phi("{{ bos_token }}")
PHI_35 = _phi("")


def _mistral(user_open: str, user_close: str, assistant_open: str) -> str:
    # Mistral's [INST] formats (mistral-common tokenizer versions): no system role, so a system
    # message is prepended to the first user message with a blank line; the assistant's answer
    # ends with EOS; roles must alternate.
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message %}"
        f"{{{{ '{user_open}' + system_message + '\n\n' + message['content'] + '{user_close}' }}}}"
        f"{{% else %}}{{{{ '{user_open}' + message['content'] + '{user_close}' }}}}{{% endif %}}"
        "{% else %}"
        f"{{{{ '{assistant_open}' }}}}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% endif %}"
        "{% endfor %}"
    )


MISTRAL_V1 = _mistral(" [INST] ", " [/INST]", " ")
MISTRAL_V2V3 = _mistral("[INST] ", "[/INST]", " ")
MISTRAL_V3_TEKKEN = _mistral("[INST]", "[/INST]", "")

# Qwen2.5 Instruct: ChatML with a default system prompt, tools listed in the system turn, tool
# calls as <tool_call> JSON inside the assistant turn, tool results as <tool_response> blocks
# inside a user turn (consecutive tool messages share one).
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_25 = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    f"{{% else %}}{{% set system_message = '{QWEN_DEFAULT_SYSTEM}' %}}{{% endif %}}"
    "{{ '<|im_start|>system\n' + system_message }}"
    "{% if tools %}"
    "{{ '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>' }}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] or [] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{ call['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Cohere Command-R: role tokens inside one turn-start token, turns end with <|END_OF_TURN_TOKEN|>.
COHERE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}"
    "{% generation %}{{ message['content'] + '<|END_OF_TURN_TOKEN|>' }}{% endgeneration %}"
    "{% elif message['role'] == 'system' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{% else %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

# Alpaca as a chat template (Axolotl's `alpaca`): a system message is written as plain text first.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction: ' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response: ' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response: ' }}{% endif %}"
)

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "phi_3": PHI_3, "phi_35": PHI_35,
            "mistral_v1": MISTRAL_V1, "mistral_v2v3": MISTRAL_V2V3,
            "mistral_v3_tekken": MISTRAL_V3_TEKKEN, "qwen_25": QWEN_25, "cohere": COHERE,
            "alpaca": ALPACA}

# Tokens that end a turn in common templates. Unless a recipe sets `eot_tokens`, a template's
# end-of-turn tokens are those of these that its text contains; the first one after a trained
# message is trained with train_on_eot (default: train_on_eos) `turn`, so the model learns to stop.
# Gemma's <end_of_turn> differs from its EOS, which is why EOS alone is not enough.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>",
                      "<|END_OF_TURN_TOKEN|>", "[/INST]")


def has_generation_markers(template: str) -> bool:
    """Whether a template marks assistant turns with {% generation %} (transformers' convention)."""
    return "generation %}" in template.replace("-%}", " %}")
