"""Built-in chat templates (Jinja), by the names recipes use in `chat_template:`.

    from tunegraph.ops.templates import BUILT_IN
    tokenizer.chat_template = BUILT_IN["llama3"]

Each template reproduces the model family's published prompt format (the text a model of that
family sees at inference) and wraps every assistant turn, its end-of-turn token included, in
`{% generation %}`, so transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss`
work with them, and tunegraph's masks cover tool calls (see `tunegraph.ops.prompts.chat`).
transformers compiles templates with `trim_blocks` and `lstrip_blocks`, so every template here
writes its text through `{{ ... }}` expressions only: the layout of the Jinja source never leaks
into the rendering. `tests/ops/test_prompts_templates.py` renders each one with a sample
conversation and checks the exact text. The templates are written from each family's published
format (model cards, the official tokenizer templates' behaviour), not copied from Axolotl.
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

# Gemma 3: Gemma's turns, but a system message is allowed: its text opens the first user turn,
# followed by a blank line (Gemma 3 has no system role of its own). User and model texts are
# trimmed, the system text is not; roles after it must alternate user/model.
GEMMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}"
    "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' }}"
    "{% if loop.first %}{{ first_user_prefix }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Qwen3 (hybrid thinking): ChatML with no default system prompt and Qwen2.5's tool format. An
# assistant's reasoning comes from its `reasoning_content`, or from a `<think>...</think>` block
# at the start of its content. Reasoning is written only for assistant turns after the last real
# user query (not a wrapped tool response): always for the last message, which gets an empty
# `<think>\n\n</think>` block when it has no reasoning, and for tool-calling steps that have
# some; earlier answers keep only their final text, as Qwen3's official template renders them.
# The generation block is what the model writes: reasoning block, answer, tool calls, <|im_end|>.
QWEN3_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN3_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
QWEN3 = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    f"{{{{ '{QWEN3_TOOLS_INTRO}' }}}}"
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    f"{{{{ '{QWEN3_TOOLS_OUTRO}' }}}}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    # The last user message that is a query, not tool output wrapped in <tool_response>.
    "{% set ns = namespace(last_query=messages | length - 1) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
    " and message['content'].endswith('</tool_response>')) %}"
    "{% set ns.last_query = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% set reasoning = '' %}"
    "{% if message['reasoning_content'] is string %}"
    "{% set reasoning = message['reasoning_content'] %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1]"
    ".lstrip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{% endif %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{% else %}{{ content }}{% endif %}"
    "{% for tool_call in message['tool_calls'] or [] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{% if content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}"
    "{% else %}{{ call['arguments'] | tojson }}{% endif %}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

# Llama 4 Instruct, text only: <|header_start|>role<|header_end|>\n\ncontent<|eot|>, BOS once; a
# leading system message is trimmed, other contents are written as they are. Llama 4 writes tool
# results as `ipython` turns and tool calls in its own syntax; this template does not, so it
# rejects tool turns rather than guess (use the model's own template through tokenizer_default).
LLAMA4 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') or message['tool_calls'] %}"
    "{{ raise_exception('the llama4 template writes system, user and assistant text turns only; "
    "for tool calls and tool turns use the model template (chat_template: tokenizer_default)') }}"
    "{% endif %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|eot|>' }}{% endgeneration %}"
    "{% elif message['role'] == 'system' and loop.first %}{{ message['content'] | trim + '<|eot|>' }}"
    "{% else %}{{ message['content'] + '<|eot|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{% endif %}"
)

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "phi_3": PHI_3, "phi_35": PHI_35,
            "mistral_v1": MISTRAL_V1, "mistral_v2v3": MISTRAL_V2V3,
            "mistral_v3_tekken": MISTRAL_V3_TEKKEN, "qwen_25": QWEN_25, "cohere": COHERE,
            "alpaca": ALPACA, "gemma3": GEMMA3, "qwen3": QWEN3, "llama4": LLAMA4}

# Tokens that end a turn in common templates. Unless a recipe sets `eot_tokens`, a template's
# end-of-turn tokens are those of these that its text contains; the first one after a trained
# message is trained with train_on_eot (default: train_on_eos) `turn`, so the model learns to stop.
# Gemma's <end_of_turn> differs from its EOS, which is why EOS alone is not enough.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>",
                      "<|END_OF_TURN_TOKEN|>", "[/INST]", "<|eot|>")


def has_generation_markers(template: str) -> bool:
    """Whether a template marks assistant turns with {% generation %} (transformers' convention)."""
    return "generation %}" in template.replace("-%}", " %}")
