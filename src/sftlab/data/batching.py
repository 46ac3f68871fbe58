"""Examples -> padded micro-batches, in an order fixed by (seed, epoch) so a resumed run sees
the same batches as an uninterrupted one and can skip finished ones without touching data."""

from __future__ import annotations

import random

import torch

from sftlab.data.tokenize import IGNORE_INDEX, Example

MEGABATCH = 32  # length grouping sorts within windows of this many micro-batches, keeping randomness


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Indices of each micro-batch for one epoch.

    With grouping, a shuffled window of MEGABATCH micro-batches is sorted by length and cut
    into batches, so each batch holds similar lengths (less padding) while the order of
    batches stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * MEGABATCH
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s : s + window], key=lambda i: -lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


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
