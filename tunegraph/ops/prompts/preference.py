"""Preference and RL row formats, written and tokenized as TRL's trainers take them.

    strategy = make_preference_strategy(tokenizer, PreferenceDatasetConfig(...), rl="dpo")
    strategy.format(row, row_number)   # DPO/IPO/ORPO: {"prompt", "chosen", "rejected"} (strings)
                                       # KTO: {"prompt", "completion", "label"}
    strategy(row, row_number)          # + TRL's tokenized columns: prompt_ids, chosen_ids,
                                       #   rejected_ids (DPO/ORPO) or prompt_ids, completion_ids
    grpo_rows(dataset_cfg, rows, search_dirs)   # GRPO: the user's transform applied to every row

Formats (Axolotl's names, `docs/rlhf.qmd`): DPO/IPO `chatml.*` and `llama3.*` (`intel`,
`argilla`, `prompt_pairs`, `icr`, `ultra`: the same fields, ChatML or Llama-3 header prompts),
`chat_template.default` and a user-defined mapping; ORPO `chat_template.argilla`; KTO `chatml.*`
and `llama3.*` (`intel`, `argilla`, `prompt_pairs`, `ultra`) and a user-defined mapping; GRPO
`module.function` transforms returning `(map_fn, {"remove_columns"})`.

Tokenization follows TRL's `DPOTrainer`/`KTOTrainer._prepare_dataset` for text datasets: EOS is
appended to each completion, the tokenizer adds its special tokens, and the completion starts
where the prompt's tokens end. tunegraph finds that point from one tokenization of prompt +
completion with character offsets; TRL tokenizes the prompt alone and takes the common prefix.
The two agree whenever no token straddles the prompt/completion boundary (tested against TRL).
No trainer runs these yet: a recipe with `rl:` still fails validation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from tunegraph.config.schema import (
    DPOFormat,
    KTOFormat,
    PreferenceDatasetConfig,
)
from tunegraph.ops.prompts.common import encode_texts, resolve_callable, row_error, text_field

RL_PAIRED = ("dpo", "ipo", "simpo", "orpo")
RL_KINDS = (*RL_PAIRED, "kto", "grpo")


def _chatml_prompt(system: str, user: str) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _llama3_prompt(system: str, user: str) -> str:
    # No <|begin_of_text|>: the tokenizer adds BOS when TRL tokenizes the prompt.
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return (f"{head}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n")


# Each family: (prompt writer, what ends an answer).
FAMILIES = {"chatml": (_chatml_prompt, "<|im_end|>"), "llama3": (_llama3_prompt, "<|eot_id|>")}


class PreferenceStrategy:
    """Formats a row as TRL's columns, then tokenizes them as TRL's trainer would."""

    def __init__(self, tokenizer: Any, dataset_cfg: PreferenceDatasetConfig, rl: str,
                 fmt: Callable[[dict[str, Any], int], dict[str, Any]]):
        self.tokenizer, self.dataset_cfg, self.rl, self.format = tokenizer, dataset_cfg, rl, fmt

    def __call__(self, row: dict[str, Any], row_number: int) -> dict[str, Any]:
        formatted = self.format(row, row_number)
        return {**formatted, **self.tokenize(formatted)}

    def tokenize(self, formatted: dict[str, Any]) -> dict[str, list[int]]:
        """TRL's tokenized columns for a formatted row."""
        eos = self.tokenizer.eos_token
        prompt = formatted["prompt"]
        keys = ("chosen", "rejected") if self.rl in RL_PAIRED else ("completion",)
        completions = [c if c.endswith(eos) else c + eos for c in (formatted[k] for k in keys)]
        encoded = encode_texts(self.tokenizer, [prompt + c for c in completions], True)
        # Tokens that end inside the prompt are the prompt's; special tokens the tokenizer adds
        # in front (BOS) have the empty span (0, 0) and belong to the prompt too.
        cut = min(_prompt_tokens(offsets, len(prompt)) for _, offsets in encoded)
        ids = [list(token_ids) for token_ids, _ in encoded]
        while any(other[:cut] != ids[0][:cut] for other in ids[1:]):
            cut -= 1
        out = {"prompt_ids": ids[0][:cut]}
        for key, token_ids in zip(keys, ids, strict=True):
            out[f"{key}_ids"] = token_ids[cut:]
        return out


