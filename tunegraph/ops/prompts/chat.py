"""`type: chat_template`: a conversation rendered by a Jinja chat template, with exact label masks.

    strategy = ChatTemplate(tokenizer, dataset_cfg, train_on_inputs=False)
    strategy.encode_batch(rows)     # [{"input_ids", "labels"}, ...]

Each conversation is rendered ONCE (transformers' `render_jinja_template`, the code behind
`apply_chat_template`), tokenized once with character offsets (batched over rows), and masked
from character spans, so the cost is linear in the number of turns (Axolotl re-renders the
conversation once per turn). A message's span is its generation block where the template marks
assistant turns with `{% generation %}` (every built-in template does: exact, tool calls and
Qwen3's reasoning included; where the template rewrites a content inside its block, as Qwen3
drops an earlier answer's reasoning, the block as rendered is trained), else where its content
appears in the rendering, searched forward from the previous message; when a content also occurs
in the template text nearby (a user message "user" next to "<|im_start|>user"), a second render
with unique markers in place of the contents locates it.
The template is the dataset's `chat_template_jinja` when it sets one, else the tokenizer's.
End-of-turn tokens are handled apart from the message body:

- a message's terminator is the first end-of-turn token (`eot_tokens`, default: those of
  `templates.END_OF_TURN_TOKENS` the template writes) or EOS after its content; it is trained per
  `train_on_eot` (default `train_on_eos`; `train_on_eos` for EOS): `turn` (after trained
  messages), `last` (after the last trained one), `all`, `none`. So Gemma's <end_of_turn> is
  trained although it is not EOS (Axolotl's default trains EOS only).
- `message_field_training` (a per-message bool) overrides `roles_to_train`;
  `message_field_training_detail` lists `{begin_offset, end_offset (inclusive), train}` spans of
  the content: only its `train: true` spans of the content are trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts.common import (
    IGNORE_INDEX,
    Rendered,
    Span,
    TextStrategy,
    TokenIndex,
    row_error,
    text_field,
)
from tunegraph.ops.templates import END_OF_TURN_TOKENS, has_generation_markers

# Template role -> dataset role names when a dataset sets no `roles` (ShareGPT's human/gpt too).
DEFAULT_ROLES = {"system": ["system"], "user": ["user", "human"],
                 "assistant": ["assistant", "gpt"], "tool": ["tool"]}


def role_names(dataset_cfg: DatasetConfig) -> dict[str, str]:
    """Dataset role name -> template role: template names map to themselves, then the defaults,
    then the dataset's own `roles`."""
    to_template = {role: role for role in [*DEFAULT_ROLES, *(dataset_cfg.roles or {})]}
    for mapping in (DEFAULT_ROLES, dataset_cfg.roles or {}):
        to_template.update({name: role for role, names in mapping.items() for name in names})
    return to_template


class Turn(NamedTuple):
    """One message as masking sees it (the template gets `message`)."""

    message: dict[str, Any]  # what the template renders: role, content, other properties
    dataset_role: str
    train: bool | None  # message_field_training
    detail: list[tuple[int, int, bool]] | None  # message_field_training_detail


