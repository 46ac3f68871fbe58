"""A batched decode loop shared by `sftlab serve` and `sftlab chat`.

Requests are submitted from any thread. One background worker collects the requests that arrive
within a short window (`batch_window_ms`, up to `max_batch_size` rows), left-pads them into one
batch and decodes token by token on the model's forward with a KV cache (`DynamicCache`). Each
row has its own sampling parameters (temperature, top_p, seed, penalties) and its own output
callback, so concurrent HTTP requests share forward passes. A row leaves the batch (and the
cache) as soon as it hits a stop token, its token budget or is cancelled. Requests that arrive
while a batch is decoding join it at the next step (their prompts are prefilled, and their
cache rows are left-padded onto the running cache), for models whose cache layers are all
plain full-attention layers; other models (sliding-window layers) wait for the next batch.

Positions are computed from the attention mask, so a left-padded row sees exactly the positions
it would see alone; a test checks that batched greedy answers equal the one-at-a-time answers.
"""

from __future__ import annotations

import inspect
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from sftlab.data.formats import Conversation, Message

log = logging.getLogger("sftlab.infer")

DEFAULT_CONTEXT = 2048  # when the model config names no max_position_embeddings
MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows: such a request decodes greedily


# ---------------------------------------------------------------------------------------------
# prompts


def render_chat_prompt(template, messages: list[tuple[str, str]] | list[Message], tools=()) -> str:
    """The prompt text for a chat: the template's render_prompt over the whole conversation so far.

    The conversation gets an empty assistant turn appended, the response the model is about to
    write: render_prompt renders everything before the final assistant turn, exactly as the
    training prompt was rendered (so a multi-turn history is never cut at an earlier reply).
    Raises the template's TemplateError when it cannot render the messages.
    """
    items = [m if isinstance(m, Message) else Message(m[0], m[1]) for m in messages]
    return template.render_prompt(Conversation(tuple(items) + (Message("assistant", ""),), tools=tuple(tools)))


def template_errors() -> tuple[type[BaseException], ...]:
    """What a template raises for messages it cannot format: sftlab's TemplateError, or a Jinja
    chat template's own error (e.g. its raise_exception for an unsupported role order)."""
    from sftlab.data.templates import TemplateError

    try:
        from jinja2 import TemplateError as JinjaError
    except ImportError:  # pragma: no cover
        return (TemplateError,)
    return (TemplateError, JinjaError)


def context_length(model, tokenizer=None) -> int:
    """The model's context window: max_position_embeddings (tokenizer's model_max_length as fallback)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else DEFAULT_CONTEXT


def stop_tokens(tokenizer, model=None, template=None) -> tuple[set[int], list[str]]:
    """(token ids that end a response, stop strings).

    The tokenizer's EOS (what the templates train the model to emit), the model's generation
    config EOS, and the template's `end_token` when it has one: an id when it is one token,
    otherwise a stop string.
    """
    ids: set[int] = set()
    strings: list[str] = []

    def add(value) -> None:
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0:
                ids.add(v)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for end_token in getattr(template, "end_tokens", ()) or ():  # every token that closes a trained turn
        encoded = tokenizer.encode(end_token, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
        elif end_token not in strings:
            strings.append(end_token)
    return ids, strings


# ---------------------------------------------------------------------------------------------
# requests and events


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Done:
    reason: str  # "stop" (a stop token) | "length" (max_tokens or the context) | "cancelled"
    completion_tokens: int  # generated tokens, the stop token included


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Generated:
    """A finished completion: its text, why it ended ("stop" | "length" | "error"), its tokens."""

    text: str
    finish_reason: str
    completion_tokens: int
    error: str | None = None


Event = Token | Done | Failed


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the worker thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


# ---------------------------------------------------------------------------------------------
# incremental detokenization with stop strings


class TextStream:
    """Token ids -> text deltas, never emitting a stop string or half a UTF-8 character.

    The whole generated sequence is decoded at each token (without clean-up of spaces, so the
    text only grows at its end); text that could be the start of a stop string is held back
    until it is known not to be one. After `stopped` the text is final: cut before the stop.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), keep: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False
        self._full = ""
        # special tokens kept in the text (a tool-call marker such as Mistral's [TOOL_CALLS]); the others are skipped
        self._drop = [t for t in getattr(tokenizer, "all_special_tokens", []) if t not in keep] if keep else None

    def _decode(self) -> str:
        if self._drop is None:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for token in self._drop:
            text = text.replace(token, "")
        return text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        full = self._decode()
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        self._full = full
        if self.stop:
            start = max(0, len(self.text) - max(map(len, self.stop)))
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(min(hits))
            held = max((k for s in self.stop for k in range(min(len(s) - 1, len(full)), 0, -1)
                        if full.endswith(s[:k])), default=0)
            return self._emit(len(full) - held)
        return self._emit(len(full))

    def finish(self) -> str:
        """At the end of generation: the text still held back (a stop string's unfinished prefix)."""
        if self.stopped:
            return ""
        full = self._decode()
        return self._emit(len(full), full)

    def _emit(self, end: int, full: str | None = None) -> str:
        full = self._full if full is None else full
        delta = full[len(self.text) : max(end, len(self.text))]
        self.text += delta
        return delta


