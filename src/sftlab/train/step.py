"""One optimizer step's forward and backward passes: pieces under a token budget, exact loss.

A step trains on `batch_size x gradient_accumulation_steps` units (examples, or packed rows).
Each micro-batch is cut into pieces of at most `budget` padded tokens (``split_by_tokens``),
and every piece's summed token loss is divided by the trained-token count of the *whole step*
before its backward, so the accumulated gradient is the gradient of the step's mean token
loss, however the step was cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sftlab.data.batching import split_by_tokens
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.train.loss import token_loss_sum


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed token loss of the step (a device tensor: read it at log time)
    trained_tokens: int
    input_tokens: int  # non-padding tokens
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


def forward_backward(model, pieces: list[dict], device: torch.device, loss_chunk_size: int = 0,
                     loss_impl: str = "fused") -> StepResult:
    """Accumulate the gradient of the step's mean token loss over its pieces into `.grad`."""
    step_tokens = sum(trained_tokens(p) for p in pieces)
    divisor = max(step_tokens, 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    for piece in pieces:
        batch = {k: v.to(device, non_blocking=True) for k, v in piece.items() if k != "num_tokens"}
        with autocast:
            summed, _ = token_loss_sum(model, batch, loss_chunk_size, loss_impl, weight_grad_scale=1 / divisor)
        (summed / divisor).backward()
        loss_sum += summed.detach()
    return StepResult(loss_sum, step_tokens, sum(input_tokens(p) for p in pieces), len(pieces))
