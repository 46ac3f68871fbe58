"""Rendered text + trained spans -> input_ids + labels (-100 outside the trained spans).

The whole example is tokenized once; a token is trained when its first character lies inside
a trained span (its offset from the fast tokenizer). Prompt and response are never tokenized
separately, so the token boundary is the one the model sees. EOS is trained by position,
never by comparing ids with the pad id, so pad == eos cannot mask it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftlab.data.templates import Rendered

IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class Example:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not trained
    source: str = ""
    truncated: bool = False
    boundary_merged: bool = False  # one token spanned a prompt/response boundary
    lost_end_token: bool = False  # truncation cut inside a trained response

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


def _encode(tokenizer, texts: list[str]):
    """(ids, offsets) per text with the tokenizer's own special tokens (BOS exactly when it adds one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no Python-side conversion of every token
        encodings = backend.encode_batch(texts, add_special_tokens=True)
        return [(np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2)) for e in encodings]
    encoded = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    return [(np.asarray(i, dtype=np.int32), np.asarray(o, dtype=np.int32).reshape(-1, 2))
            for i, o in zip(encoded["input_ids"], encoded["offset_mapping"])]


def tokenize_rendered(tokenizer, rendered: list[Rendered], sources: list[str], max_length: int) -> list[Example | Dropped]:
    """Tokenize a batch of rendered examples with offsets and build labels; truncate to max_length.

    A row whose trained tokens were all cut away by truncation is dropped (never kept with an
    empty loss); a row cut inside a response is kept and marked (it lost its end token).
    """
    results: list[Example | Dropped] = []
    for item, source, (ids, offsets) in zip(rendered, sources, _encode(tokenizer, [r.text for r in rendered])):
        starts, ends = offsets[:, 0], offsets[:, 1]
        trained = np.zeros(len(ids), dtype=bool)
        merged = False
        for span_start, span_end in item.trained_spans:
            trained |= (starts >= span_start) & (starts < span_end)
            merged |= bool(np.any((starts < span_start) & (ends > span_start)))
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