class MessageParser:
    """Reads and validates a row's conversation; everything per dataset is worked out once."""

    def __init__(self, dataset_cfg: DatasetConfig, field: str | None = None):
        self.cfg = dataset_cfg
        self.to_template = role_names(dataset_cfg)
        self.key = field or dataset_cfg.field_messages
        mappings = dataset_cfg.property_mappings
        self.role_key, self.content_key = mappings["role"], mappings["content"]
        self.renamed = [(k, v) for k, v in mappings.items() if k not in ("role", "content")]
        self.private = {dataset_cfg.message_field_training,
                        dataset_cfg.message_field_training_detail, *mappings.values()} - {None}
        self.flags = bool(dataset_cfg.message_field_training
                          or dataset_cfg.message_field_training_detail)

    def __call__(self, row: dict[str, Any], row_number: int) -> list[Turn]:
        cfg, key = self.cfg, self.key
        raw = row.get(key)
        if not isinstance(raw, list) or not raw:
            got = "missing" if raw is None else f"a {type(raw).__name__}, not a non-empty list"
            raise row_error(cfg, row_number, f"field '{key}' is {got}")
        turns = []
        for turn, message in enumerate(raw):
            if not isinstance(message, dict):
                raise row_error(cfg, row_number, f"field '{key}[{turn}]' must be a mapping")
            role = message.get(self.role_key)
            template_role = self.to_template.get(role) if isinstance(role, str) else None
            if template_role is None:
                raise self._role_error(message, turn, row_number)
            if template_role == "system" and cfg.drop_system_message:
                continue
            # Other properties (tool_calls, name, ...) reach the template as they are, or renamed.
            out = {k: v for k, v in message.items() if k not in self.private}
            for template_key, data_key in self.renamed:
                if data_key in message:
                    out[template_key] = message[data_key]
            content = message.get(self.content_key)
            if not isinstance(content, str):
                where = f"{key}[{turn}]"
                optional = bool(out.get("tool_calls")) and content is None
                content = text_field(cfg, message, row_number, self.content_key,
                                     optional=optional, where=where)
            out["role"], out["content"] = template_role, content
            if self.flags:
                turns.append(Turn(out, role, _training_flag(cfg, message, row_number, key, turn),
                                  _training_detail(cfg, message, row_number, key, turn)))
            else:
                turns.append(Turn(out, role, None, None))
        if not turns:
            raise row_error(cfg, row_number, f"field '{key}' holds only system messages, which "
                                             f"drop_system_message drops")
        return turns

    def _role_error(self, message: dict[str, Any], turn: int, row_number: int) -> ValueError:
        where = f"{self.key}[{turn}].{self.role_key}"
        role = message.get(self.role_key)
        if not isinstance(role, str):
            return row_error(self.cfg, row_number, f"field '{where}' is missing or not a string")
        known = ", ".join(sorted(self.to_template))
        return row_error(self.cfg, row_number, f"field '{where}': unknown role '{role}' (known: "
                                               f"{known}; map it with roles)")


def chat_messages(dataset_cfg: DatasetConfig, row: dict[str, Any], row_number: int = -1,
                  field: str | None = None) -> list[dict[str, Any]]:
    """The row's conversation, validated: `[{"role": template role, "content", ...other message
    properties, "dataset_role", "train", "detail"}]`."""
    return [{**t.message, "dataset_role": t.dataset_role, "train": t.train, "detail": t.detail}
            for t in MessageParser(dataset_cfg, field)(row, row_number)]


def _training_flag(cfg: DatasetConfig, message: dict[str, Any], n: int, field: str, turn: int
                   ) -> bool | None:
    key = cfg.message_field_training
    if key is None or message.get(key) is None:
        return None
    where = f"{field}[{turn}]"
    if not isinstance(message[key], bool):
        raise row_error(cfg, n, f"field '{where}.{key}' must be true or false")
    return message[key]


def _training_detail(cfg: DatasetConfig, message: dict[str, Any], n: int, field: str, turn: int
                     ) -> list[tuple[int, int, bool]] | None:
    key = cfg.message_field_training_detail
    if key is None or message.get(key) is None:
        return None
    where = f"{field}[{turn}]"
    detail = message[key]
    if not isinstance(detail, list):
        raise row_error(cfg, n, f"field '{where}.{key}' must be a list")
    spans = []
    for i, item in enumerate(detail):
        at = f"{where}.{key}[{i}]"
        if not isinstance(item, dict):
            raise row_error(cfg, n, f"field '{at}' must be a mapping")
        begin, end, train = item.get("begin_offset"), item.get("end_offset"), item.get("train")
        if not (isinstance(begin, int) and isinstance(end, int) and isinstance(train, bool)):
            raise row_error(cfg, n, f"field '{at}' needs integer begin_offset and end_offset and "
                                    f"a boolean train")
        if not 0 <= begin <= end:
            raise row_error(cfg, n, f"field '{at}': begin_offset {begin} and end_offset {end} "
                                    f"must satisfy 0 <= begin_offset <= end_offset")
        spans.append((begin, end, train))
    return spans


