"""Contamination: 13-gram overlap between training rows and evaluation items.

The lm-evaluation-harness convention (its decontamination janitor): text is lowercased, the
characters that are not letters, digits, `_` or whitespace are deleted, and the rest is split at
whitespace; a row is contaminated when one of its 13-grams (inside one message: n-grams never
span two messages) is a 13-gram of an evaluation item. Items shorter than 13 words have no
13-grams and can never match, as in the harness.

Evaluation items come from the built-in instruction-following suite
(`src/sftlab/eval/data/ifeval_suite.jsonl`, when it exists) and from any `--against` files,
read with sftlab's readers; every string field of a row (nested ones too) is a text of the item.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NGRAM = 13
_DELETE = re.compile(r"[^\w\s]")


def eval_tokens(text: str) -> list[str]:
    """Lowercase, delete punctuation and symbols, split at whitespace."""
    return _DELETE.sub("", text.lower()).split()


def builtin_suite() -> Path | None:
    """The eval suite's JSONL when the eval package ships it, else None."""
    try:
        from importlib.resources import files

        path = Path(str(files("sftlab") / "eval" / "data" / "ifeval_suite.jsonl"))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        return None
    return path if path.is_file() else None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


@dataclass
class EvalItem:
    source: str  # file:line / file[index] (+ " id=..." when the row has an id)
    text: str  # the item's texts joined (for display)


class EvalIndex:
    """Every 13-gram of the evaluation items -> the first item that has it."""

    def __init__(self, n: int = NGRAM) -> None:
        self.n = n
        self.items: list[EvalItem] = []
        self.files: list[str] = []
        self._grams: dict[tuple[str, ...], int] = {}
        self._vocab: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ngram_count(self) -> int:
        return len(self._grams)

    def add(self, source: str, texts: list[str]) -> None:
        item = len(self.items)
        self.items.append(EvalItem(source, "\n".join(texts)))
        for text in texts:
            tokens = eval_tokens(text)
            for k in range(len(tokens) - self.n + 1):
                self._grams.setdefault(tuple(tokens[k : k + self.n]), item)
                self._vocab.update(tokens[k : k + self.n])

    def add_file(self, path: str | Path) -> None:
        from sftlab.data.readers import read_rows

        self.files.append(str(path))
        for row in read_rows(path):
            if row.error is not None:
                continue
            label = row.source
            if isinstance(row.data, dict) and isinstance(row.data.get("id"), (str, int)):
                label += f" id={row.data['id']}"
            self.add(label, _strings(row.data))

    def matches(self, text: str) -> list[tuple[int, str]]:
        """(item, the matching 13-gram) for every 13-gram of text found in the index."""
        tokens = eval_tokens(text)
        n, vocab, grams = self.n, self._vocab, self._grams
        out = []
        run = 0  # consecutive tokens (ending here) that occur in some item's 13-grams
        for k, token in enumerate(tokens):
            run = run + 1 if token in vocab else 0
            if run >= n:
                gram = tuple(tokens[k - n + 1 : k + 1])
                item = grams.get(gram)
                if item is not None:
                    out.append((item, " ".join(gram)))
        return out


def build_index(against=(), use_builtin: bool = True, n: int = NGRAM) -> EvalIndex:
    index = EvalIndex(n)
    suite = builtin_suite() if use_builtin else None
    for path in ([suite] if suite else []) + list(against):
        index.add_file(path)
    return index


def find_contamination(texts_per_row: list[list[str]], index: EvalIndex) -> dict[int, list[dict]]:
    """{row position: [{"item": i, "ngram": first matching 13-gram, "ngrams": how many}, ...]}."""
    hits: dict[int, list[dict]] = {}
    if not index.ngram_count:
        return hits
    for row, texts in enumerate(texts_per_row):
        found: dict[int, dict] = {}
        for text in texts:
            for item, gram in index.matches(text):
                entry = found.setdefault(item, {"item": item, "ngram": gram, "ngrams": 0})
                entry["ngrams"] += 1
        if found:
            hits[row] = sorted(found.values(), key=lambda e: e["item"])
    return hits
