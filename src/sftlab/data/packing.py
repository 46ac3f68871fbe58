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
import random

import torch

from sftlab.data.tokenize import IGNORE_INDEX, Example


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples in each row; rows hold <= capacity tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    rows: list[list[int]] = []
    for i in order:
        need = min(lengths[i], capacity)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows


def packed_batch_order(lengths: list[int], capacity: int, rows_per_batch: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Micro-batches of packed rows for one epoch; rows are shuffled by (seed, epoch)."""
    rows = pack_bfd(lengths, capacity)
    random.Random(seed * 1_000_003 + epoch).shuffle(rows)
    return [rows[s : s + rows_per_batch] for s in range(0, len(rows), rows_per_batch)]


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
