"""Held-out response loss, perplexity on general text, and KL(base || tuned) — one loss function.

Every loss here goes through `sftlab.train.loss.evaluate_loss` (the training objective, chunked,
at trained positions only) on batches from `sftlab.data.batching.collate`:

- held-out loss: the run's validation examples, masked exactly as in training (prompt -100);
- perplexity on text: examples whose labels are their own ids, so every token but a chunk's
  first is a target.

KL reuses `trained_hidden_states` to pick the same positions, and runs the output layer chunk by
chunk, so the [tokens x vocabulary] logits of a whole batch never exist.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from sftlab import precision
from sftlab.data.tokenize import IGNORE_INDEX, Example
from sftlab.eval.errors import EvalError

# Neutral openings for the offline forgetting corpus: the base model continues them itself.
NEUTRAL_PROMPTS = (
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "In the early morning, the harbour was",
    "The rules of chess are simple to learn:",
    "Rivers shape the land around them by",
    "A good recipe for vegetable soup starts with",
    "The first computers were large machines that",
    "Many birds migrate south in the autumn because",
    "The town council met on Tuesday to discuss",
    "Honey bees live in colonies in which",
    "The Roman roads were built",
    "When water freezes, its molecules",
    "The museum's new exhibition shows",
    "Learning a second language is easier when",
    "The village market has been held every week since",
    "Mountains form when",
    "The old bridge across the river was",
    "Electric motors turn electrical energy into",
    "On the night of the storm, the lights",
    "A library card gives its holder",
    "The recipe calls for two cups of flour and",
    "Most of the Earth's surface is covered by",
    "The train left the station at noon and",
    "Good sleep matters because",
)


# -- examples ----------------------------------------------------------------------------------

def _as_training_config(config, sources: list):
    """A copy of the run config whose training data is `sources` (each taken whole, in order)."""
    whole = []
    for source in sources:
        update = {k: v for k, v in (("weight", 1.0), ("max_rows", None)) if k in type(source).model_fields}
        whole.append(source.model_copy(update=update))
    return config.model_copy(update={"data": whole, "eval_data": [], "val_fraction": 0.0})


def examples_of_sources(config, sources: list, tokenizer) -> list[Example]:
    """The examples of data sources, prepared by `prepare_data` with the run's settings (template,
    max_length, train_on, ...), so they are masked exactly as in training."""
    from sftlab.data.prepare import prepare_data
    from sftlab.data.readers import DataError

    try:
        return prepare_data(_as_training_config(config, sources), tokenizer).train
    except DataError as exc:
        if getattr(exc, "reason", None) == "empty":
            names = ", ".join(str(s.path) for s in sources)
            raise EvalError(f"{names}: no usable rows after preparation (all dropped; check the file)") from None
        raise


def heldout_examples(config, tokenizer, data: str | Path | None = None) -> tuple[list[Example], str]:
    """(validation examples, where they came from).

    `data` (an Alpaca or other supported data file) wins; otherwise the run's validation split
    from `prepare_data` (eval_data or val_fraction). No examples when the run has neither.
    """
    from sftlab.config import DataSource
    from sftlab.data.prepare import prepare_data
    from sftlab.data.readers import DataError

    if data is not None:
        if not Path(data).exists():
            raise EvalError(f"--data {data}: file not found")
        return examples_of_sources(config, [DataSource(path=str(data))], tokenizer), str(data)
    if not config.eval_data and config.val_fraction <= 0:
        return [], "none (the run has no eval_data or val_fraction; pass --data FILE)"
    where = ", ".join(s.path for s in config.eval_data) or f"val_fraction={config.val_fraction} of the training data"
    try:
        return prepare_data(config, tokenizer).val, where
    except (DataError, OSError):
        if not config.eval_data:
            raise
    # the training files have moved since the run: the eval files alone are enough
    return examples_of_sources(config, list(config.eval_data), tokenizer), where


def find_conversations(config, wanted: list[str], data: str | Path | None = None) -> dict:
    """{example source ("file:line" / "file[i]"): Conversation} for the wanted sources, read
    again from the data files (the held-out file, the eval files, then the training files)."""
    from sftlab.config import DataSource
    from sftlab.data.prepare import load_conversations

    sources = [DataSource(path=str(data))] if data is not None else list(config.eval_data) + list(config.data)
    wanted_set, found = set(wanted), {}
    for source in sources:
        if not any(w.startswith(str(source.path)) for w in wanted_set - set(found)):
            continue
        try:
            conversations = load_conversations(source, "skip")[0]
        except Exception:  # a moved or unreadable file: the side by side shows fewer rows
            continue
        found.update((c.source, c) for c in conversations if c.source in wanted_set)
        if len(found) == len(wanted_set):
            break
    return found


def prompt_of(conversation) -> tuple[str, str] | None:
    """(instruction, input) of a single-turn conversation, as `Generator.generate` takes them;
    None for multi-turn rows (the generator takes one instruction)."""
    prompt = conversation.prompt_messages()
    users = [m.content for m in prompt if m.role == "user"]
    if len(users) != 1:
        return None
    return users[0], "\n\n".join(m.content for m in prompt if m.role == "input")


def response_loss(model, examples: list[Example], pad_id: int, device: torch.device,
                  batch_size: int = 8, chunk_size: int = 1024) -> dict:
    """{'loss', 'perplexity', 'tokens'}: the training objective on held-out examples."""
    from sftlab.train.loss import evaluate_loss

    from sftlab.train.batches import EvalBatches

    return evaluate_loss(model, EvalBatches(examples, batch_size, pad_id), device, chunk_size)


# -- general text ------------------------------------------------------------------------------

def read_corpus(path: str | Path) -> list[str]:
    """A .txt file (paragraphs split at blank lines) or a .jsonl/.json file with a "text" field."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: corpus file not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else [data]
        else:
            from sftlab.data.readers import json_lines

            rows = [row for _, row in json_lines(path, EvalError)]
        texts = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalError(f"{path}: row {index + 1} has no string field 'text'")
            if row["text"].strip():
                texts.append(row["text"])
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not texts:
        raise EvalError(f"{path}: the corpus holds no text")
    return texts


