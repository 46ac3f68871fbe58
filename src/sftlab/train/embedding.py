"""The input embedding's gradient, added row by row straight into ``weight.grad``.

PyTorch's embedding backward builds a dense [vocabulary x hidden] gradient (zeros, then an
index_add of the rows the batch used) and autograd then adds it into ``weight.grad``. For a
packed row of 512 tokens that is 512 useful rows in a 670 MB buffer for Gemma 3's 262k x 640
embedding: the largest transient of a full fine-tune's backward, and two wasted passes over
670 MB per micro-batch. ``add_embedding_grad_in_place`` makes the backward add those rows into
``weight.grad`` directly (``index_add_``), which gives the same gradient.

It applies to full fine-tunes in a single process only: the gradient bypasses autograd's
accumulation, so hooks that others hang on it (DDP/FSDP reducers) would not see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _EmbeddingGradIntoParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, input_ids, weight, scale: float, padding_idx):
        ctx.save_for_backward(input_ids)
        ctx.weight, ctx.scale, ctx.padding_idx = weight, scale, padding_idx
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        weight = ctx.weight
        ids = input_ids.reshape(-1)
        rows = grad_output.reshape(ids.numel(), -1)
        if ctx.padding_idx is not None:  # nn.Embedding never trains its padding row
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids, rows.to(weight.grad.dtype), alpha=ctx.scale)
        return None, None, None, None, None


def _scale_of(module: nn.Embedding) -> float | None:
    """The constant the module multiplies the looked-up rows by (Gemma scales by sqrt(hidden)),
    or None when its forward is not a plain (scaled) lookup."""
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        return None
    scale = float(getattr(module, "embed_scale", 1.0))  # a float or a one-element buffer
    probe = torch.arange(min(8, module.num_embeddings), device=module.weight.device)[None]
    with torch.no_grad():
        got = module(probe)
        expected = F.embedding(probe, module.weight, module.padding_idx) * scale
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-6):
        return None
    return scale


def add_embedding_grad_in_place(model) -> bool:
    """Hook the model's input embedding so its backward adds into ``weight.grad`` row by row.

    Returns False (and changes nothing) when the embedding is frozen or is not a plain lookup."""
    module = model.get_input_embeddings()
    if not isinstance(module, nn.Embedding) or not module.weight.requires_grad:
        return False
    scale = _scale_of(module)
    if scale is None:
        return False

    def hook(mod, args, kwargs, output):
        if not torch.is_grad_enabled() or not mod.weight.requires_grad:
            return None
        input_ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        return _EmbeddingGradIntoParam.apply(output.detach(), input_ids, mod.weight, scale, mod.padding_idx)

    module.register_forward_hook(hook, with_kwargs=True)
    return True
