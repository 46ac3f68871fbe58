"""Rendered text + trained spans -> input_ids + labels (-100 outside the trained spans).

The whole example is tokenized once; a token is trained when its first character lies inside
a trained span (its offset from the fast tokenizer). Prompt and response are never tokenized
separately, so the token boundary is the one the model sees. EOS is trained by position,
never by comparing ids with the pad id, so pad == eos cannot mask it.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from sftlab.data.templates import Rendered

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = ""
    truncated: bool = False
    boundary_merged: bool = False  # one token spanned the prompt/response boundary

    @property
    def trained_token_count(self) -> int:
        # label at position 0 is never a target after the causal shift
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Dropped:
    source: str
    reason: str
    detail: str = ""


def _trained_flags(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...]) -> tuple[list[bool], bool]:
    """Per token: does it start inside a trained span? Also report a token straddling a span start."""
    starts = [s for s, _ in spans]
    flags, straddles = [], False
    for tok_start, tok_end in offsets:
        i = bisect_right(starts, tok_start) - 1
        flags.append(i >= 0 and spans[i][0] <= tok_start < spans[i][1])
        if any(tok_start < s < tok_end for s in starts):
            straddles = True
    return flags, straddles


def tokenize_rendered(tokenizer, rendered: list[Rendered], sources: list[str], max_length: int) -> list[Example | Dropped]:
    """Tokenize a batch of rendered examples with offsets and build labels; truncate to max_length.

    A row whose trained tokens were all cut away by truncation is dropped (never kept with an
    empty loss); a row cut inside its response is kept and marked truncated (it lost its EOS).
    """
    encoded = tokenizer(
        [r.text for r in rendered], return_offsets_mapping=True, add_special_tokens=True, truncation=False
    )
    results: list[Example | Dropped] = []
    for index, item in enumerate(rendered):
        ids = encoded["input_ids"][index]
        flags, straddles = _trained_flags(encoded["offset_mapping"][index], item.trained_spans)
        labels = [tid if trained else IGNORE_INDEX for tid, trained in zip(ids, flags)]
        source = sources[index]
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            results.append(Dropped(source, "no_trained_tokens", "the rendered example has no trained token"))
            continue
        truncated = len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
            if not any(label != IGNORE_INDEX for label in labels[1:]):
                results.append(
                    Dropped(source, "response_truncated_away", f"the prompt alone fills max_length={max_length} tokens")
                )
                continue
        results.append(Example(tuple(ids), tuple(labels), source, truncated, straddles))
    return results
