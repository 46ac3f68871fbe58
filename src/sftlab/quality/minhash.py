"""MinHash signatures and LSH banding, vectorised with numpy; union-find for clusters.

Why not `datasketch.MinHash` row by row: it hashes every shingle with SHA-1 in Python and
builds one small numpy array per row, which costs ~0.3 ms a row (about 30 s for 100,000 rows
on the development machine; `bench/quality_scale.py --datasketch N` measures it). Here every
step runs on flat arrays for all rows at once:

1. words -> 32-bit CRC-32 per distinct word (deterministic, unlike Python's salted `hash`);
2. word n-grams -> 64-bit shingle hashes: a polynomial over the n word hashes, then the
   splitmix64 finaliser, computed on shifted views of one flat array;
3. permutation k of 0..num_perm-1: h_k(x) = (a_k·x + b_k mod 2^64) >> 32 (multiply-shift with
   odd random a_k), min over the row's shingles with `np.minimum.reduceat`.

The estimator is the usual one: the share of the num_perm minima two rows agree on estimates
the Jaccard similarity of their shingle sets (a test checks it against the exact value).
LSH bands follow datasketch: b bands of r rows chosen to minimise the (equally weighted)
false-positive and false-negative areas for the threshold.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence

import numpy as np

from sftlab.errors import QualityError

WORD = re.compile(r"\w+")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROWS_PER_CHUNK_SHINGLES = 1 << 17  # shingles per signature block (x 64 permutations x 8 bytes = 64 MB)
_PERM_BLOCK = 64


def words(text: str) -> list[str]:
    """Lowercased word tokens (runs of letters, digits and underscores; punctuation is dropped)."""
    return WORD.findall(text.lower())


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


# odd 64-bit multipliers for the n-gram polynomial (fixed, so hashes are stable across runs)
_NGRAM_MULT = _splitmix(np.arange(1, 33, dtype=np.uint64)) | np.uint64(1)


def word_codes(token_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """CRC-32 of every token of every list, flattened (uint64); each distinct word is hashed once."""
    tokens = list(itertools.chain.from_iterable(token_lists))
    crc = {w: zlib.crc32(w.encode("utf-8")) for w in dict.fromkeys(tokens)}
    return np.fromiter(map(crc.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(token_lists: Sequence[Sequence[str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 hashes of every row's word n-grams, row offsets of length rows+1).

    A row with fewer than n words (but at least one) gets one shingle made of all its words;
    a row with no words gets one shingle, the hash of the empty sequence, so every row has at
    least one. n-grams never span two rows.
    """
    if not 1 <= n <= len(_NGRAM_MULT):
        raise QualityError(f"n-gram size must be 1..{len(_NGRAM_MULT)}")
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = word_codes(token_lists)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # polynomial over n consecutive words for every start position in the flat array
    m = max(len(flat) - n + 1, 0)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc += flat[k : k + m] * _NGRAM_MULT[k]
    acc = _splitmix(acc ^ np.uint64(n))
    # keep the positions whose n-gram lies inside one row
    counts = np.maximum(lengths - n + 1, 0)
    row_of = np.repeat(np.arange(len(lengths)), counts)
    offset_in_row = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    positions = starts[:-1][row_of] + offset_in_row
    full = acc[positions] if len(positions) else np.zeros(0, dtype=np.uint64)
    # short rows: one shingle of all their words (length-tagged so it cannot equal a full n-gram)
    short = np.nonzero(counts == 0)[0]
    short_hashes = np.zeros(len(short), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, row in enumerate(short):
            h = np.uint64(0)
            for k, code in enumerate(flat[starts[row] : starts[row + 1]]):
                h += code * _NGRAM_MULT[k]
            short_hashes[j] = h
    if len(short):  # tagged with the word count, so a short row's shingle never equals a full n-gram
        short_hashes = _splitmix(short_hashes ^ (np.uint64(0xA5A5) << np.uint64(32)) ^ lengths[short].astype(np.uint64))
    per_row = np.where(counts == 0, 1, counts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(per_row, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint64)
    is_short = np.zeros(len(out), dtype=bool)
    is_short[offsets[:-1][short]] = True
    out[is_short] = short_hashes
    out[~is_short] = full
    return out, offsets


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int = 256, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (rows, num_perm), uint32; every row must have >= 1 shingle."""
    rows = len(offsets) - 1
    a, b = permutations(num_perm, seed)
    sig = np.empty((rows, num_perm), dtype=np.uint32)
    if rows == 0:
        return sig
    if np.any(np.diff(offsets) <= 0):
        raise ValueError("every row needs at least one shingle")
    # blocks of whole rows holding about _ROWS_PER_CHUNK_SHINGLES shingles each; permutation-major
    # layout, so the per-row minimum (reduceat) runs over contiguous memory
    cuts = np.searchsorted(offsets, np.arange(0, offsets[-1], _ROWS_PER_CHUNK_SHINGLES), side="right") - 1
    bounds = sorted(set(cuts.tolist()) | {rows})
    widest = int(max(offsets[r1] - offsets[r0] for r0, r1 in zip(bounds[:-1], bounds[1:])))
    buffer = np.empty((_PERM_BLOCK, widest), dtype=np.uint64)
    shift = np.uint64(32)
    with np.errstate(over="ignore"):
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            s0, s1 = offsets[r0], offsets[r1]
            x = hashes[None, s0:s1]
            local = offsets[r0:r1] - s0
            for p0 in range(0, num_perm, _PERM_BLOCK):
                p1 = min(p0 + _PERM_BLOCK, num_perm)
                h = buffer[: p1 - p0, : s1 - s0]
                np.multiply(a[p0:p1, None], x, out=h)
                h += b[p0:p1, None]
                h >>= shift
                sig[r0:r1, p0:p1] = np.minimum.reduceat(h, local, axis=1).T
    return sig


def _false_positive(threshold: float, b: int, r: int) -> float:
    s = np.linspace(0.0, threshold, 201)
    return float(np.trapezoid(1 - (1 - s**r) ** b, s))


def _false_negative(threshold: float, b: int, r: int) -> float:
    s = np.linspace(threshold, 1.0, 201)
    return float(np.trapezoid(1 - (1 - (1 - s**r) ** b), s))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) with b·r <= num_perm minimising the weighted error areas (datasketch's rule)."""
    best, best_error = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            error = fp_weight * _false_positive(threshold, b, r) + fn_weight * _false_negative(threshold, b, r)
            if error < best_error:
                best, best_error = (b, r), error
    return best


def lsh_params_for_recall(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest false candidates) for which a pair
    at exactly `threshold` still becomes a candidate with probability >= recall."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def candidate_pairs(sig: np.ndarray, bands: int, rows_per_band: int, max_bucket: int = 64,
                    keep=None) -> np.ndarray:
    """Distinct pairs (i < j) that share at least one LSH bucket, as a (k, 2) int64 array.

    A bucket with more than `max_bucket` members (many copies of one text) contributes the pairs
    of its first member with every other and of each member with the next, not all k²/2
    pairs; union-find still joins them all when they are similar. `keep(pairs) -> bool mask`,
    when given, filters each band's pairs as they are found, which bounds memory when buckets
    are crowded.
    """
    n = sig.shape[0]
    found: list[np.ndarray] = []
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = sig[:, band * rows_per_band : (band + 1) * rows_per_band].astype(np.uint64)
            key = np.full(n, band, dtype=np.uint64)
            for k in range(block.shape[1]):
                key = _splitmix(key ^ block[:, k])
            order = np.argsort(key, kind="stable")
            sorted_key = key[order]
            starts = np.nonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])[0]
            sizes = np.diff(np.r_[starts, n])
            multi = np.nonzero(sizes > 1)[0]
            if not len(multi):
                continue
            band_pairs = []
            two = starts[multi[sizes[multi] == 2]]  # buckets of two (the common case), vectorised
            if len(two):
                band_pairs.append(np.stack([order[two], order[two + 1]], axis=1))
            for g in multi[sizes[multi] > 2]:
                members = np.sort(order[starts[g] : starts[g] + sizes[g]])
                k = len(members)
                if k <= max_bucket:
                    i, j = np.triu_indices(k, 1)
                else:
                    i = np.r_[np.zeros(k - 1, dtype=np.int64), np.arange(k - 1)]
                    j = np.r_[np.arange(1, k), np.arange(1, k)]
                band_pairs.append(np.stack([members[i], members[j]], axis=1))
            pairs = np.concatenate(band_pairs).astype(np.int64)
            pairs.sort(axis=1)
            codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
            if keep is not None and len(codes):  # a pair found in several bands is judged again: cheap
                codes = codes[keep(np.stack([codes // n, codes % n], axis=1))]
            found.append(codes)
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Share of agreeing MinHash values for each pair (the MinHash Jaccard estimate)."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s : s + chunk]
        out[s : s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def exact_jaccard(hashes: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of the shingle-hash sets of each pair."""
    cache: dict[int, np.ndarray] = {}

    def shingles(i: int) -> np.ndarray:
        s = cache.get(i)
        if s is None:
            s = cache[i] = np.unique(hashes[offsets[i] : offsets[i + 1]])
        return s

    out = np.empty(len(pairs), dtype=np.float64)
    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = shingles(i), shingles(j)
        inter = len(np.intersect1d(a, b, assume_unique=True))
        out[k] = inter / (len(a) + len(b) - inter)
    return out


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is always its smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry

    def groups(self) -> list[list[int]]:
        """Sets with more than one member, each sorted, ordered by their first member."""
        out: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            out.setdefault(self.find(x), []).append(x)
        return [m for _, m in sorted(out.items()) if len(m) > 1]
