"""Padding-free packing: many examples per row, none attending across another.

Examples are placed into rows of at most `capacity` tokens by best-fit decreasing (each
example, longest first, goes into the fullest row it still fits). In a row, position_ids
restart at 0 for every example; with no attention_mask, transformers derives a block-causal
mask from those restarts (masking_utils.find_packed_sequence_indices), so attention never
crosses an example boundary. The first label of every example is masked: otherwise the
last token of one example would be trained to predict the first token of the next.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

import torch

from sftlab.data.batching import BatchPlan, epoch_rng
from sftlab.data.tokenize import IGNORE_INDEX, Example


class PackedRows:
    """Examples placed into rows: row r holds the examples ``members[bounds[r]:bounds[r+1]]``."""

    def __init__(self, members: np.ndarray, bounds: np.ndarray, lengths: np.ndarray):
        self.members, self.bounds = members, bounds
        self.lengths = np.add.reduceat(lengths[members], bounds[:-1]) if len(members) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def row(self, r: int) -> list[int]:
        return self.members[self.bounds[r] : self.bounds[r + 1]].tolist()


def pack_rows(lengths, capacity: int) -> PackedRows:
    """Best-fit decreasing: each example, longest first, goes into the row with the least free
    space it still fits (the earliest such row on a tie); rows hold <= capacity tokens.

    Rows are kept in buckets by free space (a heap of row numbers each) and the free-space
    values in one sorted list of at most `capacity` entries, so each example costs a binary
    search and a heap operation: a million examples pack in seconds."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    needs = np.minimum(lengths, capacity)[order].tolist()
    buckets: dict[int, list[int]] = {}  # free space -> heap of row numbers
    spaces: list[int] = []  # the free-space values with a non-empty bucket, sorted
    row_of = np.empty(len(order), dtype=np.int64)
    rows = 0
    for k, need in enumerate(needs):
        at = bisect.bisect_left(spaces, need)
        if at < len(spaces):
            space = spaces[at]
            bucket = buckets[space]
            row = heapq.heappop(bucket)
            if not bucket:
                del buckets[space]
                spaces.pop(at)
        else:
            space, row = capacity, rows
            rows += 1
        row_of[k] = row
        left = space - need
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                bisect.insort(spaces, left)
            heapq.heappush(buckets[left], row)
    by_row = np.argsort(row_of, kind="stable")  # each row's examples in the order they were placed
    members = order[by_row]
    bounds = np.searchsorted(row_of[by_row], np.arange(rows + 1))
    return PackedRows(members, bounds, lengths)


def pack_bfd(lengths, capacity: int) -> list[list[int]]:
    """pack_rows as lists: the indices of the examples in each row."""
    packed = pack_rows(lengths, capacity)
    return [packed.row(r) for r in range(len(packed))]


def packed_batch_order(packed: PackedRows, rows_per_batch: int, seed: int, epoch: int) -> BatchPlan:
    """Micro-batches of packed rows for one epoch; rows are shuffled by (seed, epoch)."""
    order = epoch_rng(seed, epoch).permutation(len(packed))
    starts = np.arange(0, len(order), rows_per_batch)
    return BatchPlan(order, starts, np.minimum(starts + rows_per_batch, len(order)))


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; position_ids restart per example; padding is its own segment."""
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example)
            input_ids[r, at : at + n] = torch.from_numpy(example.input_ids.astype("int64"))
            labels[r, at : at + n] = torch.from_numpy(example.labels.astype("int64"))
            labels[r, at] = IGNORE_INDEX  # never predict an example's first token from the previous one
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: a separate (untrained) segment
    num_tokens = torch.tensor(sum(len(e) for row in rows for e in row))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
