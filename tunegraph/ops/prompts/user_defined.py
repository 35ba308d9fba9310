"""`type: my_module.my_fn`: a user's transform, imported from the recipe's folder or the working
directory, turns each row into one of the shapes tunegraph already masks.

    # my_module.py, beside the recipe
    def my_fn(cfg):                        # cfg: the dataset's DatasetConfig
        def transform(row, tokenizer=None):
            return {"messages": [{"role": "user", "content": row["q"]},
                                 {"role": "assistant", "content": row["a"]}]}
        return transform, {"remove_columns": ["q", "a"]}     # or just: return transform

This is Axolotl's transform contract (its GRPO `type: rewards.oai_gsm8k_transform`). What the
transform returns decides the masking: `input_ids` (+ `labels`): pre-tokenized; the dataset's
`field_messages` (default messages): chat_template with the dataset's chat keys; `segments`:
input_output; `prompt` + `completion` strings: the completion and EOS are trained; `text`:
completion (all trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunegraph.config import DatasetConfig
from tunegraph.ops.prompts.chat import ChatTemplate
from tunegraph.ops.prompts.common import Encoded, Rendered, Strategy, TextStrategy, row_error
from tunegraph.ops.prompts.instruct import Completion, InputOutput, PreTokenized
from tunegraph.ops.prompts.preference import call_transform, grpo_transform


class PromptCompletion(TextStrategy):
    """`prompt` + `completion` strings: one text; the completion and EOS are trained."""

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        prompt, completion = row["prompt"], row["completion"]
        text = prompt + completion
        return Rendered(text, [(len(prompt), len(text))], eos_after=1)


class UserDefined(Strategy):
    """Rows through the user's transform, then through the strategy their shape calls for."""

    def __init__(self, tokenizer: Any, dataset_cfg: DatasetConfig, train_on_inputs: bool,
                 search_dirs: Sequence[Any] = (), eot_tokens: Sequence[str] | None = None):
        super().__init__(tokenizer, dataset_cfg, train_on_inputs)
        self.map_fn, self.remove = grpo_transform(dataset_cfg, search_dirs)  # same contract
        self.eot_tokens = eot_tokens
        self._inner: dict[str, Strategy] = {}

    def _strategy(self, kind: str) -> Strategy:
        if kind not in self._inner:
            cfg = self.dataset_cfg
            if kind == "chat":
                self._inner[kind] = ChatTemplate(self.tokenizer, cfg, self.train_on_inputs,
                                                 self.eot_tokens)
            else:
                classes = {"tokens": PreTokenized, "segments": InputOutput,
                           "pair": PromptCompletion, "text": Completion}
                text_cfg = cfg.model_copy(update={"field": "text"}) if kind == "text" else cfg
                self._inner[kind] = classes[kind](self.tokenizer, text_cfg, self.train_on_inputs)
        return self._inner[kind]

    def transform(self, row: dict[str, Any], row_number: int) -> tuple[str, dict[str, Any]]:
        """(shape, transformed row) of one row."""
        result = call_transform(self.map_fn, row, self.tokenizer)
        if not isinstance(result, dict):
            raise row_error(self.dataset_cfg, row_number,
                            f"{self.dataset_cfg.type} returned {type(result).__name__}, not a "
                            f"mapping")
        if "input_ids" in result:
            return "tokens", result
        if self.dataset_cfg.field_messages in result:
            return "chat", result
        if "segments" in result:
            return "segments", result
        if isinstance(result.get("prompt"), str) and isinstance(result.get("completion"), str):
            return "pair", result
        if "text" in result:
            return "text", result
        raise row_error(self.dataset_cfg, row_number,
                        f"{self.dataset_cfg.type} returned keys {sorted(result)}; expected "
                        f"input_ids, {self.dataset_cfg.field_messages}, segments, "
                        f"prompt+completion or text")

    def encode_batch(self, rows: Sequence[dict[str, Any]], first_row_number: int = 0
                     ) -> list[Encoded]:
        groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for i, row in enumerate(rows):
            kind, result = self.transform(row, first_row_number + i)
            groups.setdefault(kind, []).append((i, result))
        out: list[Encoded | None] = [None] * len(rows)
        for kind, items in groups.items():
            strategy = self._strategy(kind)
            # Row numbers stay the dataset's: encode each group row by row where they are sparse.
            for i, result in items:
                out[i] = strategy.encode_batch([result], first_row_number + i)[0]
        return out  # type: ignore[return-value]

    def reference(self, row: dict[str, Any], row_number: int) -> tuple[Any, str] | None:
        kind, result = self.transform(row, row_number)
        if kind == "chat":
            return self._strategy(kind).reference(result, row_number)
        if kind == "pair":
            return result["prompt"], result["completion"]
        return None