def text_examples(texts: list[str], tokenizer, block_size: int = 256, max_chunks: int | None = None) -> list[Example]:
    """Texts -> chunks of at most block_size tokens whose every token (but the first) is a target.

    Each text is tokenized on its own (with the tokenizer's special tokens, e.g. a BOS) and cut
    into consecutive blocks; chunks shorter than 2 tokens carry no target and are skipped.
    """
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), block_size):
            chunk = tuple(ids[start: start + block_size])
            if len(chunk) >= 2:
                examples.append(Example(chunk, chunk, source=f"text[{len(examples)}]"))
            if max_chunks is not None and len(examples) >= max_chunks:
                return examples
    return examples


def text_perplexity(model, examples: list[Example], pad_id: int, device: torch.device,
                    batch_size: int = 8, chunk_size: int = 1024) -> dict:
    """{'loss', 'perplexity', 'tokens'} of a model on text chunks (all tokens are targets)."""
    return response_loss(model, examples, pad_id, device, batch_size, chunk_size)


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 96, seed: int = 0,
                         batch_size: int = 8) -> list[str]:
    """prompt + the model's own continuation, sampled at temperature 1 from the full distribution.

    Pure sampling (no top-k / top-p) makes the texts a sample of the base model's distribution,
    so the tuned model's perplexity on them relative to the base's estimates exp(KL) on
    generic text. Seeded; the texts are stored in the report, so the numbers can be recomputed.
    """
    from sftlab.infer.engine import BatchEngine, SamplingParams

    ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed + i)
              for i in range(len(prompts))]
    with BatchEngine.for_tokenizer(model, tokenizer, {tokenizer.eos_token_id} - {None}, max_batch_size=batch_size,
                                   batch_window_ms=0.0) as engine:
        done = engine.generate_all(ids, params, tokenizer)
    return [p + d.text for p, d in zip(prompts, done)]


def neutral_prompts(n: int, seed: int = 0) -> list[str]:
    """n of the neutral openings, in a seeded order (cycling when n exceeds the list)."""
    order = list(NEUTRAL_PROMPTS)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


# -- KL(base || tuned) ---------------------------------------------------------------------------

def _logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under a peft wrapper
    logits = F.linear(hidden, inner.get_output_embeddings().weight).float()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def mean_kl(base, tuned, batches: list[dict[str, torch.Tensor]], device: torch.device, chunk_size: int = 256) -> dict:
    """Mean per-token KL(base || tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v)).

    Computed at every position that has a next token (both models see the same ids). Split
    into positions whose next token is a response token (labels != -100) and the rest (the
    prompt; for plain text every position is 'response'). Natural log (nats).
    """
    import torch.nn.functional as F

    from sftlab.train.loss import trained_hidden_states

    sums = {"all": 0.0, "prompt": 0.0, "response": 0.0}
    counts = {"all": 0, "prompt": 0, "response": 0}
    modes = [(m, m.training) for m in (base, tuned)]
    for m, _ in modes:
        m.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            every = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            all_positions = {**batch, "labels": every}
            with precision.autocast(device):
                hidden_base, _ = trained_hidden_states(base, all_positions)
                hidden_tuned, _ = trained_hidden_states(tuned, all_positions)
            selected = every[:, 1:] != IGNORE_INDEX
            is_response = (batch["labels"][:, 1:] != IGNORE_INDEX)[selected]
            for start in range(0, hidden_base.shape[0], chunk_size):
                log_p = F.log_softmax(_logits(base, hidden_base[start: start + chunk_size]), dim=-1)
                log_q = F.log_softmax(_logits(tuned, hidden_tuned[start: start + chunk_size]), dim=-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
                response = is_response[start: start + chunk_size]
                sums["all"] += float(kl.sum())
                sums["response"] += float(kl[response].sum())
                sums["prompt"] += float(kl[~response].sum())
                counts["all"] += int(kl.numel())
                counts["response"] += int(response.sum())
                counts["prompt"] += int((~response).sum())
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return {
        "kl": sums["all"] / counts["all"] if counts["all"] else None,
        "kl_response": sums["response"] / counts["response"] if counts["response"] else None,
        "kl_prompt": sums["prompt"] / counts["prompt"] if counts["prompt"] else None,
        "tokens": counts["all"],
        "response_tokens": counts["response"],
        "prompt_tokens": counts["prompt"],
    }


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """KL and per-token comparisons need both models to read the same token ids."""
    return len(tokenizer_a) == len(tokenizer_b) and tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
