"""What every prompt strategy shares: row errors, field access, and offset-based label masks.

A text strategy renders a row to `Rendered` (the full text plus the character spans to train);
`TextStrategy` tokenizes the texts of many rows in one batched call of the fast tokenizer (Rust,
both cores) with character offsets, and marks as trained the tokens whose last character lies in a
trained span: the token the model emits to finish writing trained text. A token that starts in
trained text but runs on into masked text (a space glued to the next masked word) is not trained;
one that starts in masked text and ends in trained text (" paris" after "Response:") is.
Tokenizing prompt and answer separately and concatenating would give different tokens than the
model sees at inference, because BPE merges across the boundary (" Paris" is not " " + "Paris").
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunegraph.config import DatasetConfig

IGNORE_INDEX = -100
# Rows per tokenizer call inside encode_batch: small enough that rendering the next chunk overlaps
# tokenizing this one, large enough that each Rust call still spreads over both cores.
OVERLAP_CHUNK_ROWS = 64

Encoded = dict[str, list[int]]
Span = tuple[int, int]


def row_error(dataset_cfg: DatasetConfig | Any, row_number: int, problem: str) -> ValueError:
    """The error for a bad row: names the dataset file, the row (from 0) and the problem."""
    return ValueError(f"dataset {dataset_cfg.path}, row {row_number} (counting from 0): {problem}")


def text_field(dataset_cfg: Any, row: dict[str, Any], row_number: int, key: str,
               optional: bool = False, where: str = "") -> str:
    """`row[key]` as a string; a missing optional field is ''."""
    value = row.get(key)
    if value is None and optional:
        return ""
    name = f"{where}.{key}" if where else key
    if value is None:
        raise row_error(dataset_cfg, row_number, f"field '{name}' is missing")
    if not isinstance(value, str):
        raise row_error(dataset_cfg, row_number, f"field '{name}' must be a string, got "
                                                 f"{type(value).__name__}")
    return value


@dataclass
class Rendered:
    """One row as text: `spans` are the trained character spans (sorted, not overlapping);
    `eos_after` EOS tokens follow the text, trained with the last span's setting."""

    text: str
    spans: list[Span]
    add_special_tokens: bool = True
    eos_after: int = 0
    train_eos: bool = True
    train_all: bool = False  # every token, special ones included (completion)
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific (chat: turn layout)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 add_special_tokens: bool) -> list[tuple[list[int], list[Span]]]:
    """(ids, character offsets) of each text, from one batched call of the Rust tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [(e.ids, e.offsets) for e in encodings]
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens,
                    return_offsets_mapping=True)
    return [(ids, [tuple(o) for o in offs])
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


class TokenIndex:
    """Which tokens a character range holds, from the Rust tokenizer's own char -> token map
    (`Encoding.char_to_token`): two lookups per span, no per-token Python work. Special tokens
    the tokenizer adds itself (BOS, a trailing EOS) cover no character, so no span trains them."""

    def __init__(self, encoding: Any, num_chars: int):
        self.encoding, self.num_chars = encoding, num_chars
        self.num_tokens = len(encoding.ids)

    def _token_from(self, position: int) -> int:
        """The first token covering a character at or after `position` (num_tokens if none)."""
        while position < self.num_chars:
            token = self.encoding.char_to_token(position)
            if token is not None:
                return token
            position += 1  # a character no token covers (a normalizer dropped it)
        return self.num_tokens

    def ending_in(self, start: int, end: int) -> range:
        """Token positions whose last character lies in [start, end)."""
        if end <= start:
            return range(0)
        return range(self._token_from(start), self._token_from(end))


class OffsetIndex(TokenIndex):
    """The same from a list of character offsets (tokenizers without a Rust backend)."""

    def __init__(self, offsets: Sequence[Span]):  # noqa: super() is not called on purpose
        ends, last = [], 0
        for start, end in offsets:  # zero-width tokens take the previous end: ends stay sorted
            last = end if end > start else last
            ends.append(last)
        self.ends = ends

    def ending_in(self, start: int, end: int) -> range:
        if end <= start:
            return range(0)
        first = bisect_right(self.ends, start)
        return range(first, bisect_right(self.ends, end, lo=first))


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   add_special_tokens: bool) -> list[tuple[list[int], TokenIndex]]:
    """(ids, index) of each text, from one batched call of the Rust tokenizer (both cores)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [(e.ids, TokenIndex(e, len(text))) for e, text in zip(encodings, texts,
                                                                     strict=True)]
    return [(ids, OffsetIndex(offsets))
            for ids, offsets in encode_texts(tokenizer, texts, add_special_tokens)]