# ---------------------------------------------------------------------------------------------
# the batching engine


class _Row:
    __slots__ = ("request", "generator", "generated", "counts", "budget")

    def __init__(self, request: GenerationRequest, device: torch.device, context: int):
        self.request = request
        self.generated = 0
        self.budget = max(0, min(request.params.max_tokens, context - len(request.prompt_ids)))
        self.counts: dict[int, int] = {}
        self.generator = None
        if request.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if request.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.params.seed % 2**64)  # any integer is a seed


class BatchEngine:
    """Serve generation requests from many threads with batched forward passes on one model."""

    def __init__(
        self,
        model,
        pad_token_id: int,
        stop_token_ids: set[int],
        max_batch_size: int = 8,
        batch_window_ms: float = 20.0,
        context: int | None = None,
        continuous: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.pad_token_id = pad_token_id
        self.stop_token_ids = set(stop_token_ids)
        self.max_batch_size = max_batch_size
        self.batch_window = max(0.0, batch_window_ms) / 1000
        self.context = context or context_length(model)
        self.continuous = continuous  # requests may join a running batch (full-attention caches only)
        self.device = next(model.parameters()).device
        # transformers renamed past_key_values to cache (5.2x); older releases know only the first
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "cancelled": 0, "batches": 0, "joined_rows": 0, "forward_passes": 0,
                       "rows_decoded": 0, "max_batch_rows": 0, "generated_tokens": 0, "busy_seconds": 0.0}

    @classmethod
    def for_tokenizer(cls, model, tokenizer, stop_token_ids: set[int], **options) -> BatchEngine:
        """An engine padding with the tokenizer's pad token (its EOS when it has none)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, pad if pad is not None else 0, stop_token_ids, **options)

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._closing.clear()
                self._thread = threading.Thread(target=self._work, name="sftlab-batch-engine", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: rows still decoding end as cancelled, queued requests are dropped."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._closing.set()
            self._pending.put(None)
            thread.join(timeout)
        while True:  # nobody will decode what is still queued: tell its callers
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _safe_emit(item, Failed("the engine was closed"))

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        with self._lock:
            self._stats["requests"] += 1
        self.start()
        self._pending.put(request)
        return request

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Event]:
        """Submit one request and yield its events on this thread; closing the iterator cancels it."""
        events: queue.Queue[Event] = queue.Queue()
        request = self.submit(GenerationRequest(list(prompt_ids), params, events.put))
        try:
            while True:
                event = events.get()
                yield event
                if not isinstance(event, Token):
                    return
        finally:
            request.cancel()

    def generate_all(self, prompts: list[list[int]], params: list[SamplingParams], tokenizer,
                     stop: list[str] | tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> list[Generated]:
        """Every prompt's completion, decoded (special tokens skipped, cut before a stop string);
        blocks until all are done. The engine decodes them max_batch_size rows at a time, and a
        row leaves the batch as soon as it ends. What `generate`, `eval` and the local
        self-instruct backend use; `serve` and `chat` stream the same engine's events."""
        results: list[Generated | None] = [None] * len(prompts)
        finished = threading.Semaphore(0)

        def collector(index: int, stream: TextStream):
            def emit(event: Event) -> None:  # on the worker thread
                if results[index] is not None:
                    return
                if isinstance(event, Token):
                    stream.push(event.id)
                    if not stream.stopped:
                        return
                    requests[index].cancel()  # a stop string: the row leaves the batch
                    results[index] = Generated(stream.text, "stop", len(stream.ids))
                elif isinstance(event, Done):
                    stream.finish()
                    results[index] = Generated(stream.text, "length" if event.reason == "length" else "stop",
                                               event.completion_tokens)
                else:
                    results[index] = Generated(stream.text, "error", len(stream.ids), event.message)
                finished.release()

            return emit

        requests = [GenerationRequest(list(ids), p, lambda event: None) for ids, p in zip(prompts, params)]
        for index, request in enumerate(requests):
            request.emit = collector(index, TextStream(tokenizer, stop, keep))
        if any(not r.prompt_ids for r in requests):
            raise ValueError("the prompt is empty")
        with self._lock:
            self._stats["requests"] += len(requests)
        for request in requests:  # all queued before the worker looks: the first batch is a full one
            self._pending.put(request)
        self.start()
        for _ in requests:
            finished.acquire()
        return results  # type: ignore[return-value]

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._stats)
        stats.update(max_batch_size=self.max_batch_size, batch_window_ms=self.batch_window * 1000,
                     queued=self._pending.qsize())
        stats["busy_seconds"] = round(stats["busy_seconds"], 3)
        return stats

    # -- worker ------------------------------------------------------------------------------

    def _collect(self, first: GenerationRequest) -> tuple[list[GenerationRequest], bool]:
        batch, closing = [first], False
        deadline = time.monotonic() + self.batch_window
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._pending.get(timeout=remaining) if remaining > 0 else self._pending.get_nowait()
            except queue.Empty:
                break
            if item is None:
                closing = True
                break
            batch.append(item)
        live = [r for r in batch if not r.cancelled.is_set()]
        if len(live) < len(batch):  # cancelled while queued: never decoded
            with self._lock:
                self._stats["cancelled"] += len(batch) - len(live)
        return live, closing

    def _work(self) -> None:
        while True:
            first = self._pending.get()
            if first is None or self._closing.is_set():
                if first is not None:
                    _safe_emit(first, Failed("the server is shutting down"))
                return
            batch, closing = self._collect(first)
            if batch:
                started = time.perf_counter()
                live: list[GenerationRequest] = list(batch)  # _run adds the requests that join the batch
                try:
                    self._run(batch, live)
                except Exception as exc:  # never leave a caller waiting; the traceback goes to the log
                    log.exception("generation failed")
                    for request in live:  # every row of the batch, those that joined it too
                        _safe_emit(request, Failed(f"generation failed: {type(exc).__name__}"))
                with self._lock:
                    self._stats["busy_seconds"] += time.perf_counter() - started
            if closing:
                return

    def _prefill(self, batch: list[GenerationRequest]):
        """Left-pad the prompts into one batch and run it: (rows, cache, mask, last positions, logits)."""
        from transformers import DynamicCache

        device = self.device
        rows = [_Row(r, device, self.context) for r in batch]
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):
            input_ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, width - len(request.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a padded row sees the positions it would see alone
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        with self._lock:
            self._stats["rows_decoded"] += len(batch)
        return rows, cache, mask, positions[:, -1], logits

    def _take(self, limit: int) -> list[GenerationRequest]:
        """Requests already waiting (no waiting for more), at most `limit`."""
        taken: list[GenerationRequest] = []
        while len(taken) < limit:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is None:  # close(): leave the sentinel for the worker loop
                self._pending.put(None)
                break
            if item.cancelled.is_set():
                with self._lock:
                    self._stats["cancelled"] += 1
                continue
            taken.append(item)
        return taken

    @torch.no_grad()
    def _run(self, batch: list[GenerationRequest], live: list[GenerationRequest] | None = None) -> None:
        """Decode `batch` (and requests that join it) to the end; `live` collects every request
        taken in, so a failure can end them all."""
        live = live if live is not None else list(batch)
        device = self.device
        rows, cache, mask, last_positions, logits = self._prefill(batch)
        with self._lock:
            self._stats["batches"] += 1
        while True:
            # continuous batching: requests that arrived meanwhile join the running batch
            if (self.continuous and len(rows) < self.max_batch_size and not self._pending.empty()
                    and _plain_cache(cache)):
                newcomers = self._take(self.max_batch_size - len(rows))
                live += newcomers
                if newcomers:
                    new_rows, new_cache, new_mask, new_positions, new_logits = self._prefill(newcomers)
                    mask = _join_cache(cache, mask, new_cache, new_mask)
                    rows += new_rows
                    last_positions = torch.cat([last_positions, new_positions])
                    logits = torch.cat([logits, new_logits])
                    with self._lock:
                        self._stats["joined_rows"] += len(new_rows)
            with self._lock:
                self._stats["max_batch_rows"] = max(self._stats["max_batch_rows"], len(rows))

            next_ids = self._sample(logits, rows)
            keep: list[int] = []
            step_tokens = cancelled = 0
            for i, (row, token) in enumerate(zip(rows, next_ids)):
                request = row.request
                if token is None:  # this row's sampling failed: it ends alone, the others go on
                    _safe_emit(request, Failed("sampling failed for this request (its logits are not finite)"))
                    continue
                if request.cancelled.is_set() or self._closing.is_set():
                    _safe_emit(request, Done("cancelled", row.generated))
                    cancelled += 1
                    continue
                if row.budget <= 0:
                    _safe_emit(request, Done("length", row.generated))
                    continue
                row.generated += 1
                step_tokens += 1
                if token in self.stop_token_ids:
                    _safe_emit(request, Done("stop", row.generated))
                    continue
                _safe_emit(request, Token(token))
                row.counts[token] = row.counts.get(token, 0) + 1
                if row.generated >= row.budget:
                    _safe_emit(request, Done("length", row.generated))
                    continue
                keep.append(i)
            with self._lock:
                self._stats["generated_tokens"] += step_tokens
                self._stats["cancelled"] += cancelled
            if not keep:
                if self.continuous and not self._pending.empty():
                    # the batch emptied while others wait: start them as a new batch right away
                    newcomers = self._take(self.max_batch_size)
                    live[:] = newcomers
                    if newcomers:
                        rows, cache, mask, last_positions, logits = self._prefill(newcomers)
                        with self._lock:
                            self._stats["batches"] += 1
                        continue
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(index)
                mask, last_positions = mask[index], last_positions[index]
                rows = [rows[i] for i in keep]
                next_ids = [next_ids[i] for i in keep]
                if _plain_cache(cache):
                    mask = _trim_padding(cache, mask)
            tokens = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            last_positions = last_positions + 1
            logits = self._forward(tokens, mask, last_positions[:, None], cache)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         **{self._cache_argument: cache}, use_cache=True, logits_to_keep=1)
        with self._lock:
            self._stats["forward_passes"] += 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """One token per row: argmax for greedy rows, else temperature + top-p with the row's
        generator. A row whose sampling fails gets None (it ends alone); top_p 0 keeps the most
        likely token, as OpenAI's does, and a temperature too small to divide by is greedy."""
        for i, row in enumerate(rows):
            p = row.request.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            if (p.presence_penalty or p.frequency_penalty) and row.counts:
                ids = torch.tensor(list(row.counts), dtype=torch.long, device=logits.device)
                counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
                logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts
        finite = torch.isfinite(logits).any(dim=-1).tolist()
        chosen: list[int | None] = [c if ok else None for c, ok in zip(logits.argmax(dim=-1).tolist(), finite)]
        for i, row in enumerate(rows):
            p = row.request.params
            if p.temperature < MIN_TEMPERATURE or chosen[i] is None:
                continue
            try:
                probs = torch.softmax(logits[i] / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    cumulative = sorted_probs.cumsum(-1)
                    drop = (cumulative - sorted_probs) >= p.top_p  # keep the smallest nucleus >= top_p
                    drop[0] = False  # and always the most likely token (top_p 0: greedy)
                    sorted_probs[drop] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
                chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
            except RuntimeError:  # a distribution multinomial refuses (NaN or inf probabilities)
                log.warning("sampling failed for one request; it ends, the batch goes on", exc_info=True)
                chosen[i] = None
        return chosen


def _plain_cache(cache) -> bool:
    """Only plain full-attention layers can be joined and trimmed (not sliding-window ones)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _join_cache(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (both right-aligned, left-padded to one length); the joint mask."""
    length = max(mask.shape[1], other_mask.shape[1])
    for layer, new in zip(cache.layers, other.layers):
        layer.keys = torch.cat([_left_pad(layer.keys, length, -2), _left_pad(new.keys, length, -2)])
        layer.values = torch.cat([_left_pad(layer.values, length, -2), _left_pad(new.values, length, -2)])
    return torch.cat([_left_pad(mask, length, 1), _left_pad(other_mask, length, 1)])


def _trim_padding(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (left behind by rows that finished)."""
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
    return mask[:, start:]


def _safe_emit(request: GenerationRequest, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # a consumer that went away (closed event loop) must not stop the batch
        request.cancel()


# ---------------------------------------------------------------------------------------------
# a loaded model, ready to serve


@dataclass
class InferenceModel:
    """Model + tokenizer + the run's template + the batching engine: what serve and chat share."""

    model: object
    tokenizer: object
    template: object
    template_name: str
    engine: BatchEngine
    context: int
    stop_strings: list[str]
    run_info: dict
    source: str
    tool_parser: str = "none"  # how the model writes tool calls (sftlab.infer.tools): the run's, or the template's
    _templates: dict = field(default_factory=dict, repr=False)

    def template_for(self, kwargs: dict | None):
        """The run's template with these chat_template_kwargs over the run's own (one per setting, kept)."""
        if not kwargs:
            return self.template
        from sftlab.data.templates import TemplateError, run_template

        if self.template_name in ("alpaca", "chatml"):
            raise TemplateError(f"chat_template_kwargs ({', '.join(kwargs)}): the built-in '{self.template_name}' "
                                "template reads none")

        merged = {**(self.run_info.get("template_kwargs") or {}), **kwargs}
        key = json.dumps(merged, sort_keys=True, default=str)
        if key not in self._templates:
            self._templates[key] = run_template({**self.run_info, "template_kwargs": merged}, self.tokenizer,
                                                self.template_name)
        return self._templates[key]

    @classmethod
    def load(
        cls,
        model_or_run: str,
        template: str | None = None,
        max_batch_size: int = 8,
        batch_window_ms: float = 20.0,
        device: torch.device | None = None,
    ) -> "InferenceModel":
        """A run directory uses its saved template; a plain model uses `template` (default alpaca)."""
        from sftlab.models.loading import load_for_inference

        model, tokenizer, info = load_for_inference(model_or_run, device)
        return cls.from_model(model, tokenizer, template or info.get("template", "alpaca"), info,
                              str(model_or_run), max_batch_size, batch_window_ms)

    @classmethod
    def from_model(cls, model, tokenizer, template_name: str, run_info: dict | None = None, source: str = "",
                   max_batch_size: int = 8, batch_window_ms: float = 20.0) -> "InferenceModel":
        """`run_info` (sftlab.json) gives the template's kwargs and special-token mode."""
        from sftlab.data.templates import run_template

        template = run_template(run_info or {}, tokenizer, template_name)
        ids, strings = stop_tokens(tokenizer, model, template)
        context = context_length(model, tokenizer)
        engine = BatchEngine.for_tokenizer(model, tokenizer, ids, max_batch_size=max_batch_size,
                                           batch_window_ms=batch_window_ms, context=context)
        from sftlab.infer.tools import choose_parser

        info = run_info or {}
        parser = info.get("tool_parser") if info.get("tool_parser") not in (None, "auto") else choose_parser(template)
        return cls(model, tokenizer, template, template_name, engine, context, strings, info, source, parser)

    def chat_prompt(self, messages, tools=(), template=None) -> str:
        return render_chat_prompt(template or self.template, messages, tools)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, tokenized as training tokenized it (special tokens added the same way;
        control-token text the template marked stays text)."""
        from sftlab.data.tokenize import encode_ids

        return encode_ids(self.tokenizer, text)
