"""Rendered text + trained spans -> input_ids + labels (-100 outside the trained spans).

A rendered row is one sequence, or several (views, see sftlab.data.templates): each view is
tokenized and truncated like a row of its own, and the row stays one row of the data report.

The whole example is tokenized once; a token is trained when its first character lies inside
a trained span (its offset from the fast tokenizer). Prompt and response are never tokenized
separately, so the token boundary is the one the model sees. EOS is trained by position,
never by comparing ids with the pad id, so pad == eos cannot mask it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftlab.data.templates import Rendered, RenderedRow

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class Example:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    source: str = ""
    truncated: bool = False
    boundary_merged: bool = False  # one token spanned a prompt/response boundary
    lost_end_token: bool = False  # truncation cut inside a trained response
    continues: bool = False  # a further view of the conversation of the example before it

    @property
    def trained_token_count(self) -> int:
        # label at position 0 is never a target after the causal shift
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Dropped:
    source: str
    reason: str
    detail: str = ""


def _span_tokens(encoding, span_start: int, span_end: int) -> tuple[int, int, bool] | None:
    """[first, last) token indices whose first character lies in [span_start, span_end), and
    whether a token straddles span_start; None when the encoding cannot map the characters."""
    first = encoding.char_to_token(span_start)
    last = encoding.char_to_token(span_end - 1)
    if first is None or last is None:
        return None
    first_start = encoding.token_to_chars(first)[0]
    straddles = first_start < span_start
    return (first + 1 if straddles else first), last + 1, straddles


def _labels_from_offsets(ids: np.ndarray, offsets: np.ndarray, spans) -> tuple[np.ndarray, bool]:
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    merged = False
    for span_start, span_end in spans:
        trained |= (starts >= span_start) & (starts < span_end)
        merged |= bool(np.any((starts < span_start) & (ends > span_start)))
    return trained, merged


def _mask(tokenizer, texts: list[str], spans_per_text) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(ids, trained mask, merged) per text, with the tokenizer's own special tokens (BOS exactly
    when it adds one). Only the tokens at span boundaries are looked up, through the Rust
    encoding, instead of converting every token's offsets to Python."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out = []
    if backend is None:  # a slow tokenizer: offsets through the Python API
        encoded = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans_per_text):
            ids = np.asarray(ids, dtype=np.int32)
            out.append((ids, *_labels_from_offsets(ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans)))
        return out
    for encoding, spans in zip(backend.encode_batch(texts, add_special_tokens=True), spans_per_text):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        trained = np.zeros(len(ids), dtype=bool)
        merged = False
        for span_start, span_end in spans:
            found = _span_tokens(encoding, span_start, span_end)
            if found is None:  # characters no token covers: fall back to every offset
                trained, merged = _labels_from_offsets(ids, np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2), spans)
                break
            first, last, straddles = found
            trained[first:last] = True
            merged |= straddles
        out.append((ids, trained, merged))
    return out


def tokenize_rendered(tokenizer, rendered: list[Rendered], sources: list[str], max_length: int) -> list[Example | Dropped]:
    """Tokenize a batch of rendered examples with offsets and build labels; truncate to max_length.

    A row whose trained tokens were all cut away by truncation is dropped (never kept with an
    empty loss); a row cut inside a response is kept and marked (it lost its end token).
    """
    results: list[Example | Dropped] = []
    masks = _mask(tokenizer, [r.text for r in rendered], [r.trained_spans for r in rendered])
    for source, (ids, trained, merged) in zip(sources, masks):
        labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
        if not trained[1:].any():
            results.append(Dropped(source, "no_trained_tokens", "the rendered example has no trained token"))
            continue
        truncated = len(ids) > max_length
        lost_end = False
        if truncated:
            # the cut falls inside a response when the tokens on both sides of it are trained
            lost_end = bool(labels[max_length - 1] != IGNORE_INDEX and labels[max_length] != IGNORE_INDEX)
            ids, labels = ids[:max_length], labels[:max_length]
            if not np.any(labels[1:] != IGNORE_INDEX):
                results.append(Dropped(source, "response_truncated_away",
                                       f"the prompt alone fills max_length={max_length} tokens"))
                continue
        results.append(Example(ids, labels, source, truncated, merged, lost_end))
    return results


@dataclass(frozen=True)
class TokenizedRow:
    """One conversation's sequences (its views), ready for the store, and what it cost."""

    examples: tuple[Example, ...]
    source: str
    extra_views: int = 0  # sequences beyond the whole conversation (turns trained in their own context)
    extra_view_tokens: int = 0  # their tokens
    views_truncated_away: int = 0  # views whose trained tokens truncation cut away (the others are kept)
    empty_think_masked: int = 0
    reasoning_masked: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def trained_token_count(self) -> int:
        return sum(e.trained_token_count for e in self.examples)


def view_source(source: str, view: Rendered) -> str:
    """The provenance of a further view: the row's, and the turn it trains first."""
    return f"{source} · turn {view.turns[0][0]} view" if view.turns else source


def tokenize_rows(tokenizer, rows: list[RenderedRow], sources: list[str], max_length: int) -> list[TokenizedRow | Dropped]:
    """Tokenize rendered rows (each view a sequence of its own, truncated to max_length).

    A view without trained tokens is not kept; a row none of whose views keeps a trained token
    is dropped under the reason of its views (no_trained_tokens or response_truncated_away)."""
    flat, owners = [], []
    for k, row in enumerate(rows):
        for v, view in enumerate(row.views):
            if v == 0 and not view.trained_spans and len(row.views) > 1:
                continue  # every trained turn of this row is in a view of its own
            flat.append(view)
            owners.append((k, v))
    tokenized = tokenize_rendered(tokenizer, flat, [sources[k] if v == 0 else view_source(sources[k], rows[k].views[v])
                                                    for k, v in owners], max_length)
    per_row: list[list] = [[] for _ in rows]
    for (k, v), item in zip(owners, tokenized):
        per_row[k].append((v, item))
    out: list[TokenizedRow | Dropped] = []
    for k, items in enumerate(per_row):
        kept = [(v, e) for v, e in items if isinstance(e, Example)]
        dropped = [e for _, e in items if isinstance(e, Dropped)]
        if not kept:
            out.append(next((d for d in dropped if d.reason == "response_truncated_away"), dropped[0]) if dropped
                       else Dropped(sources[k], "no_trained_tokens", "the rendered example has no trained token"))
            continue
        examples = tuple(e if n == 0 else _continuing(e) for n, (_, e) in enumerate(kept))
        extra = [e for (v, _), e in zip(kept, examples) if v > 0]
        out.append(TokenizedRow(examples, sources[k], len(extra), sum(len(e) for e in extra),
                                sum(d.reason == "response_truncated_away" for d in dropped),
                                rows[k].empty_think_masked, rows[k].reasoning_masked))
    return out


def _continuing(example: Example) -> Example:
    return Example(example.input_ids, example.labels, example.source, example.truncated, example.boundary_merged,
                   example.lost_end_token, continues=True)
