"""Instruction-Following Difficulty (IFD, Cherry LLM: Li et al. 2024, "From Quantity to Quality").

    IFD = mean loss of the response given the instruction / mean loss of the response alone

Both losses are sftlab's training loss (`sftlab.train.loss`), computed the way training computes
it, per row:

- conditioned: the conversation rendered with the template (default `alpaca`) and tokenized with
  the project's masking (`tokenize_rendered`): the trained tokens are every assistant turn plus
  its end token (EOS for alpaca), each predicted from everything before it (system prompt,
  instruction, input, earlier turns).
- alone: `Conversation((Message("text", response, trained=True),))`, i.e. the response text
  (assistant turns joined by a blank line) followed by EOS, every token trained, rendered by the
  same template (a `text` message is its content + EOS in every template). Each token is
  predicted from the response tokens before it; the first token has no context and is not
  scored unless the tokenizer adds a BOS (SmolLM2 does not).

The mean is the summed token cross-entropy divided by the number of scored tokens. Both
sequences are truncated to `max_length` tokens. IFD > 1 means the instruction makes the
response *harder* to predict: the pair is likely misaligned (Cherry LLM drops those before
ranking). Rows without an instruction (the `text` format) or whose response was truncated away
get no score (None).
"""

from __future__ import annotations

from dataclasses import dataclass

IFD_BATCH = 8
IFD_MAX_LENGTH = 512


@dataclass(frozen=True)
class IFDScore:
    ifd: float
    conditioned_loss: float
    alone_loss: float
    conditioned_tokens: int
    alone_tokens: int


def per_row_loss_sum(model, batch, chunk_size: int = 1024):
    """(summed trained-token cross-entropy per row, trained tokens per row): `token_loss_sum` split by row.

    Built on `trained_hidden_states`, which selects the trained positions row by row (row-major),
    so the position -> row map is the row index of each selected label.
    """
    import torch
    import torch.nn.functional as F

    from sftlab.data.tokenize import IGNORE_INDEX
    from sftlab.train.loss import trained_hidden_states, unwrap_model

    hidden, targets = trained_hidden_states(model, batch)
    selected = batch["labels"][:, 1:] != IGNORE_INDEX
    row_of = selected.nonzero()[:, 0]
    lm = unwrap_model(model)
    weight = lm.get_output_embeddings().weight
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    losses = []
    for start in range(0, targets.numel(), chunk_size):
        logits = F.linear(hidden[start : start + chunk_size], weight).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        losses.append(F.cross_entropy(logits, targets[start : start + chunk_size], reduction="none"))
    rows = batch["labels"].shape[0]
    sums = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    if losses:
        sums.index_add_(0, row_of, torch.cat(losses))
    return sums, selected.sum(dim=1)


def response_alone(conversation):
    """The 'response alone' conversation of the module docstring."""
    from sftlab.data.formats import Conversation, Message
    from sftlab.quality.rows import split_conversation

    _, response = split_conversation(conversation)
    return Conversation((Message("text", response, trained=True),), conversation.source)


def _examples(conversations, template, tokenizer, max_length):
    """Each conversation's whole rendering (a row the template cannot render is not scored: None)."""
    from sftlab.data.prepare import ROW_TEMPLATE_ERRORS
    from sftlab.data.tokenize import Example, tokenize_rendered

    out = []
    for start in range(0, len(conversations), 256):
        chunk = conversations[start : start + 256]
        rendered = []
        for c in chunk:
            try:
                rendered.append(template.render(c, "assistant").views[0])
            except ROW_TEMPLATE_ERRORS:
                rendered.append(None)
        texts = [(r, c.source) for r, c in zip(rendered, chunk) if r is not None]
        results = iter(tokenize_rendered(tokenizer, [r for r, _ in texts], [s for _, s in texts], max_length))
        out += [None if r is None else (lambda e: e if isinstance(e, Example) else None)(next(results)) for r in rendered]
    return out


def _mean_losses(model, examples, pad_id, batch_size, device) -> list[tuple[float, int] | None]:
    import torch

    from sftlab.data.batching import collate

    out: list[tuple[float, int] | None] = [None] * len(examples)
    order = sorted((i for i, e in enumerate(examples) if e is not None), key=lambda i: -len(examples[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chosen], pad_id).items()}
        from sftlab import precision

        with precision.autocast(device):
            sums, counts = per_row_loss_sum(model, batch)
        for i, s, n in zip(chosen, sums.tolist(), counts.tolist()):
            out[i] = (s / n, int(n)) if n else None
    return out


def compute_ifd(conversations, model: str | None = None, *, lm=None, tokenizer=None, template: str = "alpaca",
                max_length: int = IFD_MAX_LENGTH, batch_size: int = IFD_BATCH, device: str = "auto",
                progress=None) -> list[IFDScore | None]:
    """IFD of each conversation with `model` (registry name, HF folder or run directory), or with an
    already loaded `lm` + `tokenizer`. No gradients; batches sorted by length."""
    import torch

    from sftlab.data.templates import get_template
    from sftlab.models.loading import load_causal_lm, load_tokenizer, pick_device

    target = torch.device(pick_device(device)) if lm is None else next(lm.parameters()).device
    if lm is None:
        path = resolve_run(model)
        tokenizer = tokenizer or load_tokenizer(path)
        lm = load_causal_lm(path, target)
    was_training = lm.training
    lm.eval()
    chat = get_template(template, tokenizer)
    scored = [i for i, c in enumerate(conversations)
              if any(m.role == "assistant" for m in c.messages) and any(m.role == "user" for m in c.messages)]
    conditioned = _examples([conversations[i] for i in scored], chat, tokenizer, max_length)
    alone = _examples([response_alone(conversations[i]) for i in scored], chat, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        cond_losses = _mean_losses(lm, conditioned, pad_id, batch_size, target)
        if progress:
            progress(0.5)
        alone_losses = _mean_losses(lm, alone, pad_id, batch_size, target)
    lm.train(was_training)
    out: list[IFDScore | None] = [None] * len(conversations)
    for i, c, a in zip(scored, cond_losses, alone_losses):
        if c is not None and a is not None and a[0] > 0:
            out[i] = IFDScore(c[0] / a[0], c[0], a[0], c[1], a[1])
    return out


def resolve_run(model: str) -> str:
    """A run directory or checkpoint -> the folder holding the model; anything else unchanged."""
    from sftlab.models.loading import find_checkpoint

    checkpoint = find_checkpoint(model)
    return str(checkpoint) if checkpoint is not None else model
