"""Which examples each optimizer step trains on, on each rank.

The training data is read as a stream of micro-batches of `batch_size` units (examples, or
packed rows), epoch after epoch, in an order fixed by (seed, epoch). Step s takes the next
`gradient_accumulation_steps x world_size` micro-batches of the stream and rank r takes every
world_size-th of them, starting at r. So a step trains on the same examples whatever the number
of processes — 2 ranks x 1 micro-batch equal 1 rank x 2 micro-batches — and a resumed run
finds its position from the step number alone, without reading the data it skips.
"""

from __future__ import annotations

import math

import numpy as np

from sftlab.config import RunConfig
from sftlab.data.batching import BatchPlan, batch_order, collate, split_by_tokens
from sftlab.data.packing import collate_packed, pack_rows, packed_batch_order


class RunBatches:
    def __init__(self, examples, config: RunConfig, rank: int = 0, world_size: int = 1, pad_id: int = 0):
        self.examples, self.config = examples, config
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        # a store's lengths array (no example is read to plan the batches), or the examples' own
        lengths = getattr(examples, "lengths", None)
        self.lengths = np.asarray(lengths if lengths is not None else [len(e) for e in examples], dtype=np.int64)
        # packing does not depend on the epoch: computed once; rows are shuffled per epoch
        self.packed = pack_rows(self.lengths, config.max_length) if config.packing else None
        self._epoch, self._order = None, None
        self.micro_per_epoch = len(self._epoch_order(0))
        self.steps_per_epoch = max(1, self.micro_per_epoch // (config.gradient_accumulation_steps * world_size))
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))

    def _epoch_order(self, epoch: int) -> BatchPlan:
        # one epoch's order at a time: a resumed run recomputes the same order from (seed, epoch)
        if epoch != self._epoch:
            c = self.config
            if self.packed is not None:
                self._order = packed_batch_order(self.packed, c.batch_size, c.seed, epoch)
            else:
                self._order = batch_order(self.lengths, c.batch_size, c.seed, epoch, c.group_by_length,
                                          c.gradient_accumulation_steps * self.world_size)
            self._epoch = epoch
        return self._order

    def micro_batch_indices(self, step: int) -> list[int]:
        """Stream positions of the micro-batches this rank trains on in `step` (1-based)."""
        per_step = self.config.gradient_accumulation_steps * self.world_size
        first = (step - 1) * per_step
        return [first + j * self.world_size + self.rank for j in range(self.config.gradient_accumulation_steps)]

    def _units(self, index: int) -> list:
        epoch, position = divmod(index, self.micro_per_epoch)
        units = self._epoch_order(epoch)[position]
        if self.packed is not None:
            return [[self.examples[i] for i in self.packed.row(r)] for r in units]
        return [self.examples[i] for i in units]
    def micro_batches(self, step: int) -> list[list]:
        """This rank's micro-batches of `step`: lists of examples (or of packed rows of examples)."""
        return [self._units(i) for i in self.micro_batch_indices(step)]

    def unit_size(self, unit) -> int:
        return sum(len(e) for e in unit) if self.config.packing else len(unit)

    def collate(self, units: list) -> dict:
        return collate_packed(units, self.pad_id) if self.config.packing else collate(units, self.pad_id)

    def sources(self, step: int) -> list[str]:
        """file:line of this rank's rows in `step` (to name them when a step fails)."""
        units = [u for mb in self.micro_batches(step) for u in mb]
        examples = [e for row in units for e in row] if self.config.packing else units
        return [e.source for e in examples]


class EvalBatches:
    """Validation batches: batch_size examples of similar length (shortest first), each cut
    under the token budget (None: not cut), and of those every ranks-th from `rank` on;
    collated when used, so nothing is held between. The training loop's validation and
    `sftlab eval`'s held-out loss use the same batches."""

    def __init__(self, examples, batch_size: int, pad_id: int, budget: int | None = None, rank: int = 0, ranks: int = 1):
        lengths = getattr(examples, "lengths", None)
        lengths = np.asarray(lengths if lengths is not None else [len(e) for e in examples], dtype=np.int64)
        ordered = np.argsort(lengths, kind="stable")
        groups = []
        for start in range(0, len(ordered), batch_size):
            group = ordered[start : start + batch_size]
            parts = split_by_tokens(lengths[group].tolist(), budget) if budget else [list(range(len(group)))]
            groups += [group[part].tolist() for part in parts]
        self.examples, self.pad_id, self.groups = examples, pad_id, groups[rank::ranks]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        return collate([self.examples[i] for i in self.groups[index]], self.pad_id)