def _prompt_tokens(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    count = 0
    while count < len(offsets) and offsets[count][1] <= prompt_chars:
        count += 1
    return count


def _system(cfg: Any, row: dict[str, Any], n: int, key: str = "system") -> str:
    return text_field(cfg, row, n, key, optional=True)


def _answer(cfg: Any, row: dict[str, Any], n: int, key: str, from_conversation: bool) -> str:
    """`row[key]`, or for the `ultra` formats the content of message 1 (the first answer) of the
    conversation `row[key]`, as Axolotl reads UltraFeedback rows."""
    if not from_conversation:
        return text_field(cfg, row, n, key)
    messages = row.get(key)
    if not (isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[1], dict)):
        raise row_error(cfg, n, f"field '{key}' must be a conversation of at least two messages "
                                f"(user, assistant)")
    return text_field(cfg, messages[1], n, "content", where=f"{key}[1]")


def _paired(family: str, question_key: str, chosen_key: str, rejected_key: str,
            from_conversation: bool = False) -> Callable:
    write_prompt, end = FAMILIES[family]

    def fmt(cfg: PreferenceDatasetConfig, row: dict[str, Any], n: int) -> dict[str, Any]:
        prompt = write_prompt(_system(cfg, row, n), text_field(cfg, row, n, question_key))
        return {"prompt": prompt,
                "chosen": _answer(cfg, row, n, chosen_key, from_conversation) + end,
                "rejected": _answer(cfg, row, n, rejected_key, from_conversation) + end}
    return fmt


def _kto(family: str, question_key: str) -> Callable:
    write_prompt, end = FAMILIES[family]

    def fmt(cfg: PreferenceDatasetConfig, row: dict[str, Any], n: int) -> dict[str, Any]:
        prompt = write_prompt(_system(cfg, row, n), text_field(cfg, row, n, question_key))
        return {"prompt": prompt,
                "completion": text_field(cfg, row, n, "completion") + end,
                "label": _label(cfg, row, n, "label")}
    return fmt


def _label(cfg: Any, row: dict[str, Any], n: int, key: str) -> bool:
    value = row.get(key)
    if not isinstance(value, bool):
        got = "missing" if value is None else f"{value!r}, not true or false"
        raise row_error(cfg, n, f"field '{key}' is {got}")
    return value


