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

from sftlab.data.special import MARK_CLOSE, MARK_OPEN, Encoding, encode_marked, unmark
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


def _backend(tokenizer):
    """The Rust tokenizer of a fast tokenizer (or a backend given as is); None for a slow one."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer if hasattr(tokenizer, "encode_batch") else None)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> Encoding:
    """`text` tokenized as training tokenizes it: control-token text that the template marked
    (sftlab.data.special) as plain text, the rest as usual; special tokens (BOS) added the
    tokenizer's way. What training, the consistency check and inference all call."""
    backend = _backend(tokenizer)
    if backend is not None:
        return encode_marked(backend, text, add_special_tokens)
    encoded = tokenizer(unmark(text), add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    return Encoding(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]],
                    list(encoded["special_tokens_mask"]))


def encode_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return encode(tokenizer, text, add_special_tokens).ids


def view_tokens(tokenizer, view: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of a view as training tokenizes it: whole, or, for a view split at a
    turn's reply, its context and its reply apart (the context then tokenizes as the inference
    prompt does)."""
    if view.split_at is None:
        whole = encode(tokenizer, view.text)
        return whole.ids, whole.offsets
    head = encode(tokenizer, view.text[: view.split_at])
    tail = encode(tokenizer, view.text[view.split_at:], add_special_tokens=False)
    shift = view.split_at
    return head.ids + tail.ids, head.offsets + [(s + shift, e + shift) for s, e in tail.offsets]


def _added_ids(backend) -> frozenset[int]:
    return frozenset(backend.get_added_tokens_decoder())


def _context_tokenizes_alone(backend, encoding, text: str, at: int, added: frozenset[int]) -> bool:
    """Whether the view's tokens before character `at` are the tokens of text[:at] alone (the
    inference prompt). Only the stretch after the last added token before `at` can differ (added
    tokens split the text), so only that stretch is tokenized again."""
    ids, offsets = encoding.ids, encoding.offsets
    before = [k for k, (s, e) in enumerate(offsets) if s < at or (s == e == 0 and k == 0)]
    end = before[-1] + 1 if before else 0
    if end and offsets[end - 1][1] > at:  # a token straddles the reply's first character
        return False
    added_before = [k for k in range(end) if ids[k] in added and offsets[k][1] > offsets[k][0]]
    start = added_before[-1] + 1 if added_before else next(
        (k for k in range(end) if not encoding.special_tokens_mask[k]), end)
    char = offsets[start - 1][1] if added_before else 0
    return encode_marked(backend, text[char:at], add_special_tokens=False).ids == ids[start:end]


def _end_sensitive(text: str, at: int) -> bool:
    """Whether a prompt ending at `at` may tokenize differently alone: it ends in whitespace other
    than one newline before a non-space (which every common pre-tokenizer splits the same way)."""
    if at == 0 or not text[at - 1].isspace():
        return False
    return not (text[at - 1] == "\n" and (at < 2 or not text[at - 2].isspace()) and at < len(text)
                and not text[at].isspace())


def exact_views(tokenizer, row: RenderedRow) -> RenderedRow:
    """Move each turn whose context does not tokenize like its inference prompt into a view split
    at its reply.

    A prompt that ends in whitespace can tokenize differently at the end of the text (how the
    inference prompt ends) than before the reply's first character (how the whole rendering
    runs on): GPT-2-style tokenizers write "\n\n" before "It" as two tokens, and as one at the end.
    Such a turn is trained on the prompt's own tokens followed by the reply's, so the model
    learns its reply from exactly the tokens it is given at inference. Only turns whose prompt
    ends in whitespace are looked at (_end_sensitive); the consistency check of every prepare
    compares all turns of its sample rows."""
    backend = _backend(tokenizer)
    if backend is None:
        return row
    views, moved, added = [], [], None
    for view in row.views:
        suspects = [turn for turn in view.turns if _end_sensitive(view.text, turn[1])]
        if not suspects or view.split_at is not None:
            views.append(view)
            continue
        added = added if added is not None else _added_ids(backend)
        encoding = encode_marked(backend, view.text)
        bad = {turn for turn in suspects if not _context_tokenizes_alone(backend, encoding, view.text, turn[1], added)}
        if not bad:
            views.append(view)
            continue
        pairs = list(zip(view.turns, view.trained_spans))  # both in the order of the text
        keep = [(turn, span) for turn, span in pairs if turn not in bad]
        views.append(Rendered(view.text, tuple(s for _, s in keep), tuple(t for t, _ in keep)))
        moved += [Rendered(view.text[: span[1]], (span,), (turn,), split_at=turn[1]) for turn, span in pairs if turn in bad]
    if not moved:
        return row
    return RenderedRow(tuple(views) + tuple(moved), row.empty_think_masked, row.reasoning_masked)


def _mask(tokenizer, texts: list[str], spans_per_text, splits=None) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(ids, trained mask, merged) per text, with the tokenizer's own special tokens (BOS exactly
    when it adds one). Only the tokens at span boundaries are looked up, through the Rust
    encoding, instead of converting every token's offsets to Python. A text with a split
    (`splits`) is tokenized in two parts (see view_tokens), and one with marked control-token text
    (sftlab.data.special) piece by piece; both are rare."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    splits = splits or [None] * len(texts)
    slow = [s is not None or MARK_OPEN in t or MARK_CLOSE in t for t, s in zip(texts, splits)]
    if any(slow):
        out = _mask(tokenizer, [t for t, x in zip(texts, slow) if not x],
                    [p for p, x in zip(spans_per_text, slow) if not x])[::-1]
        results = []
        for text, spans, split, x in zip(texts, spans_per_text, splits, slow):
            if not x:
                results.append(out.pop())
                continue
            ids, offsets = view_tokens(tokenizer, Rendered(text, tuple(spans), (), split))
            ids = np.asarray(ids, dtype=np.int32)
            results.append((ids, *_labels_from_offsets(ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2), spans)))
        return results
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
    masks = _mask(tokenizer, [r.text for r in rendered], [r.trained_spans for r in rendered],
                  [getattr(r, "split_at", None) for r in rendered])
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
    rows = [exact_views(tokenizer, row) for row in rows]
    flat, owners = [], []
    for k, row in enumerate(rows):
        for v, view in enumerate(row.views):
            if not view.trained_spans and any(w.trained_spans for w in row.views):
                continue  # a view whose turns all train in views of their own
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
        # what the views cost: the sequences beyond one, and their tokens beyond the longest (the whole
        # conversation, or the view that stands for it when every turn moved into one of its own)
        tokens = sorted((len(e) for e in examples), reverse=True)
        out.append(TokenizedRow(examples, sources[k], len(examples) - 1, sum(tokens[1:]),
                                sum(d.reason == "response_truncated_away" for d in dropped),
                                rows[k].empty_think_masked, rows[k].reasoning_masked))
    return out


def _continuing(example: Example) -> Example:
    return Example(example.input_ids, example.labels, example.source, example.truncated, example.boundary_merged,
                   example.lost_end_token, continues=True)

