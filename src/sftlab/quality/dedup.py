"""Exact duplicates, near duplicates (MinHash + LSH) and similar instructions (ROUGE-L).

Exact duplicates
    Two rows are exact duplicates when every message has the same role and the same text after
    `normalize` (lowercase; every character that is not a letter, digit or whitespace, and `_`,
    becomes a space; runs of whitespace become one space; ends stripped).

Near duplicates
    Shingles: word 5-grams (lowercased `\\w+` words) of instruction + response. MinHash with 256
    permutations. LSH bands are chosen for recall: the most rows per band for which a pair at
    exactly the threshold still becomes a candidate with probability >= 0.99 (42 bands x 6 rows
    at 0.7; datasketch's balanced choice, 25 x 10, finds a pair at exactly 0.7 only 51% of the
    time). The extra candidates cost little, because each candidate pair is verified: its
    MinHash estimate must be >= threshold - 0.15 (a cheap pre-filter, five standard errors below
    the threshold at 256 permutations) and its *exact* Jaccard similarity of the shingle sets
    must be >= threshold. Clusters are the connected
    components of the verified pairs (union-find); the first row in file order represents a
    cluster.

Similar instructions (Self-Instruct's ROUGE-L > 0.7)
    For each row, the earlier row whose instruction has the highest ROUGE-L F with its own
    (from `sftlab.quality.similarity`, the rouge-score tokens and formula), flagged when the score
    is > threshold. Two methods:

    - "all": every earlier instruction (exact). n²/2 comparisons in rapidfuzz's bit-parallel
      C++ (65-150 ns each with the call overhead on the 2-core development machine, depending
      on its load: 3-7 s for 10,000 rows, 5-12 minutes for 100,000), so the default for
      n <= 10,000.
    - "lsh": candidates only, for larger n. ROUGE-L F = 2·LCS/(m+n) > t implies a multiset
      Jaccard of the two token sequences > t/(2-t) (0.538 at t = 0.7; the LCS is a common
      sub-multiset) and a length ratio min/max > t/(2-t). MinHash LSH over multiset tokens
      (token + occurrence number; 128 permutations; bands for which a pair at that Jaccard
      bound becomes a candidate with probability >= 0.9: 32 bands x 4 rows at t = 0.7, which
      gives 0.94 at the bound and >= 0.995 from J = 0.65) proposes the pairs; pairs that fail
      the length bound or whose MinHash estimate is more than 0.14 below the Jaccard bound
      are dropped. Then, block by block (256 consecutive
      rows), one bulk `max_rouge_l` call scores the block against the union of its rows'
      remaining earlier candidates (candidate pairs inside a block are scored one by one). A
      pair the LSH misses is missed; `bench/quality_scale.py` measures the recall against
      "all" on a sample.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field

import numpy as np

from sftlab.errors import QualityError
from sftlab.quality import minhash

_NOT_WORD = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s+")

NEAR_NUM_PERM = 256
NEAR_NGRAM = 5
ESTIMATE_MARGIN = 0.15
LSH_RECALL = 0.99
ROUGE_EXACT_LIMIT = 10_000
ROUGE_NUM_PERM = 128
ROUGE_LSH_RECALL = 0.9  # candidate probability of a pair exactly at the Jaccard bound
ROUGE_ESTIMATE_MARGIN = 0.14  # about three standard errors at 128 permutations


def normalize(text: str) -> str:
    """Lowercase, punctuation and symbols to spaces, whitespace collapsed: the exact-duplicate key text."""
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", text.lower())).strip()


def exact_key(conversation) -> str:
    """Equal for conversations equal after normalisation; tool calls, tool lists and reasoning count too."""
    body = "\x1e".join(f"{m.role}{'' if m.trained or m.role != 'assistant' else '~'}\x1f{normalize(m.content)}"
                       for m in conversation.messages)
    extras = [[m.reasoning, [c.template_dict()["function"] for c in m.tool_calls]] for m in conversation.messages
              if m.reasoning is not None or m.tool_calls]
    if extras or conversation.tools:
        body += "\x1d" + json.dumps([extras, list(conversation.tools)], sort_keys=True, default=str)
    return hashlib.sha1(body.encode("utf-8")).hexdigest()


def exact_duplicates(conversations) -> list[list[int]]:
    """Clusters (lists of positions, ascending) of conversations that are equal after normalisation."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(conversations):
        groups.setdefault(exact_key(c), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


@dataclass
class NearDuplicates:
    clusters: list[list[int]]  # positions, ascending; the first is kept by `filter`
    pairs: np.ndarray  # (k, 2) verified pairs i < j
    jaccard: np.ndarray  # exact Jaccard of each verified pair
    estimate: np.ndarray  # MinHash estimate of each verified pair
    candidates: int  # LSH candidate pairs before verification
    params: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    hashes: np.ndarray | None = field(default=None, repr=False)  # the shingle hashes (minhash.ngram_hashes)
    offsets: np.ndarray | None = field(default=None, repr=False)

    def jaccard_of(self, pairs) -> np.ndarray:
        """Exact Jaccard of any pairs of rows (positions), from the stored shingles."""
        return minhash.exact_jaccard(self.hashes, self.offsets, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def links(self) -> dict[int, tuple[int, float]]:
        """For each clustered row but the first of its cluster: (its lowest-positioned verified partner, Jaccard)."""
        best: dict[int, tuple[int, float]] = {}
        for (i, j), s in zip(self.pairs.tolist(), self.jaccard.tolist()):
            for a, b in ((i, j), (j, i)):
                if a not in best or b < best[a][0]:
                    best[a] = (b, s)
        firsts = {c[0] for c in self.clusters}
        return {k: v for k, v in best.items() if k not in firsts}


def near_duplicates(texts: list[str], threshold: float = 0.7, num_perm: int = NEAR_NUM_PERM,
                    ngram: int = NEAR_NGRAM, seed: int = 1) -> NearDuplicates:
    """Near-duplicate clusters of texts (see the module docstring)."""
    if not 0 < threshold <= 1:
        raise QualityError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    seconds = {}
    t0 = time.perf_counter()
    hashes, offsets = minhash.ngram_hashes([minhash.words(t) for t in texts], ngram)
    seconds["shingles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sig = minhash.signatures(hashes, offsets, num_perm, seed)
    seconds["minhash"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bands, rows_per_band = minhash.lsh_params_for_recall(threshold, num_perm, LSH_RECALL)
    pairs = minhash.candidate_pairs(sig, bands, rows_per_band)
    seconds["lsh"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidates = len(pairs)
    estimate = minhash.estimated_jaccard(sig, pairs)
    keep = estimate >= threshold - ESTIMATE_MARGIN
    pairs, estimate = pairs[keep], estimate[keep]
    exact = minhash.exact_jaccard(hashes, offsets, pairs)
    keep = exact >= threshold - 1e-12
    pairs, estimate, exact = pairs[keep], estimate[keep], exact[keep]
    union = minhash.UnionFind(len(texts))
    for i, j in pairs.tolist():
        union.union(i, j)
    seconds["verify"] = time.perf_counter() - t0
    params = {"threshold": threshold, "num_perm": num_perm, "ngram": ngram, "bands": bands,
              "rows_per_band": rows_per_band, "seed": seed}
    return NearDuplicates(union.groups(), pairs, exact, estimate, candidates, params, seconds, hashes, offsets)


@dataclass
class SimilarInstructions:
    best_score: np.ndarray  # per row: highest ROUGE-L F against an earlier row (0 when none found)
    best_index: np.ndarray  # per row: that earlier row (-1 when none)
    threshold: float
    method: str  # "all" | "lsh"
    candidates: int = 0  # pairs scored (lsh), or n(n-1)/2 (all)
    seconds: float = 0.0

    @property
    def flagged(self) -> np.ndarray:
        return np.nonzero(self.best_score > self.threshold)[0]

    def clusters(self) -> list[list[int]]:
        union = minhash.UnionFind(len(self.best_score))
        for i in self.flagged.tolist():
            union.union(i, int(self.best_index[i]))
        return union.groups()


def _best_earlier_all(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Exact best earlier match of every text: divide and conquer over `max_rouge_l` calls.

    solve(lo, hi) scores texts[mid:hi] against texts[lo:mid] in one bulk call and recurses on
    both halves, so each pair j < i is scored exactly once. The calls reach row i with pools of
    increasing positions, and a later call replaces the best only when strictly higher, so ties
    go to the earliest row, as in `max_rouge_l`.
    """
    from sftlab.quality.similarity import max_rouge_l

    n = len(texts)
    best = np.zeros(n, dtype=np.float64)
    index = np.full(n, -1, dtype=np.int64)
    stack = [(0, n)]
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        scores, where = max_rouge_l(texts[mid:hi], texts[lo:mid], workers=-1 if hi - lo > 256 else 1)
        better = scores > best[mid:hi]
        best[mid:hi][better] = scores[better]
        index[mid:hi][better] = where[better] + lo
        stack.append((mid, hi))  # popped after (lo, mid): order does not matter, pools never overlap
        stack.append((lo, mid))
    return best, index


def _multiset_tokens(text: str) -> list[str]:
    from sftlab.quality.similarity import rouge_l_tokens

    seen: dict[str, int] = {}
    out = []
    for token in rouge_l_tokens(text):
        k = seen.get(token, 0)
        seen[token] = k + 1
        out.append(f"{token}\x00{k}")
    return out


def _best_earlier_lsh(texts: list[str], threshold: float, block: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
    """Best earlier match among LSH candidates, scored in bulk block by block.

    Rows are taken in blocks of `block` consecutive rows. Each block is scored with one
    `max_rouge_l` call against the union of its rows' earlier candidates that lie before the
    block (a superset of each row's own candidates, all earlier than every row of the block);
    candidate pairs inside the block are scored one by one (`rouge_l`). Ties go to the earlier
    row, as in "all".
    """
    from sftlab.quality.similarity import max_rouge_l, rouge_l

    n = len(texts)
    best = np.zeros(n, dtype=np.float64)
    index = np.full(n, -1, dtype=np.int64)
    tokens = [_multiset_tokens(t) for t in texts]
    lengths = np.array([len(t) for t in tokens], dtype=np.float64)
    hashes, offsets = minhash.ngram_hashes(tokens, 1)
    sig = minhash.signatures(hashes, offsets, ROUGE_NUM_PERM, seed=2)
    bound = threshold / (2 - threshold)  # F > t needs min/max length > bound and multiset Jaccard > bound

    def keep(pairs: np.ndarray) -> np.ndarray:
        a, b = lengths[pairs[:, 0]], lengths[pairs[:, 1]]
        ok = (np.minimum(a, b) > bound * np.maximum(a, b)) & (np.minimum(a, b) > 0)
        ok[ok] = minhash.estimated_jaccard(sig, pairs[ok]) >= bound - ROUGE_ESTIMATE_MARGIN
        return ok

    bands = minhash.lsh_params_for_recall(bound, ROUGE_NUM_PERM, ROUGE_LSH_RECALL)
    pairs = minhash.candidate_pairs(sig, *bands, keep=keep)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by later row, then earlier row
    later = pairs[:, 1]
    scored = 0
    for s in range(0, n, block):
        e = min(n, s + block)
        lo, hi = np.searchsorted(later, s), np.searchsorted(later, e)
        earlier = pairs[lo:hi, 0]
        before = np.unique(earlier[earlier < s])
        if len(before):
            scores, where = max_rouge_l(texts[s:e], [texts[j] for j in before.tolist()],
                                        workers=-1 if (e - s) * len(before) > 50_000 else 1)
            scored += (e - s) * len(before)
            best[s:e], index[s:e] = scores, np.where(scores > 0, before[where], -1)
        # candidate pairs inside the block, in ascending order of the earlier row: strictly higher wins
        for i, j in pairs[lo:hi][earlier >= s].tolist():
            score = rouge_l(texts[i], texts[j])
            scored += 1
            if score > best[j]:
                best[j], index[j] = score, i
    return best, index, scored


def similar_instructions(texts: list[str], threshold: float = 0.7, method: str = "auto",
                         exact_limit: int = ROUGE_EXACT_LIMIT) -> SimilarInstructions:
    """Best earlier ROUGE-L match of each instruction (see the module docstring); "" never matches."""
    if method not in ("auto", "all", "lsh"):
        raise QualityError(f"ROUGE-L method must be auto, all or lsh, got {method!r}")
    t0 = time.perf_counter()
    n = len(texts)
    if method == "auto":
        method = "all" if n <= exact_limit else "lsh"
    if method == "all":
        best, index = _best_earlier_all(texts)
        candidates = n * (n - 1) // 2
    else:
        best, index, candidates = _best_earlier_lsh(texts, threshold)
    index = np.where(best > 0, index, -1)
    return SimilarInstructions(best, index, threshold, method, candidates, time.perf_counter() - t0)