class _Templated:
    """Chat-template formats: render the prompt with the generation prompt, and each answer as
    the rest of the rendered full conversation."""

    def __init__(self, tokenizer: Any, cfg: PreferenceDatasetConfig):
        from tunegraph.ops.prompts.chat import role_names

        if not tokenizer.chat_template:
            raise ValueError(f"dataset {cfg.path}: type {cfg.type}, but the tokenizer has no chat "
                             f"template; set chat_template")
        self.tokenizer, self.cfg, self.roles = tokenizer, cfg, role_names(cfg)

    def messages(self, value: Any, n: int, field: str) -> list[dict[str, str]]:
        role_key = self.cfg.message_property_mappings.get("role", "role")
        content_key = self.cfg.message_property_mappings.get("content", "content")
        items = [value] if isinstance(value, dict) else value
        if not isinstance(items, list) or not items:
            raise row_error(self.cfg, n, f"field '{field}' must be a message or a non-empty list "
                                         f"of messages")
        out = []
        for i, message in enumerate(items):
            where = f"{field}[{i}]" if isinstance(value, list) else field
            if not isinstance(message, dict) or message.get(role_key) not in self.roles:
                raise row_error(self.cfg, n, f"field '{where}' must be a message with a known "
                                             f"'{role_key}' ({', '.join(sorted(self.roles))})")
            out.append({"role": self.roles[message[role_key]],
                        "content": text_field(self.cfg, message, n, content_key, where=where)})
        return out

    def render(self, messages: list[dict[str, str]], n: int, generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as exc:
            raise row_error(self.cfg, n, f"the chat template rejects this conversation: "
                                         f"{exc}") from exc

    def answer(self, prompt_messages: list[dict[str, str]], prompt: str,
               answer: dict[str, str], n: int, field: str) -> str:
        full = self.render([*prompt_messages, answer], n, generation_prompt=False)
        if not full.startswith(prompt):
            raise row_error(self.cfg, n, f"the chat template renders the conversation with "
                                         f"'{field}' differently from the prompt alone, so the "
                                         f"answer cannot be cut off it")
        return full[len(prompt):]

    def default(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        """DPO chat_template.default: `field_messages` + `field_chosen`/`field_rejected` messages."""
        cfg = self.cfg
        prompt_messages = self.messages(row.get(cfg.field_messages), n, cfg.field_messages)
        prompt = self.render(prompt_messages, n, generation_prompt=True)
        out = {"prompt": prompt}
        for key, field in (("chosen", cfg.field_chosen), ("rejected", cfg.field_rejected)):
            answer = self.messages(row.get(field), n, field)[-1]
            out[key] = self.answer(prompt_messages, prompt, answer, n, field)
        return out

    def argilla(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        """ORPO chat_template.argilla: chosen/rejected conversations sharing all but the answer."""
        chosen = self.messages(row.get("chosen"), n, "chosen")
        rejected = self.messages(row.get("rejected"), n, "rejected")
        if row.get("prompt") is not None:
            prompt_messages = [{"role": "user", "content": text_field(self.cfg, row, n, "prompt")}]
        else:
            prompt_messages = chosen[:-1]
            if rejected[:-1] != prompt_messages:
                raise row_error(self.cfg, n, "fields 'chosen' and 'rejected' must share every "
                                             "message but the last")
        if row.get("system") is not None:
            prompt_messages = [{"role": "system", "content": _system(self.cfg, row, n)},
                               *[m for m in prompt_messages if m["role"] != "system"]]
        prompt = self.render(prompt_messages, n, generation_prompt=True)
        return {"prompt": prompt,
                "chosen": self.answer(prompt_messages, prompt, chosen[-1], n, "chosen"),
                "rejected": self.answer(prompt_messages, prompt, rejected[-1], n, "rejected")}


def _user_defined_dpo(mapping: DPOFormat) -> Callable:
    def fmt(cfg: PreferenceDatasetConfig, row: dict[str, Any], n: int) -> dict[str, Any]:
        values = {"prompt": text_field(cfg, row, n, mapping.field_prompt),
                  "system": _system(cfg, row, n, mapping.field_system),
                  "chosen": text_field(cfg, row, n, mapping.field_chosen),
                  "rejected": text_field(cfg, row, n, mapping.field_rejected)}
        return {"prompt": mapping.prompt_format.format(**values),
                "chosen": mapping.chosen_format.format(**values),
                "rejected": mapping.rejected_format.format(**values)}
    return fmt


def _user_defined_kto(mapping: KTOFormat) -> Callable:
    def fmt(cfg: PreferenceDatasetConfig, row: dict[str, Any], n: int) -> dict[str, Any]:
        values = {"prompt": text_field(cfg, row, n, mapping.field_prompt),
                  "system": _system(cfg, row, n, mapping.field_system),
                  "completion": text_field(cfg, row, n, mapping.field_completion)}
        return {"prompt": mapping.prompt_format.format(**values),
                "completion": mapping.completion_format.format(**values),
                "label": _label(cfg, row, n, mapping.field_label)}
    return fmt


# The row fields of each format, as Axolotl's docs/rlhf.qmd lists them; chatml and llama3 read the
# same fields and differ only in the prompt text.
PAIRED_FORMATS = {f"{family}.{name}": _paired(family, *keys)
                  for family in FAMILIES
                  for name, keys in {"intel": ("question", "chosen", "rejected"),
                                     "argilla": ("instruction", "chosen_response",
                                                 "rejected_response"),
                                     "prompt_pairs": ("prompt", "chosen", "rejected"),
                                     "icr": ("input", "chosen", "rejected"),
                                     "ultra": ("prompt", "chosen", "rejected", True)}.items()}
KTO_FORMATS = {f"{family}.{name}": _kto(family, question_key)
               for family in FAMILIES
               for name, question_key in {"intel": "question", "argilla": "instruction",
                                          "prompt_pairs": "prompt", "ultra": "prompt"}.items()}
TEMPLATED = {"chat_template.default": ("dpo", "ipo", "simpo"), "chat_template.argilla": ("orpo",)}


def make_preference_strategy(tokenizer: Any, dataset_cfg: PreferenceDatasetConfig, rl: str
                             ) -> PreferenceStrategy:
    """The formatter + tokenizer of a preference dataset for the RL method `rl`."""
    if rl not in RL_KINDS or rl == "grpo":
        raise ValueError(f"rl: '{rl}' has no preference row format here (known: "
                         f"{', '.join(k for k in RL_KINDS if k != 'grpo')}; GRPO rows go through "
                         f"grpo_rows)")
    kind, where = dataset_cfg.type, f"dataset {dataset_cfg.path}: type"
    fmt: Callable
    if isinstance(kind, DPOFormat | KTOFormat):
        wanted = KTOFormat if rl == "kto" else DPOFormat
        if not isinstance(kind, wanted):
            raise ValueError(f"{where}: the mapping's fields are for "
                             f"{'KTO' if isinstance(kind, KTOFormat) else 'DPO'}, but rl is '{rl}'")
        fmt = _user_defined_kto(kind) if rl == "kto" else _user_defined_dpo(kind)
    elif kind in TEMPLATED:
        if rl not in TEMPLATED[kind]:
            raise ValueError(f"{where} '{kind}' is for rl {', '.join(TEMPLATED[kind])}, not '{rl}'")
        templated = _Templated(tokenizer, dataset_cfg)
        method = templated.default if kind == "chat_template.default" else templated.argilla
        return PreferenceStrategy(tokenizer, dataset_cfg, rl, method)
    else:
        table = KTO_FORMATS if rl == "kto" else PAIRED_FORMATS
        if kind not in table:
            raise ValueError(f"{where} '{kind}' is not a {rl} format (known: "
                             f"{', '.join([*table, *(k for k, v in TEMPLATED.items() if rl in v)])}"
                             f", or a mapping of field_* keys)")
        fmt = table[kind]
    return PreferenceStrategy(tokenizer, dataset_cfg, rl,
                              lambda row, n: fmt(dataset_cfg, row, n))


def grpo_transform(dataset_cfg: PreferenceDatasetConfig, search_dirs: Sequence[Any] = ()
                   ) -> tuple[Callable[..., dict[str, Any]], list[str]]:
    """(map_fn, columns to remove) from the dataset's `type: module.function` loader, which is
    called with the dataset config and returns `map_fn` or `(map_fn, {"remove_columns": [...]})`
    (Axolotl's GRPO transform contract)."""
    if not isinstance(dataset_cfg.type, str) or "." not in dataset_cfg.type:
        raise ValueError(f"dataset {dataset_cfg.path}: a GRPO dataset's type is a transform "
                         f"'module.function', got {dataset_cfg.type!r}")
    loader = resolve_callable(dataset_cfg.type, search_dirs, f"dataset {dataset_cfg.path}: type")
    result = loader(dataset_cfg)
    map_fn, options = (result if isinstance(result, tuple) else (result, {}))
    if not callable(map_fn) or not isinstance(options, dict):
        raise ValueError(f"dataset {dataset_cfg.path}: {dataset_cfg.type} must return map_fn or "
                         f"(map_fn, {{'remove_columns': [...]}}), got {type(result).__name__}")
    return map_fn, list(options.get("remove_columns") or [])


def call_transform(map_fn: Callable[..., Any], row: dict[str, Any], tokenizer: Any) -> Any:
    """`map_fn(row)`, passing the tokenizer as `tokenizer=`/`processing_class=` if it takes one."""
    parameters = inspect.signature(map_fn).parameters
    kwargs = {name: tokenizer for name in ("tokenizer", "processing_class") if name in parameters}
    return map_fn(dict(row), **kwargs)


def grpo_rows(dataset_cfg: PreferenceDatasetConfig, rows: Sequence[dict[str, Any]],
              tokenizer: Any = None, search_dirs: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Every row through the GRPO transform, the removed columns dropped: what GRPOTrainer takes
    (a `prompt` column, string or messages, plus the columns reward functions read)."""
    map_fn, remove = grpo_transform(dataset_cfg, search_dirs)
    out = []
    for n, row in enumerate(rows):
        result = call_transform(map_fn, row, tokenizer)
        if not isinstance(result, dict):
            raise row_error(dataset_cfg, n, f"{dataset_cfg.type} returned "
                                            f"{type(result).__name__}, not a mapping")
        merged = {k: v for k, v in {**row, **result}.items() if k not in remove or k in result}
        if "prompt" not in merged:
            raise row_error(dataset_cfg, n, f"{dataset_cfg.type} gave no 'prompt' column, which "
                                            f"GRPO needs")
        out.append(merged)
    return out
