"""Examples -> padded micro-batches, in an order fixed by (seed, epoch) so a resumed run sees
the same batches as an uninterrupted one and can skip finished ones without touching data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sftlab.data.tokenize import IGNORE_INDEX, Example

MEGABATCH = 32  # length grouping sorts within windows of this many micro-batches, keeping randomness


class BatchPlan(Sequence):
    """The micro-batches of one epoch as arrays, not a list per batch: batch b holds the units
    ``items[starts[b]:ends[b]]`` (examples, or packed rows)."""

    def __init__(self, items: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.items, self.starts, self.ends = items, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, b: int) -> list[int]:
        return self.items[self.starts[b] : self.ends[b]].tolist()


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([abs(seed), epoch])


def batch_order(lengths, batch_size: int, seed: int, epoch: int, group_by_length: bool,
                batches_per_step: int = 1) -> BatchPlan:
    """Each micro-batch of one epoch, computed with numpy over the lengths array.

    With grouping, a shuffled window of MEGABATCH micro-batches is sorted by length and cut
    into batches, so each batch holds similar lengths (less padding); the batches are then
    shuffled in runs of `batches_per_step` (the micro-batches of one optimizer step on all
    ranks: gradient_accumulation_steps x world_size), so the ranks of a step get batches of
    similar length and none waits long for the others, while the order of steps stays random.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = np.arange(len(order)) // (batch_size * max(MEGABATCH, batches_per_step))
        order = order[np.lexsort((-lengths[order], window))]  # by window, then longest first (stable)
    starts = np.arange(0, len(order), batch_size)
    ends = np.minimum(starts + batch_size, len(order))
    if group_by_length:
        runs = np.arange(len(starts)) // batches_per_step
        shuffled = np.argsort(rng.permutation(runs[-1] + 1)[runs], kind="stable") if len(runs) else runs
        starts, ends = starts[shuffled], ends[shuffled]
    return BatchPlan(order, starts, ends)


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Positions of a micro-batch's units (examples, or packed rows) cut into pieces whose padded
    size (units x the longest unit) stays within ``budget`` tokens; a unit longer than the
    budget is a piece of its own. Units are taken longest first, so each piece pads little.

    The step's loss is the sum of token losses over the step divided by its trained tokens, so
    how a micro-batch is cut changes memory and speed, never the result."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    pieces: list[list[int]] = []
    for i in order:
        if pieces and (len(pieces[-1]) + 1) * lengths[pieces[-1][0]] <= budget:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