class ChatTemplate(TextStrategy):
    """The `chat_template` strategy; see the module docstring for the rules."""

    def __init__(self, tokenizer: Any, dataset_cfg: DatasetConfig, train_on_inputs: bool,
                 eot_tokens: Sequence[str] | None = None):
        super().__init__(tokenizer, dataset_cfg, train_on_inputs)
        # A dataset's own chat_template_jinja wins over the tokenizer's (the recipe's) template.
        template = dataset_cfg.chat_template_jinja or tokenizer.chat_template
        if not template or not isinstance(template, str):
            raise ValueError(f"dataset {dataset_cfg.path}: type chat_template, but the tokenizer "
                             f"has no chat template; set chat_template (chatml, llama3, ...) or "
                             f"chat_template_jinja")
        self.template = template
        self.has_generation = has_generation_markers(template)
        self.template_kwargs = dict(tokenizer.special_tokens_map)
        self.eos_id = tokenizer.eos_token_id
        self.eot_ids = self._eot_ids(eot_tokens)
        self.train_on_eos = dataset_cfg.train_on_eos
        self.train_on_eot = dataset_cfg.train_on_eot or dataset_cfg.train_on_eos
        if self.eos_id in self.eot_ids and self.train_on_eos != self.train_on_eot:
            raise ValueError(f"dataset {dataset_cfg.path}: the EOS token is one of the end-of-turn "
                             f"tokens, but train_on_eos is '{self.train_on_eos}' and train_on_eot "
                             f"is '{self.train_on_eot}': make them equal or take EOS out of "
                             f"eot_tokens")
        self.to_train = set(dataset_cfg.roles_to_train)
        self.parse = MessageParser(dataset_cfg)

    def _eot_ids(self, eot_tokens: Sequence[str] | None) -> set[int]:
        vocab = self.tokenizer.get_vocab()
        if eot_tokens is None:  # the known end-of-turn tokens this template writes
            return {vocab[t] for t in END_OF_TURN_TOKENS if t in self.template and t in vocab}
        ids = set()
        for token in eot_tokens:
            if token not in vocab:
                encoded = self.tokenizer.encode(token, add_special_tokens=False)
                raise ValueError(f"eot_tokens: '{token}' is not one token of the tokenizer (it "
                                 f"encodes as {len(encoded)} tokens); add it as a special token")
            ids.add(vocab[token])
        return ids

    # -- rendering ---------------------------------------------------------------------------

    def render_conversation(self, template_messages: list[dict[str, Any]], tools: Any,
                            row_number: int) -> tuple[str, list[Span]]:
        """(rendered text, generation-block character spans): one render of the conversation."""
        try:
            rendered, generation = render_jinja_template(
                conversations=[template_messages], tools=tools, chat_template=self.template,
                return_assistant_tokens_mask=self.has_generation, **self.template_kwargs)
        except TemplateError as exc:  # templates reject rows, e.g. "roles must alternate"
            raise row_error(self.dataset_cfg, row_number, f"the chat template rejects this "
                                                          f"conversation: {exc}") from exc
        except (TypeError, ValueError) as exc:  # e.g. a number where the template adds strings
            raise row_error(self.dataset_cfg, row_number, f"the chat template cannot render this "
                                                          f"conversation: {exc}") from exc
        return rendered[0], list(generation[0]) if generation else []

    def _tools(self, row: dict[str, Any], row_number: int) -> Any:
        tools = row.get(self.dataset_cfg.field_tools)
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as exc:
                raise row_error(self.dataset_cfg, row_number,
                                f"field '{self.dataset_cfg.field_tools}' is not JSON: {exc}") from exc
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, dict) for t in tools)):
            raise row_error(self.dataset_cfg, row_number,
                            f"field '{self.dataset_cfg.field_tools}' must be a list of mappings")
        return tools or None

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        parsed = self.parse(row, row_number)
        messages = [turn.message for turn in parsed]
        tools = self._tools(row, row_number)
        text, generation = self.render_conversation(messages, tools, row_number)
        turns, ambiguous = self._turn_spans(messages, text, generation, row_number)
        if ambiguous:  # a content also appears in template text nearby: locate it exactly
            turns = self._marked_turn_spans(messages, tools, text, turns, row_number)
        trained = [self._is_trained(turn) for turn in parsed]
        spans: list[Span] = []
        for turn, (body, content), yes in zip(parsed, turns, trained, strict=True):
            spans += _trained_spans(turn.detail, body, content, yes)
        return Rendered(text, _merge(spans), add_special_tokens=False,
                        extra={"turns": turns, "trained": trained})

    def _is_trained(self, turn: Turn) -> bool:
        if turn.train is not None:
            return turn.train
        return turn.message["role"] in self.to_train or turn.dataset_role in self.to_train

    def _turn_spans(self, messages: list[dict[str, Any]], text: str, generation: list[Span],
                    row_number: int) -> tuple[list[tuple[Span, Span]], bool]:
        """(body, content) character spans of each message, in order, and whether some content
        found by searching also occurs again before the next anchor (so the first match may be
        template text, e.g. a user message "user" inside "<|im_start|>user")."""
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        blocks: list[Span | None] = [None] * len(messages)
        if len(generation) == len(assistant):
            for i, block in zip(assistant, generation, strict=True):
                blocks[i] = block
        # Where the next generation block starts, for each message: content searches stop there.
        next_block, upcoming = [len(text)] * len(messages), len(text)
        for i in range(len(messages) - 1, -1, -1):
            next_block[i] = upcoming
            upcoming = blocks[i][0] if blocks[i] else upcoming
        turns, cursor, ambiguous = [], 0, False
        for turn, message in enumerate(messages):
            block = blocks[turn]
            if block is None and message.get("tool_calls") and not message["content"]:
                raise row_error(self.dataset_cfg, row_number,
                                f"message {turn} holds tool_calls but no content, and the chat "
                                f"template has no {{% generation %}} block for it, so the tool "
                                f"call's tokens cannot be told apart; use a built-in template "
                                f"(qwen_25) or mark assistant turns with {{% generation %}}")
            low = block[0] if block else cursor
            value = message["content"]
            start = text.find(value, low) if value else -1
            content = (start, start + len(value)) if start >= 0 else _find_content(text, value,
                                                                                    low)
            detail_key = self.dataset_cfg.message_field_training_detail
            if content is None and block is not None and detail_key is None:
                # The template rewrites this content inside its generation block (Qwen3 drops an
                # earlier answer's <think> reasoning): the block is what is trained; the
                # terminator is searched from the block's start.
                content = (block[0], block[0])
            if content is None:
                raise row_error(self.dataset_cfg, row_number,
                                f"the content of message {turn} ({message['role']}) is not in "
                                f"the chat template's rendering (does the template change it?)")
            if block is None and content[1] > content[0] and not ambiguous:
                found = value if start >= 0 else text[content[0]:content[1]]
                ambiguous = text.find(found, content[0] + 1, next_block[turn]) >= 0
            body = block or content
            turns.append((body, content))
            cursor = max(body[1], content[1]) if block else content[1]
        return turns, ambiguous

    def _marked_turn_spans(self, messages: list[dict[str, Any]], tools: Any, text: str,
                           turns: list[tuple[Span, Span]], row_number: int
                           ) -> list[tuple[Span, Span]]:
        """Content spans from a second render where each content is a unique marker: the marker
        cannot occur in template text. Only rows with an ambiguous search pay for it."""
        marks = [f"\ue000{i}\ue001" if m["content"] else "" for i, m in enumerate(messages)]
        marked, _ = self.render_conversation(
            [{**m, "content": mark or m["content"]} for m, mark in zip(messages, marks,
                                                                       strict=True)],
            tools, row_number)
        out, shift = [], 0
        for message, mark, (body, content) in zip(messages, marks, turns, strict=True):
            position = marked.find(mark) if mark else -1
            if position < 0:
                out.append((body, content))
                continue
            start, value = position + shift, message["content"]
            rendered = value if text.startswith(value, start) else value.strip()
            if not text.startswith(rendered, start):
                return turns  # the template changes contents beyond trimming: keep the search
            lead = len(value) - len(value.lstrip()) if rendered is not value else 0
            exact = (start - lead, start + len(rendered))
            out.append((body if body != content else exact, exact))
            shift += len(rendered) - len(mark)
        return out

    # -- end-of-turn tokens --------------------------------------------------------------------

    def finish(self, rendered: Rendered, ids: list[int], index: TokenIndex,
               labels: list[int]) -> None:
        """A message's terminator is the first end-of-turn token or EOS after its content and
        before the next message: trained per train_on_eot (train_on_eos for EOS). An EOS after
        the terminator (Phi-3 ends the conversation with one) belongs to no turn: untrained,
        as in transformers' assistant masks."""
        turns, trained = rendered.extra["turns"], rendered.extra["trained"]
        last = max((t for t, yes in enumerate(trained) if yes), default=-1)
        eot_ids, eos_id = self.eot_ids, self.eos_id
        num_chars = len(rendered.text)
        for turn, (body, content) in enumerate(turns):
            start = content[1] if content[1] > content[0] else body[0]
            stop = turns[turn + 1][0][0] if turn + 1 < len(turns) else num_chars
            for k in index.ending_in(start, max(stop, start + 1)):
                token = ids[k]
                if token in eot_ids:
                    policy = self.train_on_eot
                elif token == eos_id:
                    policy = self.train_on_eos
                else:
                    continue
                train = (policy == "all" or (policy == "turn" and trained[turn])
                         or (policy == "last" and turn == last))
                labels[k] = token if train else IGNORE_INDEX
                break

    def reference(self, row: dict[str, Any], row_number: int) -> tuple[Any, str] | None:
        messages = [turn.message for turn in self.parse(row, row_number)]
        last = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or not messages[last]["content"]:
            return None
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        return prompt, messages[last]["content"]