def labels_for_spans(ids: list[int], index: TokenIndex, spans: Sequence[Span]) -> list[int]:
    """-100 everywhere except tokens ending in a trained span (which keep their id)."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        tokens = index.ending_in(start, end)
        labels[tokens.start:tokens.stop] = ids[tokens.start:tokens.stop]
    return labels


class Strategy:
    """A row encoder: `strategy(row, row_number)` -> {"input_ids", "labels"}; `encode_batch(rows,
    first_row_number)` does the same for many rows at once (what tokenization should call)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dataset_cfg: DatasetConfig,
                 train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.dataset_cfg = dataset_cfg
        self.train_on_inputs = train_on_inputs

    def __call__(self, row: dict[str, Any], row_number: int) -> Encoded:
        return self.encode_batch([row], row_number)[0]

    def encode_batch(self, rows: Sequence[dict[str, Any]], first_row_number: int = 0
                     ) -> list[Encoded]:
        raise NotImplementedError

    def reference(self, row: dict[str, Any], row_number: int) -> tuple[Any, str] | None:
        """(prompt, expected answer) for exact-match evaluation, or None."""
        return None


class TextStrategy(Strategy):
    """A strategy that renders rows to text + trained spans; tokenization and masks are shared."""

    def render(self, row: dict[str, Any], row_number: int) -> Rendered:
        raise NotImplementedError

    def finish(self, rendered: Rendered, ids: list[int], index: TokenIndex,
               labels: list[int]) -> None:
        """Adjust labels after masking (chat: end-of-turn tokens). Default: nothing."""

    def encode_batch(self, rows: Sequence[dict[str, Any]], first_row_number: int = 0
                     ) -> list[Encoded]:
        """Render (Python) and tokenize (Rust, which releases the GIL) overlap: while a thread
        tokenizes one chunk of rows, this thread labels the previous chunk and renders the
        next, so on two cores the wall time is about the larger of the two, not their sum."""
        out: list[Encoded] = []
        starts = range(0, len(rows), OVERLAP_CHUNK_ROWS)
        if len(starts) < 2:
            return self._label_chunk(*self._tokenize_chunk(self._render_chunk(
                rows, first_row_number)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future | None = None
            for start in starts:
                rendered = self._render_chunk(rows[start:start + OVERLAP_CHUNK_ROWS],
                                              first_row_number + start)
                if pending is not None:
                    out += self._label_chunk(*pending.result())
                pending = pool.submit(self._tokenize_chunk, rendered)
            assert pending is not None
            out += self._label_chunk(*pending.result())
        return out

    def _render_chunk(self, rows: Sequence[dict[str, Any]], first_row_number: int
                      ) -> list[Rendered]:
        return [self.render(row, first_row_number + i) for i, row in enumerate(rows)]

    def _tokenize_chunk(self, rendered: list[Rendered]
                        ) -> tuple[list[Rendered], list[tuple[list[int], TokenIndex]]]:
        encoded: list[Any] = [None] * len(rendered)
        for special in (True, False):  # one batched call per add_special_tokens setting
            picked = [i for i, r in enumerate(rendered) if r.add_special_tokens == special]
            if picked:
                texts = [rendered[i].text for i in picked]
                for i, item in zip(picked, tokenize_texts(self.tokenizer, texts, special),
                                   strict=True):
                    encoded[i] = item
        return rendered, encoded

    def _label_chunk(self, rendered: list[Rendered],
                     encoded: list[tuple[list[int], TokenIndex]]) -> list[Encoded]:
        return [self._labels(r, ids, index) for r, (ids, index) in zip(rendered, encoded,
                                                                        strict=True)]

    def _labels(self, rendered: Rendered, ids: list[int], index: TokenIndex) -> Encoded:
        if self.train_on_inputs or rendered.train_all:
            labels = list(ids)
        else:
            labels = labels_for_spans(ids, index, rendered.spans)
            self.finish(rendered, ids, index, labels)
        if rendered.eos_after:
            eos = [self.tokenizer.eos_token_id] * rendered.eos_after
            ids = ids + eos
            trained = self.train_on_inputs or rendered.train_all or rendered.train_eos
            labels = labels + (eos if trained else [IGNORE_INDEX] * len(eos))
        return {"input_ids": ids, "labels": labels}


def resolve_callable(name: str, search_dirs: Sequence[Any], what: str) -> Callable[..., Any]:
    """`module.function` (module may be dotted) imported from `search_dirs` first, then sys.path."""
    import importlib
    import sys
    from pathlib import Path

    module_name, _, function_name = name.rpartition(".")
    if not module_name:
        raise ValueError(f"{what}: '{name}' is not 'module.function'")
    added = [str(Path(d).resolve()) for d in search_dirs if d is not None]
    added = [d for d in dict.fromkeys(added) if d not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = ", ".join(added) or "sys.path"
        raise ValueError(f"{what}: cannot import module '{module_name}' (looked in {where}): "
                         f"{exc}") from exc
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{what}: module '{module_name}' ({getattr(module, '__file__', '?')}) "
                         f"has no function '{function_name}'")
    return function
