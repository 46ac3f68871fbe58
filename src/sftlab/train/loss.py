"""The SFT loss: summed cross-entropy over trained tokens, computed chunk by chunk.

Only trained positions go through the output layer, and they go in chunks whose logits are
recomputed in backward (activation checkpointing per chunk), so the [tokens x vocabulary]
logits never exist for the whole batch: with Gemma's 262k vocabulary they would be the
largest tensor of the step (Cut Cross-Entropy reports 24 GB -> 1 MB for Gemma 2).

The function returns the *sum* and the trained-token count: the loop divides by the count
of the whole optimizer step (all micro-batches), so gradient accumulation gives the same
loss and gradients as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftlab.data.tokenize import IGNORE_INDEX


def unwrap_model(model):
    """The plain transformers model under a peft wrapper (its layers already hold the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def trained_hidden_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states at positions whose next token is trained, those next tokens)."""
    lm = unwrap_model(model)
    decoder = lm.get_decoder()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    hidden = decoder(**kwargs).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    return hidden[:, :-1][selected], targets[selected]


LOGITS_PER_CHUNK = 1 << 26  # 64M fp32 logits = 256 MB: 1,365 positions for SmolLM2, 256 for Gemma 3


def auto_chunk_size(vocab_size: int) -> int:
    return max(64, min(4096, LOGITS_PER_CHUNK // vocab_size))


def token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropy over trained tokens, number of trained tokens).

    chunk_size: trained positions per chunk (0 = auto from the vocabulary size)."""
    hidden, targets = trained_hidden_states(model, batch)
    lm = unwrap_model(model)
    weight = lm.get_output_embeddings().weight
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t, softcap)
    return total, int(targets.numel())


@torch.no_grad()
def evaluate_loss(model, batches, device: torch.device, chunk_size: int = 0) -> dict:
    """Mean per-token response loss over batches (token-weighted, as in training)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s, n = token_loss_sum(model, batch, chunk_size)
        loss_sum += float(s)
        tokens += n
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))), "tokens": tokens}
