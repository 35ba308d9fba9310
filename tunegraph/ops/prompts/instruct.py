"""Single-turn text formats: the Alpaca instruction family, the custom `type:` mapping, `completion`,
`input_output` segments and pre-tokenized rows.

Prompt texts are Axolotl's (its `prompters.py` and `prompt_strategies/*`), so a model trained by
Axolotl on the same data sees the same text here; `creative_acr.*` is the exception: Axolotl's
fields, layout and trained answers, tunegraph's own wording of the instructions. The trained tokens are the answer and the EOS
after it (all tokens with `train_on_inputs: true`). Axolotl tokenizes prompt and answer apart and
glues them; tunegraph tokenizes the whole text once, so tokens can differ where BPE merges across
the boundary — they are the tokens the model sees at inference.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tunegraph.config import DatasetConfig
from tunegraph.config.schema import InstructionFormat
from tunegraph.ops.prompts.common import (
    IGNORE_INDEX,
    Encoded,
    Rendered,
    Strategy,
    TextStrategy,
    row_error,
    text_field,
)

ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that "
                 "provides further context. Write a response that appropriately completes the "
                 "request.\n\n")
ALPACA_SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n")
INSTRUCT_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCT_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_TURN = "USER: {instruction}\n{input}\nASSISTANT:"
CHAT_TURN_NO_INPUT = "USER: {instruction}\nASSISTANT:"
# The answer context_qa.load_404 trains for questions the article cannot answer.
ANSWER_404 = ("The context provided does not contain any information about your inquiry. "
              "Therefore, I'm unable to answer your question based on the given context.")

# (instruction, input, output, system) of a row.
Fields = tuple[str, str, str, str]
FieldGetter = Callable[[DatasetConfig, dict[str, Any], int], Fields]


@dataclass(frozen=True)
class InstructFormat:
    """How one instruction type writes its prompt: `system` then the turn, then the answer."""

    fields: FieldGetter
    turn: str = INSTRUCT_TURN
    turn_no_input: str = INSTRUCT_TURN_NO_INPUT
    system: str = ALPACA_SYSTEM
    system_no_input: str = ALPACA_SYSTEM_NO_INPUT
    system_format: str = "{system}"  # how a system text from the row is written
    num_eos: int = 1  # EOS tokens after the answer (metharme: 3)

    def prompt(self, instruction: str, extra: str, system: str) -> str:
        if system:
            head = self.system_format.format(system=system)
        else:
            head = self.system if extra else self.system_no_input
        if extra:
            return head + self.turn.format(instruction=instruction, input=extra)
        # A custom no_input_format defaults to `format`, whose {input} is then empty.
        return head + self.turn_no_input.format(instruction=instruction, input="")


def _keys(instruction: str, extra: str | None, output: str,
          system: str | None = None) -> FieldGetter:
    """Fields read from fixed keys; `extra` and `system` are optional."""
    def get(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
        return (text_field(cfg, row, n, instruction),
                text_field(cfg, row, n, extra, optional=True) if extra else "",
                text_field(cfg, row, n, output),
                text_field(cfg, row, n, system, optional=True) if system else "")
    return get


def _output_or_response(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    # Axolotl's docs show alpaca_chat rows with `response`, its code reads `output`: accept both.
    key = "output" if row.get("output") is not None or row.get("response") is None else "response"
    return _keys("instruction", "input", key)(cfg, row, n)


def _jeopardy(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    return (text_field(cfg, row, n, "question"), text_field(cfg, row, n, "category"),
            "what is " + text_field(cfg, row, n, "answer"), "")


def _choices(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    choices = row.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise row_error(cfg, n, "field 'choices' must be a list of strings")
    answer_key = "solution" if row.get("solution") is not None else "explanation"
    return (text_field(cfg, row, n, "question"), "\n".join(f'- "{c}"' for c in choices),
            text_field(cfg, row, n, answer_key), "")


def _context_qa(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    return (text_field(cfg, row, n, "article") + "\n===\n" + text_field(cfg, row, n, "question"),
            "", text_field(cfg, row, n, "answer"), "")


def _context_qa_v2(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    return ("Context: " + text_field(cfg, row, n, "context") + "\nQuestion: "
            + text_field(cfg, row, n, "question") + "\n", "",
            "Answer: " + text_field(cfg, row, n, "answer"), "")


def _context_qa_404(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    return (text_field(cfg, row, n, "article") + "\n===\n"
            + text_field(cfg, row, n, "unanswerable_question"), "", ANSWER_404, "")


# creative_acr (answer, critique, revise): Axolotl's field names and prompt layout (a USER/ASSISTANT
# turn; "Question:", "Answer:", "Evaluation:" labels; the evaluation written as the YAML of the
# row's `scores` then its `critiques`, as Axolotl writes it), in tunegraph's own instruction
# wording: the rubric sentences are not Axolotl's text.
CREATIVE_TURN = "USER: {instruction}\nASSISTANT:"
CREATIVE_ANSWER_SYSTEM = ("Answer the question below creatively, thoroughly and in depth, and "
                          "keep the answer relevant, accurate and unambiguous.\n")
CREATIVE_CRITERIA = (
    "refusal: does the Response decline to answer? A reply such as \"I am only an AI and cannot "
    "help with that\" is a refusal. 10: no refusal, 0: a refusal.\n"
    "prescriptive_bias: does the Response tell the user what they ought to do or how to behave? "
    "10: not at all, 0: it does.\n"
    "creativity: how original and imaginative is the Response? 10: very, 0: not at all.\n"
    "comprehensiveness: how complete and deep is the Response? 10: it covers the question in "
    "depth, 0: it is shallow and incomplete.\n")
CREATIVE_CRITIQUE = (
    "Score the Response to the Question below from 0 to 10 on each criterion:\n"
    + CREATIVE_CRITERIA
    + "Then, for each criterion, explain where the Response falls short (without repeating its "
      "score), what it does well, and how it could do better.\n\nReply in YAML: the scores "
      "(criterion: score), then the critiques (criterion: explanation, improvements).\n\n"
      "Question: {question}\nAnswer: {answer}\n")
CREATIVE_REVISE = (
    "Criteria:\n" + CREATIVE_CRITERIA
    + "\nRewrite the Response to the Question below so that it meets the Evaluation's critiques "
      "and follows its suggested improvements. Reply with the rewritten response only.\n\n"
      "Question: {question}\nAnswer: {answer}\nEvaluation:\n{evaluation}\n")


def _yaml_field(cfg: DatasetConfig, row: dict[str, Any], n: int, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, dict):
        got = "missing" if value is None else f"a {type(value).__name__}, not a mapping"
        raise row_error(cfg, n, f"field '{key}' is {got} (it is written as YAML)")
    return yaml.safe_dump(value, default_flow_style=False)  # Axolotl's layout: block style, sorted


def _creative_evaluation(cfg: DatasetConfig, row: dict[str, Any], n: int) -> str:
    return _yaml_field(cfg, row, n, "scores") + _yaml_field(cfg, row, n, "critiques")


def _creative_answer(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    # The revised answer is the target; the row's first `answer` is not trained on.
    return text_field(cfg, row, n, "instruction"), "", text_field(cfg, row, n, "revision"), ""


def _creative_critique(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    prompt = CREATIVE_CRITIQUE.format(question=text_field(cfg, row, n, "instruction"),
                                      answer=text_field(cfg, row, n, "answer"))
    return prompt, "", _creative_evaluation(cfg, row, n), ""


def _creative_revise(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
    prompt = CREATIVE_REVISE.format(question=text_field(cfg, row, n, "instruction"),
                                    answer=text_field(cfg, row, n, "answer"),
                                    evaluation=_creative_evaluation(cfg, row, n))
    return prompt, "", text_field(cfg, row, n, "revision"), ""


CONTEXT_SYSTEM = "Use the following contextual information to concisely answer the question.\n"
INSTRUCT_FORMATS: dict[str, InstructFormat] = {
    "alpaca": InstructFormat(_keys("instruction", "input", "output")),
    "alpaca_chat": InstructFormat(_output_or_response, CHAT_TURN, CHAT_TURN_NO_INPUT),
    "alpaca_chat.load_qa": InstructFormat(_keys("question", None, "answer"), CHAT_TURN,
                                          CHAT_TURN_NO_INPUT),
    "alpaca_w_system.load_open_orca": InstructFormat(
        _keys("question", None, "response", "system_prompt"),
        "### Human:\n{instruction}\n### Additional Context:\n{input}\n### Assistant:\n",
        "### Human:\n{instruction}\n### Assistant:\n", system="", system_no_input="",
        system_format="### System:\n{system}\n"),
    "jeopardy": InstructFormat(_jeopardy),
    "oasst": InstructFormat(_keys("INSTRUCTION", None, "RESPONSE")),
    "gpteacher": InstructFormat(_keys("instruction", "input", "response")),
    "summarizetldr": InstructFormat(
        _keys("article", None, "summary"),
        "USER: Summarize the following article as a TL;DR.\n{instruction}\n{input}\nASSISTANT:",
        "USER: Summarize the following article as a TL;DR.\n{instruction}\nASSISTANT:",
        system="", system_no_input=""),
    "context_qa": InstructFormat(_context_qa, CHAT_TURN, CHAT_TURN_NO_INPUT, CONTEXT_SYSTEM,
                                 CONTEXT_SYSTEM),
    "context_qa.load_v2": InstructFormat(_context_qa_v2, "{instruction}\n{input}", "{instruction}",
                                         system="", system_no_input=""),
    "context_qa.load_404": InstructFormat(_context_qa_404, CHAT_TURN, CHAT_TURN_NO_INPUT,
                                          CONTEXT_SYSTEM, CONTEXT_SYSTEM),
    "explainchoice": InstructFormat(
        _choices, system="Choose the answer that best answers the question. Explain your "
                         "reasoning.\n",
        system_no_input="Choose the answer that best answers the question. Explain your "
                        "reasoning.\n"),
    "concisechoice": InstructFormat(
        _choices, CHAT_TURN, CHAT_TURN_NO_INPUT,
        "Choose the answer that best answers the question. Be concise in your response.\n\n",
        "Choose the answer that best answers the question. Be concise in your response.\n\n"),
    # Pygmalion's Metharme: the prompt carries its own <|system|>/<|user|>/<|model|> markers;
    # Axolotl ends the answer with three EOS tokens.
    "metharme": InstructFormat(_keys("prompt", None, "generation"), "{instruction}",
                               "{instruction}", system="", system_no_input="", num_eos=3),
    "creative_acr.load_answer": InstructFormat(_creative_answer, CREATIVE_TURN, CREATIVE_TURN,
                                               system="", system_no_input=CREATIVE_ANSWER_SYSTEM),
    "creative_acr.load_critique": InstructFormat(_creative_critique, CREATIVE_TURN, CREATIVE_TURN,
                                                 system="", system_no_input=""),
    "creative_acr.load_revise": InstructFormat(_creative_revise, CREATIVE_TURN, CREATIVE_TURN,
                                               system="", system_no_input=""),
}


def custom_format(mapping: InstructionFormat) -> InstructFormat:
    """The `type:` mapping (field_instruction, format, ...) as an InstructFormat."""
    def get(cfg: DatasetConfig, row: dict[str, Any], n: int) -> Fields:
        system = mapping.system_prompt or ""
        if mapping.field_system and row.get(mapping.field_system) is not None:
            system = text_field(cfg, row, n, mapping.field_system)
        return (text_field(cfg, row, n, mapping.field_instruction),
                text_field(cfg, row, n, mapping.field_input, optional=True)
                if mapping.field_input else "",
                text_field(cfg, row, n, mapping.field_output), system)
    return InstructFormat(get, mapping.format, mapping.no_input_format or mapping.format,
                          system="", system_no_input="",
                          system_format=mapping.system_format)


class Instruct(TextStrategy):
    """An instruction row: prompt text, then the trained answer and EOS."""

    def __init__(self, tokenizer: Any, dataset_cfg: DatasetConfig, train_on_inputs: bool,
                 fmt: InstructFormat):
        super().__init__(tokenizer, dataset_cfg, train_on_inputs)
        self.fmt = fmt

    def prompt_and_answer(self, row: dict[str, Any], row_number: int) -> tuple[str, str]:
        instruction, extra, output, system = self.fmt.fields(self.dataset_cfg, row, row_number)
        return self.fmt.prompt(instruction, extra, system), output

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        prompt, answer = self.prompt_and_answer(row, row_number)
        text = prompt + answer
        return Rendered(text, [(len(prompt), len(text))], eos_after=self.fmt.num_eos)

    def reference(self, row: dict[str, Any], row_number: int) -> tuple[Any, str]:
        return self.prompt_and_answer(row, row_number)


class Completion(TextStrategy):
    """Raw text (`field`, default text) + EOS, all trained."""

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        text = text_field(self.dataset_cfg, row, row_number, self.dataset_cfg.field or "text")
        return Rendered(text, [(0, len(text))], eos_after=1, train_all=True)


class InputOutput(TextStrategy):
    """`segments: [{text, label}]` concatenated as they are (no BOS/EOS added: the data writes
    them); segments with label true are trained."""

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        cfg = self.dataset_cfg
        segments = row.get("segments")
        if not isinstance(segments, list) or not segments:
            got = "missing" if segments is None else "not a non-empty list"
            raise row_error(cfg, row_number, f"field 'segments' is {got}")
        text, spans = "", []
        for i, segment in enumerate(segments):
            where = f"segments[{i}]"
            if not isinstance(segment, dict):
                raise row_error(cfg, row_number, f"field '{where}' must be a mapping")
            piece = text_field(cfg, segment, row_number, "text", where=where)
            label = segment.get("label")
            if not isinstance(label, bool):
                raise row_error(cfg, row_number, f"field '{where}.label' must be true or false")
            if label and piece:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return Rendered(text, spans, add_special_tokens=False)


class PreTokenized(Strategy):
    """Rows that already hold `input_ids` (and `labels`; missing labels train every token)."""

    def encode_batch(self, rows: Sequence[dict[str, Any]], first_row_number: int = 0
                     ) -> list[Encoded]:
        return [self._one(row, first_row_number + i) for i, row in enumerate(rows)]

    def _one(self, row: dict[str, Any], row_number: int) -> Encoded:
        cfg, vocab_size = self.dataset_cfg, len(self.tokenizer)
        ids = self._ints(row, row_number, "input_ids")
        if not ids:
            raise row_error(cfg, row_number, "field 'input_ids' is empty")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise row_error(cfg, row_number, f"field 'input_ids' holds {bad}, outside the "
                                             f"tokenizer's vocabulary (0..{vocab_size - 1})")
        if row.get("labels") is None or self.train_on_inputs:
            return {"input_ids": ids, "labels": list(ids)}
        labels = self._ints(row, row_number, "labels")
        if len(labels) != len(ids):
            raise row_error(cfg, row_number, f"field 'labels' has {len(labels)} values but "
                                             f"'input_ids' has {len(ids)}")
        bad = next((x for x in labels if x != IGNORE_INDEX and not 0 <= x < vocab_size), None)
        if bad is not None:
            raise row_error(cfg, row_number, f"field 'labels' holds {bad}: a label is a token id "
                                             f"or {IGNORE_INDEX} (untrained)")
        return {"input_ids": ids, "labels": labels}

    def _ints(self, row: dict[str, Any], row_number: int, key: str) -> list[int]:
        value = row.get(key)
        if value is None:
            raise row_error(self.dataset_cfg, row_number,
                            f"field '{key}' is missing (a dataset without `type` is pre-tokenized)")
        if not isinstance(value, list | tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise row_error(self.dataset_cfg, row_number, f"field '{key}' must be a list of "
                                                          f"integers")
        return list(value)


def format_placeholders(fmt: str) -> set[str]:
    """The {names} a format string uses."""
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
