"""ROUGE-L between short texts, in bulk: the near-duplicate measure of Self-Instruct's filter.

ROUGE-L F1 of token sequences a and b is 2·LCS(a, b) / (len(a) + len(b)). LCS relates to the
Indel distance (insertions and deletions only) by Indel = len(a) + len(b) − 2·LCS, so ROUGE-L F1
is exactly rapidfuzz's normalised Indel similarity once each token is one character. rapidfuzz
computes that bit-parallel in C++ over whole matrices (`process.cdist`, all cores), which is
what makes 10,000 candidates against a 10,000-instruction pool take seconds, not hours.

Tokens follow the `rouge-score` package without stemming (lowercase, every run of characters
outside [a-z0-9] becomes a space, split), and the returned scores are computed with its
formula, 2·P·R / (P + R), so they equal `RougeScorer(["rougeL"], use_stemmer=False)` to the
last bit. An empty token sequence scores 0 against anything, as in rouge-score.

    from sftlab.quality.similarity import rouge_l, max_rouge_l, RougePool
    rouge_l("Sort the numbers.", "Sort these numbers, please.")      # 0.571...
    scores, nearest = max_rouge_l(candidates, pool)                  # best pool match per candidate
    pool = RougePool(seed_instructions)
    kept = pool.add_if_novel(new_instructions, threshold=0.7)        # Self-Instruct's filter, in order
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
_CHUNK_ROWS = 512  # candidates per cdist call: bounds the score matrix to 512 x len(pool) floats


def rouge_l_tokens(text: str) -> list[str]:
    """The tokens rouge-score compares (no stemming): lowercase ASCII letters and digits."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _f_measure(lcs, len_a, len_b):
    """rouge-score's F: P = LCS/len_b, R = LCS/len_a, 2PR/(P+R); 0 when LCS is 0 (works on arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / len_b
        recall = lcs / len_a
        f = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, f, 0.0)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """LCS length by dynamic programming (for single pairs; bulk work goes through rapidfuzz)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts, equal to rouge-score's rougeL fmeasure (no stemming)."""
    ta, tb = rouge_l_tokens(a), rouge_l_tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = _lcs_length(ta, tb)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(tb), lcs / len(ta)
    return 2 * precision * recall / (precision + recall)


class _Encoder:
    """Maps each distinct token to one character, so token sequences become short strings."""

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        codes = self._codes
        out = []
        for token in rouge_l_tokens(text):
            code = codes.get(token)
            if code is None:
                n = len(codes)
                if n >= 0x10FFFF - 0x800 - 0x100:
                    raise ValueError("more distinct tokens than Unicode code points")
                point = 0x100 + n
                if point >= 0xD800:  # skip the surrogate range
                    point += 0x800
                code = codes[token] = chr(point)
            out.append(code)
        return "".join(out)


