"""Where completions come from: any OpenAI-compatible endpoint, or a model loaded in-process.

A backend has one method, `complete(requests) -> completions` (same order, same length).
A request that still fails after the retries comes back as a Completion with `error` set, so
the pipeline logs it and goes on; only errors no retry can fix (a wrong key, an unknown model)
raise SelfInstructError.

    backend = OpenAIBackend("http://127.0.0.1:8000/v1", model="tiny", concurrency=4)
    backend = LocalBackend("smollm2-135m-instruct", batch_size=8)
    backend.complete([Request("Come up with a series of tasks:\\n1. ...\\n9.", max_tokens=256)])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sftlab.selfinstruct.seeds import SelfInstructError


@dataclass(frozen=True)
class Request:
    """One raw-text completion request. temperature 0 means greedy."""

    prompt: str
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.5
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # "stop" | "length" (cut by max_tokens); None when error is set
    error: str | None = None


class Backend(Protocol):
    def describe(self) -> str: ...

    def complete(self, requests: Sequence[Request]) -> list[Completion]: ...


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


@dataclass
class OpenAIBackend:
    """The official openai client on the completions endpoint (chat completions with chat=True).

    Requests run `concurrency` at a time (asyncio). The client retries 408/409/429/5xx,
    connection errors and timeouts `max_retries` times with exponential back-off and jitter;
    `timeout` is per request in seconds. A parameter the server rejects (presence_penalty,
    seed, ...) is dropped from later requests rather than failing the run.
    """

    api_base: str
    model: str | None = None
    api_key: str | None = None
    chat: bool = False
    concurrency: int = 4
    max_retries: int = 5
    timeout: float = 120.0
    dropped_params: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SelfInstructError("--concurrency must be at least 1")
        self.api_key = self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def describe(self) -> str:
        return f"{self.api_base} ({'chat' if self.chat else 'completions'}) model {self.model}"

    def _client(self, asynchronous: bool):
        import openai

        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(base_url=self.api_base, api_key=self.api_key, max_retries=self.max_retries, timeout=self.timeout)

    def resolve_model(self) -> str:
        """The model name: as given, or the first one the server lists."""
        if self.model:
            return self.model
        import openai

        try:
            with self._client(asynchronous=False) as client:
                models = client.models.list().data
        except openai.APIError as exc:
            raise SelfInstructError(f"cannot list the models of {self.api_base} (give --model): {exc}") from None
        if not models:
            raise SelfInstructError(f"{self.api_base} lists no models; give --model")
        self.model = models[0].id
        return self.model

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        import asyncio

        self.resolve_model()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(self._complete_all(list(requests)))
        from concurrent.futures import ThreadPoolExecutor  # called from async code (a notebook): own thread

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._complete_all(list(requests))).result()

    async def _complete_all(self, requests: list[Request]) -> list[Completion]:
        import asyncio

        semaphore = asyncio.Semaphore(self.concurrency)
        async with self._client(asynchronous=True) as client:
            async def one(request: Request) -> Completion:
                async with semaphore:
                    return await self._one(client, request)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _arguments(self, request: Request) -> dict:
        args = {"model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
                "top_p": request.top_p}
        if request.presence_penalty:
            args["presence_penalty"] = request.presence_penalty
        if request.stop:
            args["stop"] = list(request.stop)[:4]  # OpenAI takes at most 4
        if request.seed is not None:
            args["seed"] = request.seed
        for name in self.dropped_params:
            args.pop(name, None)
        if self.chat:
            args["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            args["prompt"] = request.prompt
        return args

    async def _one(self, client, request: Request) -> Completion:
        import openai

        for _ in range(4):  # at most a few unsupported parameters to drop
            try:
                if self.chat:
                    response = await client.chat.completions.create(**self._arguments(request))
                    choice = response.choices[0]
                    return Completion(choice.message.content or "", choice.finish_reason)
                response = await client.completions.create(**self._arguments(request))
                choice = response.choices[0]
                return Completion(choice.text or "", choice.finish_reason)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                raise SelfInstructError(f"{self.api_base}: {exc.status_code} {_message(exc)}") from None
            except openai.BadRequestError as exc:
                param = (exc.param or "").split("[")[0]
                optional = {"presence_penalty", "seed", "stop", "top_p"}
                if param in optional and param not in self.dropped_params:
                    self.dropped_params.add(param)
                    continue
                return Completion("", None, error=f"400 {_message(exc)}")
            except openai.APIStatusError as exc:  # retries exhausted on 429 / 5xx
                return Completion("", None, error=f"{exc.status_code} {_message(exc)}")
            except openai.APIConnectionError as exc:  # also timeouts, after the retries
                return Completion("", None, error=f"{type(exc).__name__}: {exc}")
            except openai.APIError as exc:
                return Completion("", None, error=f"{type(exc).__name__}: {exc}")
        return Completion("", None, error="the server rejected every optional parameter")


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return getattr(exc, "message", None) or str(exc)


# ---------------------------------------------------------------------------------------------
# in-process model


class _PresencePenalty:
    """OpenAI's presence penalty: subtract `penalty` from every token already in the completion."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty, self.prompt_length = penalty, prompt_length

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


class LocalBackend:
    """A model in this process (registry name, run directory or HF folder), HF generate on raw prompts.

    Requests with the same sampling settings are generated together, batch_size rows at a time
    (left-padded). Sampling is seeded with the batch's first request seed, so a run is
    reproducible. Presence penalty is applied as OpenAI defines it.
    """

    def __init__(self, model_or_run: str, batch_size: int = 8, device=None):
        from sftlab.models.loading import load_for_inference

        self.source = str(model_or_run)
        self.model, self.tokenizer, self.info = load_for_inference(self.source, device)
        self.batch_size = batch_size
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or 2048

    def describe(self) -> str:
        return f"local {self.source}"

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, r.temperature, r.top_p, r.presence_penalty, r.stop), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                for i, completion in zip(batch, self._generate([requests[i] for i in batch])):
                    results[i] = completion
        return results  # type: ignore[return-value]

    def _generate(self, requests: list[Request]) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        tokenizer, first = self.tokenizer, requests[0]
        previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            encoded = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = previous_side
        prompt_length = encoded["input_ids"].shape[1]
        room = self.context - prompt_length
        if room <= 0:
            message = f"the prompt has {prompt_length} tokens; the model's context is {self.context}"
            return [Completion("", None, error=message) for _ in requests]
        max_new = min(first.max_tokens, room)
        device = next(self.model.parameters()).device
        if first.seed is not None:
            torch.manual_seed(first.seed)
        sampling = ({"do_sample": True, "temperature": first.temperature, "top_p": max(first.top_p, 1e-6)}
                    if first.temperature > 0 else {"do_sample": False})
        processors = LogitsProcessorList()
        if first.presence_penalty:
            processors.append(_PresencePenalty(first.presence_penalty, prompt_length))
        extra = {"stop_strings": list(first.stop), "tokenizer": tokenizer} if first.stop else {}
        with torch.no_grad():
            output = self.model.generate(
                **encoded.to(device), max_new_tokens=max_new, logits_processor=processors,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling, **extra)
        completions = []
        stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        for row in output[:, prompt_length:].tolist():
            ended = next((k for k, t in enumerate(row) if t in stop_ids), None)
            tokens = row if ended is None else row[:ended]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in first.stop if s in text), default=-1)
            if cut >= 0:
                completions.append(Completion(text[:cut], "stop"))
            elif ended is not None or len(tokens) < max_new:
                completions.append(Completion(text, "stop"))
            else:
                completions.append(Completion(text, "length"))
        return completions