def _find_content(text: str, content: str, cursor: int) -> Span | None:
    """The span of `content` at or after `cursor`; templates that trim contents write the
    stripped text. Empty content is the empty span at the cursor."""
    if not content:
        return (cursor, cursor)
    start = text.find(content, cursor)
    if start >= 0:
        return (start, start + len(content))
    stripped = content.strip()
    start = text.find(stripped, cursor) if stripped else -1
    if start < 0:
        return None
    # Offsets in message_field_training_detail count from the unstripped content.
    lead = len(content) - len(content.lstrip())
    return (start - lead, start + len(stripped))


def _trained_spans(detail: list[tuple[int, int, bool]] | None, body: Span, content: Span,
                   trained: bool) -> list[Span]:
    if detail is None:
        return [body] if trained else []
    spans = []
    if trained:  # the body around the content (tool calls): detail only covers content
        spans += [(body[0], min(body[1], max(content[0], body[0]))),
                  (max(body[0], min(content[1], body[1])), body[1])]
    low = max(content[0], 0)
    for begin, end, train in detail:
        if train:
            spans.append((max(low, content[0] + begin), min(content[1], content[0] + end + 1)))
    return [s for s in spans if s[1] > s[0]]


def _merge(spans: list[Span]) -> list[Span]:
    spans = sorted(spans)
    merged: list[Span] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