def _max_against(cand_codes: list[str], pool_codes: list[str], pool_lengths: np.ndarray,
                 workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Best ROUGE-L F of every candidate against the pool, and the first index achieving it.

    Scores and indices are those of rouge-score plus argmax: rapidfuzz's normalised Indel
    similarity 1 − Indel/(m+n) = 2·LCS/(m+n) is the F-measure computed another way, so it finds
    the best pairs; among pairs tied at the best value, rouge-score's 2PR/(P+R) can differ in
    the last bit, so those few are rescored with its formula and the first float maximum wins.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    n = len(cand_codes)
    scores = np.zeros(n, dtype=np.float64)
    index = np.full(n, -1 if not pool_codes else 0, dtype=np.int64)
    if not n or not pool_codes:
        return scores, index
    empty_pool = pool_lengths == 0
    len_pool = pool_lengths.astype(np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        rows = cand_codes[start:start + _CHUNK_ROWS]
        sim = process.cdist(rows, pool_codes, scorer=Indel.normalized_similarity, workers=workers, dtype=np.float64)
        if empty_pool.any():  # Indel calls two empty strings identical; ROUGE-L scores them 0
            sim[:, empty_pool] = 0
        best = sim.max(axis=1)
        tied_rows, tied_cols = np.nonzero((sim >= (best - 1e-12)[:, None]) & (best > 0)[:, None])
        if len(tied_rows):
            len_a = np.array([len(r) for r in rows], dtype=np.float64)[tied_rows]
            len_b = len_pool[tied_cols]
            total = len_a + len_b
            lcs = np.rint(sim[tied_rows, tied_cols] * total / 2)
            exact = _f_measure(lcs, len_a, len_b)
            # per row: the highest exact score, first column among equals (rows come sorted, columns ascending)
            order = np.lexsort((tied_cols, -exact, tied_rows))
            first = order[np.r_[True, tied_rows[order][1:] != tied_rows[order][:-1]]]
            scores[start + tied_rows[first]] = exact[first]
            index[start + tied_rows[first]] = tied_cols[first]
    return scores, index


def max_rouge_l(candidates: Sequence[str], pool: Sequence[str], workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(scores, index_of_most_similar): each candidate's highest ROUGE-L F against the pool.

    index is the first pool position with that score (0 when every score is 0, -1 when the
    pool is empty). workers=-1 uses every core.
    """
    encode = _Encoder()
    pool_codes = [encode(t) for t in pool]
    cand_codes = [encode(t) for t in candidates]
    return _max_against(cand_codes, pool_codes, np.array([len(c) for c in pool_codes], dtype=np.int64), workers)


@dataclass
class Match:
    """The verdict on one candidate: its best score, the pool text it came from, and whether it was added."""

    score: float
    most_similar: str | None
    most_similar_index: int
    added: bool


class RougePool:
    """A growing pool of texts for Self-Instruct's novelty filter.

    `add_if_novel` checks candidates in order: each is compared with the pool as it stands,
    including the candidates accepted just before it, and joins the pool when its best
    ROUGE-L F is at most `threshold` (Self-Instruct drops a candidate when the score is > 0.7).
    """

    def __init__(self, texts: Iterable[str] = (), workers: int = -1) -> None:
        self._encode = _Encoder()
        self.texts: list[str] = []
        self._codes: list[str] = []
        self._lengths = np.zeros(0, dtype=np.int64)
        self.workers = workers
        self.extend(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def extend(self, texts: Iterable[str]) -> None:
        """Add texts unconditionally."""
        texts = list(texts)
        codes = [self._encode(t) for t in texts]
        self.texts += texts
        self._codes += codes
        self._lengths = np.concatenate([self._lengths, np.array([len(c) for c in codes], dtype=np.int64)])

    def max_similarity(self, candidates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Like max_rouge_l(candidates, pool.texts), without adding anything."""
        return _max_against([self._encode(t) for t in candidates], self._codes, self._lengths, self.workers)

    def add_if_novel(self, candidates: Sequence[str], threshold: float = 0.7,
                     max_added: int | None = None) -> list[Match | None]:
        """Compare candidates in order, adding each whose best score is <= threshold; one Match each.

        With max_added, checking stops once that many were added; the candidates after that
        point are not examined and get None.
        """
        from rapidfuzz import process
        from rapidfuzz.distance import Indel

        codes = [self._encode(t) for t in candidates]
        matches: list[Match | None] = []
        room = len(codes) if max_added is None else max(0, max_added)
        for start in range(0, len(codes), _CHUNK_ROWS):
            if room == 0:
                break
            block = codes[start:start + _CHUNK_ROWS]
            # against the pool as it stands before this block, in bulk ...
            pool_size = len(self._codes)
            scores, index = _max_against(block, self._codes, self._lengths, self.workers)
            # ... and every pair inside the block, for the candidates accepted on the way
            lengths = np.array([len(c) for c in block], dtype=np.float64)
            distance = process.cdist(block, block, scorer=Indel.distance, workers=self.workers, dtype=np.int64)
            lcs = (lengths[:, None] + lengths[None, :] - distance) / 2
            inner = _f_measure(lcs, lengths[:, None], lengths[None, :])
            accepted: list[int] = []  # block positions of accepted candidates, in order
            for i, code in enumerate(block):
                if room == 0:
                    break
                best, best_index = float(scores[i]), int(index[i])
                if accepted:
                    row = inner[i, accepted]
                    j = int(row.argmax())
                    if row[j] > best:  # strictly: on a tie the earlier (pool) text stays the match
                        best, best_index = float(row[j]), pool_size + j
                added = best <= threshold
                has_match = best > 0 and best_index >= 0
                matches.append(Match(best, self.texts[best_index] if has_match else None,
                                     best_index if has_match else -1, added))
                if added:
                    self.texts.append(candidates[start + i])
                    self._codes.append(code)
                    accepted.append(i)
                    room -= 1
            if len(self._codes) > pool_size:
                new = np.array([len(c) for c in self._codes[pool_size:]], dtype=np.int64)
                self._lengths = np.concatenate([self._lengths, new])
        return matches + [None] * (len(codes) - len(matches))
