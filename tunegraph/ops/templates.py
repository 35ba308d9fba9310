"""Built-in chat templates (Jinja), by the names recipes use in `chat_template:`.

Templates mark assistant turns with `{% generation %}` so transformers can return assistant masks;
tunegraph's own masking does not depend on those markers (see `tunegraph.ops.prompts`).
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILT_IN = {"chatml": CHATML}

# Tokens that end a turn in common templates; the first of these after an assistant message is
# trained with train_on_eos: turn, so the model learns to stop (Gemma's <end_of_turn> differs
# from its EOS, which is why EOS alone is not enough).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "[/INST]")
