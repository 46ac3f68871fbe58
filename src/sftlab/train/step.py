"""One optimizer step's forward and backward passes: pieces under a token budget, exact loss.

A step trains on `batch_size x gradient_accumulation_steps` units (examples, or packed rows)
on each of the `world_size` processes. Each micro-batch is cut into pieces of at most
`budget` padded tokens (``split_by_tokens``), and every piece's summed token loss is divided
by the trained-token count of the *whole step on all ranks* (an all-reduce before the first
backward), so the accumulated (and, across ranks, reduced) gradient is the gradient of the
step's mean token loss, however the step was cut and shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sftlab import precision
from sftlab.data.batching import split_by_tokens
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.train.distributed import World, set_gradient_sync


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed token loss of the step on this rank (a device tensor)
    trained_tokens: int  # of the whole step, all ranks
    input_tokens: int  # non-padding tokens on this rank
    pieces: int


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is trained (the label at position 0 is never a target)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch (padded: the attention mask; packed: the examples' tokens)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["input_ids"].numel())


def cut_into_pieces(micro_batches: Sequence[Sequence], size: Callable, collate: Callable, budget: int) -> list[dict]:
    """Collated pieces of the step's micro-batches, each within `budget` padded tokens.

    size(unit) is a unit's token count; collate(units) makes one batch of units."""
    pieces = []
    for units in micro_batches:
        for part in split_by_tokens([size(u) for u in units], budget):
            pieces.append(collate([units[i] for i in part]))
    return pieces


def filler_piece(pad_id: int) -> dict[str, torch.Tensor]:
    """A two-token piece whose loss the step multiplies by zero. Under FSDP2 every rank must run
    as many forward/backward passes as the others (each one gathers shards), so a rank with
    fewer pieces runs these; one trained position keeps every weight in the graph (DDP)."""
    return {"input_ids": torch.tensor([[pad_id, pad_id]]), "labels": torch.tensor([[IGNORE_INDEX, pad_id]]),
            "attention_mask": torch.ones(1, 2, dtype=torch.long)}


def forward_backward(module, pieces: list[dict], device: torch.device, world: World | None = None,
                     parallelism: str | None = None, grad_into_weight: bool = True, pad_id: int = 0) -> StepResult:
    """Accumulate the gradient of the step's mean token loss over its pieces into `.grad`.

    module(**batch) returns the summed token loss of a batch (a LossModule, wrapped or not);
    grad_into_weight lets the fused loss add the output layer's gradient straight into its
    .grad (single process only: a gradient outside autograd would not be reduced)."""
    world = world or World(device=device)
    local_tokens = sum(trained_tokens(p) for p in pieces)
    step_tokens = int(world.sum(local_tokens))
    real = len(pieces)
    pieces = pieces + [filler_piece(pad_id)] * (int(world.max(real)) - real)
    # DDP and FSDP2 average gradients over ranks: dividing by tokens / world_size makes the
    # reduced gradient that of the step's summed loss over its trained tokens
    divisor = max(step_tokens, 1) / world.size
    scaler = precision.scaler()  # fp16: the loss is scaled, and so the gradient the fused loss adds itself
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    loss_sum = torch.zeros((), device=device)
    for index, piece in enumerate(pieces):
        batch = {k: v.to(device, non_blocking=True) for k, v in piece.items() if k != "num_tokens"}
        weight_grad_scale = scale / divisor if grad_into_weight else None
        with set_gradient_sync(module, parallelism, enabled=index == len(pieces) - 1):
            with precision.autocast(device):
                summed = module(**batch, weight_grad_scale=weight_grad_scale)
            if index >= real:
                summed = summed * 0.0
            loss = summed / divisor
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += summed.detach()
    return StepResult(loss_sum, step_tokens, sum(input_tokens(p) for p in pieces[:real]), real)
