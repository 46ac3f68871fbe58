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


class LocalBackend:
    """A model in this process (registry name, run directory or HF folder) completing raw
    prompts on sftlab's generation engine (`sftlab.infer.engine.BatchEngine`, the one `serve`
    uses): batch_size rows at a time, each request with its own seed, presence penalty as
    OpenAI defines it, stop strings cut, and EOS ending a row."""

    def __init__(self, model_or_run: str, batch_size: int = 8, device=None):
        from sftlab.infer.engine import context_length
        from sftlab.models.loading import load_for_inference

        self.source = str(model_or_run)
        self.model, self.tokenizer, self.info = load_for_inference(self.source, device)
        self.batch_size = batch_size
        self.context = context_length(self.model, self.tokenizer)

    def describe(self) -> str:
        return f"local {self.source}"

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        from sftlab.infer.engine import BatchEngine, SamplingParams

        tokenizer = self.tokenizer
        ids = [list(tokenizer(r.prompt, add_special_tokens=True)["input_ids"]) for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        todo = []
        for i, prompt in enumerate(ids):
            if len(prompt) >= self.context:
                results[i] = Completion("", None, error=f"the prompt has {len(prompt)} tokens; "
                                                        f"the model's context is {self.context}")
            else:
                todo.append(i)
        stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        with BatchEngine.for_tokenizer(self.model, tokenizer, stop_ids, max_batch_size=self.batch_size,
                                       batch_window_ms=0.0, context=self.context) as engine:
            for stop in {requests[i].stop for i in todo}:  # one stop list per call (the engine cuts at it)
                group = [i for i in todo if requests[i].stop == stop]
                params = [SamplingParams(max_tokens=requests[i].max_tokens, temperature=requests[i].temperature,
                                         top_p=max(requests[i].top_p, 1e-6), seed=requests[i].seed,
                                         presence_penalty=requests[i].presence_penalty) for i in group]
                for i, done in zip(group, engine.generate_all([ids[i] for i in group], params, tokenizer, stop)):
                    results[i] = (Completion(done.text, None, error=done.error) if done.error
                                  else Completion(done.text, done.finish_reason))
        return results  # type: ignore[return-value]
