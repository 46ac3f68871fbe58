"""The SFT loss: summed cross-entropy over trained tokens, computed chunk by chunk.

Only trained positions go through the output layer, and they go in chunks, so the
[tokens x vocabulary] logits never exist for the whole batch: with Gemma's 262k vocabulary they
would be the largest tensor of the step (Cut Cross-Entropy reports 24 GB -> 1 MB for Gemma 2).
Two ways to get the gradients (``loss_impl``):

- ``fused`` (default): each chunk's gradients are computed in the forward pass, while its
  logits exist (softmax - one-hot, then two matmuls); backward only scales them. No logits are
  recomputed, at the cost of one weight-sized gradient buffer (the idea of Liger Kernel's fused
  linear cross-entropy).
- ``chunked``: each chunk is checkpointed and its logits recomputed in backward: the least
  memory, one extra output-layer forward on trained positions.

The function returns the *sum* and the trained-token count: the loop divides by the count
of the whole optimizer step (all micro-batches), so gradient accumulation gives the same
loss and gradients as one big batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftlab import precision
from sftlab.data.tokenize import IGNORE_INDEX


def unwrap_model(model):
    """The plain transformers model under a peft wrapper (its layers already hold the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                    scale: float = 1.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


# What a family's head does after hidden @ weight.T: (config attribute, how it scales the logits)
LOGIT_SCALES = (("logits_scaling", lambda v: 1.0 / v),  # Granite: logits / logits_scaling
                ("logit_scale", lambda v: v),  # Cohere / Command-R: logits * logit_scale
                ("output_multiplier", lambda v: v))


@dataclass(frozen=True)
class Head:
    """The model's output layer and what it does to the logits, as its forward does:
    logits = softcap(scale * (hidden @ weight.T + bias))."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def describe(self) -> str:
        parts = [f"scale {self.scale:g}"] if self.scale != 1.0 else []
        parts += [f"soft-cap {self.softcap:g}"] if self.softcap else []
        parts += ["bias"] if self.bias is not None else []
        return ", ".join(parts) or "plain"


def output_head(model) -> Head:
    """The head of a (peft-wrapped) causal LM, found through its documented accessors and config."""
    lm = unwrap_model(model)
    layer = lm.get_output_embeddings()
    configs = [lm.config] + ([lm.config.get_text_config()] if hasattr(lm.config, "get_text_config") else [])
    scale, softcap = 1.0, None
    for config in configs:
        for name, to_scale in LOGIT_SCALES:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and value not in (0, 1) and scale == 1.0:
                scale = float(to_scale(value))
        softcap = softcap or getattr(config, "final_logit_softcapping", None)
    return Head(layer.weight, getattr(layer, "bias", None), scale, softcap)


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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), gradients computed chunk by chunk in forward.

    weight_grad_scale: when the caller knows the factor its backward will bring (the loop's
    1 / trained tokens of the step), the weight's gradient times that factor is added straight
    into ``weight.grad`` during forward, so no weight-sized buffer lives until backward (670 MB
    for Gemma 3's output layer). Backward then checks the factor was the promised one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap, weight_grad_scale=None, scale: float = 1.0):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight, alpha = None, 1.0
        ctx.weight_grad_scale = None
        if ctx.needs_input_grad[1]:
            if weight_grad_scale is None:
                grad_weight = torch.zeros_like(weight)
            else:
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                grad_weight, alpha, ctx.weight_grad_scale = weight.grad, weight_grad_scale, weight_grad_scale
        # matmuls in the autocast dtype when autocast is on (bf16 on CUDA), else in the weight's
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        w = weight.to(dtype)
        loss_dtype = torch.promote_types(dtype, torch.float32)  # softmax in fp32 at least
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, targets.numel(), chunk_size):
                h, t = hidden[start : start + chunk_size].to(dtype), targets[start : start + chunk_size]
                # one [chunk x vocabulary] buffer (two with a softcap): softmax and its gradient are
                # computed in place of the logits (torch.logsumexp would allocate another)
                logits = F.linear(h, w).to(loss_dtype)
                if scale != 1.0:  # Granite, Cohere: the head scales its logits
                    logits.mul_(scale)
                if softcap:
                    capped = torch.tanh(logits.div_(softcap))
                    logits = torch.mul(capped, softcap, out=logits)
                rows = torch.arange(t.numel(), device=t.device)
                picked = logits[rows, t]
                top = logits.amax(dim=-1, keepdim=True)
                grad = logits.sub_(top).exp_()
                sums = grad.sum(dim=-1)
                total += (sums.log() + top.squeeze(-1) - picked).sum()
                grad.div_(sums[:, None])  # softmax
                grad[rows, t] -= 1
                if softcap:
                    grad.mul_(1 - capped * capped)
                    del capped
                if scale != 1.0:
                    grad.mul_(scale)
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad @ w
                if grad_weight is not None:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad.T, h, alpha=alpha)
                    else:
                        grad_weight.add_(grad.T @ h, alpha=alpha)
                del logits, grad
        ctx.grads = (grad_hidden, None if ctx.weight_grad_scale is not None else grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # in place and once: no second weight-sized buffer
        expected = ctx.weight_grad_scale
        # checked on CPU only: on CUDA reading grad_output would stall the step on a sync
        if expected is not None and grad_output.device.type == "cpu" and not math.isclose(
            float(grad_output), expected, rel_tol=1e-5
        ):
            raise RuntimeError(
                f"fused loss: the weight gradient was applied in forward for an upstream factor of {expected}, "
                f"but backward brought {float(grad_output)}; call token_loss_sum without weight_grad_scale"
            )
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


LOGITS_PER_CHUNK = 1 << 26  # 64M fp32 logits = 256 MB: 1,365 positions for SmolLM2, 256 for Gemma 3


def auto_chunk_size(vocab_size: int) -> int:
    return max(64, min(4096, LOGITS_PER_CHUNK // vocab_size))


def token_loss_sum(
    model, batch: dict[str, torch.Tensor], chunk_size: int = 0, impl: str = "fused",
    weight_grad_scale: float | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropy over trained tokens, number of trained tokens).

    chunk_size: trained positions per chunk (0 = auto from the vocabulary size);
    impl: "fused" (gradients in forward) or "chunked" (logits recomputed in backward);
    weight_grad_scale (fused only): the factor the caller's backward will multiply the sum by;
    the output layer's gradient then goes straight into its .grad (see the fused function)."""
    if impl == "model":
        return model_loss_sum(model, batch)
    if impl not in ("fused", "chunked"):
        raise ValueError(f"unknown loss_impl {impl!r}: use 'fused', 'chunked' or 'model'")
    hidden, targets = trained_hidden_states(model, batch)
    head = output_head(model)
    weight = head.weight
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    fused = impl == "fused" and head.bias is None  # a head with a bias goes through autograd (chunked)
    if fused and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, head.softcap, weight_grad_scale,
                                               head.scale)
        return total, int(targets.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, head.softcap, head.scale, head.bias,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t, head.softcap, head.scale, head.bias)
    return total, int(targets.numel())


def model_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of the model's own forward (its own head and logits, all positions
    at once): what the fused loss is checked against, and `loss_impl: model`."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    logits = model(**kwargs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, int((targets != IGNORE_INDEX).sum())


class LossMismatchError(RuntimeError):
    pass


def check_loss_against_model(model, batch: dict[str, torch.Tensor], impl: str, rel_tol: float) -> dict:
    """sftlab's loss against the model's own forward on one batch (a few rows): LossMismatchError
    naming both, and what the head does, when they differ by more than `rel_tol`."""
    with torch.no_grad():
        ours, count = token_loss_sum(model, batch, impl=impl if impl != "model" else "chunked")
        theirs, _ = model_loss_sum(model, batch)
    ours, theirs = float(ours) / max(count, 1), float(theirs) / max(count, 1)
    difference = abs(ours - theirs) / max(abs(theirs), 1e-12)
    head = output_head(model)
    if difference > rel_tol:
        raise LossMismatchError(
            f"the {impl} loss ({ours:.6f}) differs from {type(unwrap_model(model)).__name__}'s own forward "
            f"({theirs:.6f}) by {difference:.2%} on the first rows (head: {head.describe()}): its head does something "
            "sftlab does not reproduce; train with `loss_impl: model` (the model's own head and logits)")
    return {"ours": ours, "model": theirs, "relative_difference": difference, "head": head.describe()}


@torch.no_grad()
def evaluate_loss(model, batches, device: torch.device, chunk_size: int = 0) -> dict:
    """Mean per-token response loss over batches (token-weighted, as in training)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast(device):
            s, n = token_loss_sum(model, batch, chunk_size)
        loss_sum += float(s)
        tokens += n
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))), "tokens": tokens}
