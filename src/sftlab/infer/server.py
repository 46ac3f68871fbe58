"""`sftlab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a run or a model.

    GET  /v1/models                 the served model (plus context length and template)
    POST /v1/chat/completions       chat, formatted with the run's own template
    POST /v1/completions            raw text completion (no template)
    GET  /sftlab/stats              batching counters (requests, batches, forward passes)
    POST /sftlab/render             the exact prompt text a chat request is given to the model
    GET  /health                    readiness (no API key needed)

Concurrent requests share forward passes: see `sftlab.infer.engine.BatchEngine`. Errors are
OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`), never a stack trace.

Every request is checked before it joins a batch, so no request can fail another: its body
(size, read time, JSON nesting, valid Unicode: sftlab.http_guard), its fields and sampling
(degenerate but legal settings such as top_p 0 or a huge seed work as OpenAI's do), its prompt
length. Rendering and tokenizing run off the event loop. Without an API key the server is a
local one: every request's Host must be an allowed name and a browser page of another origin
cannot use it (unless --cors-origin lets it in); see docs/serve-chat.md#security.

    from sftlab.infer.server import create_app, serve, serve_in_background
    app = create_app("runs/demo", api_key="secret")       # a FastAPI app
    serve("runs/demo", port=8000)                        # blocks
    with serve_in_background("runs/demo") as server:     # a thread, a free port
        print(server.base_url)                           # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sftlab.data.formats import Conversation, Message, parse_message, parse_tools
from sftlab.data.readers import DataError
from sftlab.errors import SftlabError
from sftlab.http_guard import (MAX_JSON_DEPTH, MAX_REQUEST_MB, READ_TIMEOUT_S, Guard, GuardError, parse_json,
                               read_body)
from sftlab.infer.engine import (Done, GenerationRequest, InferenceModel, SamplingParams, TextStream, Token,
                                 template_errors)

log = logging.getLogger("sftlab.infer")

API_KEY_ENV = "SFTLAB_API_KEY"
MAX_N = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_SPACE = 2**64  # torch generators take seeds below this; larger ones are reduced modulo it
PARSE_IN_THREAD_BYTES = 64 << 10  # bodies above this are parsed off the event loop
SHUTDOWN_GRACE_S = 5  # on Ctrl-C / SIGTERM, requests still generating after this are cut off


class APIError(SftlabError):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class _EngineFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# request parsing: every invalid field is a 400 that names the field


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name,
                       code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {type(value).__name__}", param=name, code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", param=name, code="invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {type(value).__name__}", param=name, code="invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    return [s for s in value if s]


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "'logit_bias' must be an object mapping token ids to biases", param="logit_bias",
                       code="invalid_type")
    bias: dict[int, float] = {}
    for key, b in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(400, f"'logit_bias' key {key!r} is not a token id", param="logit_bias",
                           code="invalid_value") from None
        if not 0 <= token < vocab_size:
            raise APIError(400, f"'logit_bias' token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                           param="logit_bias", code="invalid_value")
        bias[token] = _number({"logit_bias": b}, "logit_bias", 0.0, -100, 100)
    return bias or None


def _unsupported(body: dict, *names: str) -> None:
    for name in names:
        value = body.get(name)
        if value not in (None, False, [], 0) and not (name == "best_of" and value == 1):
            raise APIError(400, f"'{name}' is not supported by sftlab serve", param=name, code="unsupported_parameter")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                       code="invalid_value")
    return _boolean(options, "include_usage")


def parse_messages(value: Any) -> list[Message]:
    """OpenAI chat messages -> Messages, read as training reads them (tool calls with their
    arguments as objects, tool results, reasoning_content, text parts joined): the same text at
    every stage. A malformed message is a 400 that names it."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages",
                       code="invalid_type" if not isinstance(value, list) else "empty_array")
    messages: list[Message] = []
    for i, message in enumerate(value):
        try:
            messages += parse_message(message, f"messages[{i}]")
        except DataError as exc:
            raise APIError(400, str(exc), param=f"messages[{i}]", code="invalid_value") from None
    return messages


def _tool_settings(body: dict) -> tuple[tuple, Any, bool]:
    """(tools, tool_choice, parallel_tool_calls) of a chat request, checked."""
    raw = body.get("tools") if body.get("tools") is not None else body.get("functions")
    try:
        tools = parse_tools(raw, "tools") if raw not in (None, []) else ()
    except DataError as exc:
        raise APIError(400, str(exc).replace("tools: ", "", 1), param="tools", code="invalid_value") from None
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is None:
        choice = "auto" if tools else "none"
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not isinstance(name, str):
            raise APIError(400, "'tool_choice' as an object is {'type': 'function', 'function': {'name': ...}}",
                           param="tool_choice", code="invalid_value")
        if name not in names:
            raise APIError(400, f"'tool_choice' names {name!r}, which is not among the tools given", param="tool_choice",
                           code="invalid_value")
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "'tool_choice' must be auto, none, required or a named function", param="tool_choice",
                       code="invalid_value")
    elif choice == "required" and not tools:
        raise APIError(400, "'tool_choice' is required but no tools are given", param="tool_choice", code="invalid_value")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls", code="invalid_type")
    return tools, choice, parallel is not False


@dataclass
class _ChatPrompt:
    """A chat request rendered: the prompt text and how its reply is read back."""

    prompt: str
    parser: object  # sftlab.infer.tools parser
    names: set[str] | None  # the functions offered
    prefix: str = ""  # a forced call's opening, written after the generation prompt (tool_choice)
    parallel: bool = True


# ---------------------------------------------------------------------------------------------
# one HTTP request's generations (n choices, or several prompts), consumed on the event loop


class _Job:
    def __init__(self, inference: InferenceModel, prompts: list[list[int]], params: list[SamplingParams],
                 stop: list[str], keep: tuple[str, ...] = ()):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(inference.tokenizer, stop + inference.stop_strings, keep) for _ in prompts]
        self.completion_tokens = [0] * len(prompts)
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.requests = [
            inference.engine.submit(GenerationRequest(ids, p, partial(self._emit, loop, i)))
            for i, (ids, p) in enumerate(zip(prompts, params))
        ]

    def _emit(self, loop: asyncio.AbstractEventLoop, index: int, event) -> None:  # on the worker thread
        loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self):
        """Yield (choice index, text delta, finish_reason or None) until every choice has finished."""
        remaining = set(range(len(self.requests)))
        while remaining:
            index, event = await self.queue.get()
            if index not in remaining:
                continue
            stream = self.streams[index]
            if isinstance(event, Token):
                self.completion_tokens[index] += 1
                delta = stream.push(event.id)
                if stream.stopped:  # a stop string: cut, and free the row
                    self.requests[index].cancel()
                    remaining.discard(index)
                    self.finish_reasons[index] = "stop"
                    yield index, delta, "stop"
                elif delta:
                    yield index, delta, None
            elif isinstance(event, Done):
                self.completion_tokens[index] = event.completion_tokens
                remaining.discard(index)
                self.finish_reasons[index] = "length" if event.reason == "length" else "stop"
                yield index, stream.finish(), self.finish_reasons[index]
            else:
                self.cancel()
                raise _EngineFailed(event.message)

    async def run(self, request: Request | None = None) -> list[str]:
        """Every choice's final text. A client that hangs up stops the generation (its rows leave the batch)."""

        async def consume() -> None:
            async for _ in self.events():
                pass

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    break
                if request is not None and await request.is_disconnected():
                    task.cancel()
                    break
        finally:
            self.cancel()
        return [s.text for s in self.streams]


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# the app


class _Service:
    """What every route of an app shares: the loaded model, the names it answers to, the key."""

    def __init__(self, inference: InferenceModel, name: str, accepted_names: set[str], api_key: str | None,
                 limits: dict | None = None):
        self.inference, self.name, self.accepted_names, self.api_key = inference, name, accepted_names, api_key
        limits = limits or {}
        self.max_request_bytes = int(limits.get("max_request_mb", MAX_REQUEST_MB) * 2**20)
        self.read_timeout_s = limits.get("read_timeout_s", READ_TIMEOUT_S)
        self.max_json_depth = limits.get("max_json_depth", MAX_JSON_DEPTH)
        self.max_prompt_tokens = limits.get("max_prompt_tokens")
        self.created = int(time.time())
        # the logits' width: token ids and logit_bias keys are checked against it
        self.vocab_size = getattr(inference.model.config, "vocab_size", None) or len(inference.tokenizer)

    def check_model(self, body: dict) -> str:
        requested = body.get("model")
        if requested is None:
            raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
        if not isinstance(requested, str):
            raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
        if requested not in self.accepted_names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{self.name}`.",
                           param="model", code="model_not_found")
        return self.name

    def model_card(self) -> dict:
        inference = self.inference
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "sftlab",
                "max_model_len": inference.context, "template": inference.template_name,
                "sftlab": {"source": inference.source, "run_info": inference.run_info,
                           "max_batch_size": inference.engine.max_batch_size}}

    def sampling(self, body: dict, prompt_tokens: int, default_max: int | None, chat: bool) -> tuple[list[SamplingParams], int]:
        """The request's sampling settings, one per choice (n), checked against the context."""
        context, what = self.inference.context, "messages" if chat else "prompt"
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise APIError(400, f"your {what} resulted in {prompt_tokens} tokens, over this server's limit of "
                           f"{self.max_prompt_tokens} (--max-prompt-tokens)", param=what, code="context_length_exceeded")
        if prompt_tokens >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your {what} "
                           f"resulted in {prompt_tokens} tokens. Please reduce the length.", param=what,
                           code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, key, low=1)
        room = context - prompt_tokens
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif prompt_tokens + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
                           "completion). Please reduce the length.", param=key, code="context_length_exceeded")
        n = _integer(body, "n", 1, MAX_N) or 1
        seed = _integer(body, "seed")
        base = dict(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            logit_bias=_logit_bias(body, self.vocab_size),
        )
        # with a seed, choice j samples with seed + j: reproducible, yet the n choices differ; any integer is a
        # seed (a huge or negative one is reduced modulo 2**64, deterministically)
        return [SamplingParams(seed=None if seed is None else (seed + j) % SEED_SPACE, **base) for j in range(n)], n

    def render(self, body: dict) -> str:
        """A chat request's prompt text in the served model's template."""
        return self.chat(body).prompt

    def chat(self, body: dict) -> _ChatPrompt:
        """A chat request's messages, tools and settings in the served model's template, as training
        rendered them: the prompt, and how to read the reply's tool calls back."""
        from sftlab.infer.tools import forced_prefix, parser_for

        messages = parse_messages(body.get("messages"))
        tools, choice, parallel = _tool_settings(body)
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs",
                           code="invalid_type")
        try:
            template = self.inference.template_for(kwargs)
        except SftlabError as exc:
            raise APIError(400, str(exc), param="chat_template_kwargs", code="invalid_value") from None
        offered = tools if choice != "none" else ()
        try:
            template.check_shows(Conversation(tuple(messages), "the request", tools=offered))
            prompt = self.inference.chat_prompt(messages, offered, template)
        except DataError as exc:
            message = str(exc).replace("the request: the row has", "the request has")
            raise APIError(400, message, param="tools" if "tools" in message else "messages",
                           code="invalid_messages") from None
        except template_errors() as exc:
            raise APIError(400, f"the {self.inference.template_name} template cannot format these messages: {exc}",
                           param="messages", code="invalid_messages") from None
        parser_name = self.inference.tool_parser if offered else "none"
        prefix = forced_prefix(parser_name, choice) if choice == "required" or isinstance(choice, dict) else ""
        return _ChatPrompt(prompt + prefix, parser_for(parser_name), {t["function"]["name"] for t in offered} or None,
                           prefix, parallel)

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """A completion request's prompts as token ids: a string, strings, ids, or lists of ids."""
        prompt, encode = body.get("prompt"), self.inference.encode
        if isinstance(prompt, str):
            return [encode(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [encode(p) for p in prompt]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompt = [prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in prompt):
                if any(not 0 <= t < self.vocab_size for p in prompt for t in p):
                    raise APIError(400, f"'prompt' token ids must be in 0..{self.vocab_size - 1}", param="prompt",
                                   code="invalid_value")
                return [list(p) for p in prompt]
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                       "of token ids", param="prompt", code="invalid_type")


def _service(request: Request) -> _Service:
    return request.app.state.service


async def _authorize(request: Request) -> None:
    api_key = _service(request).api_key
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided." if header else
                       "Missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")


async def _read_body(request: Request) -> dict:
    """The JSON body, within the server's limits (size, read time, nesting, valid Unicode)."""
    svc = _service(request)
    raw = await read_body(request, svc.max_request_bytes, svc.read_timeout_s)
    if not raw:
        raise APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                       "aren't using your HTTP library correctly.)", code="invalid_json")
    if len(raw) > PARSE_IN_THREAD_BYTES:
        body = await asyncio.to_thread(parse_json, raw, svc.max_json_depth)
    else:
        body = parse_json(raw, svc.max_json_depth)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    return body


def _usage(prompt_tokens: int, job: _Job) -> dict:
    completion = sum(job.completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _finished_texts(job: _Job, request: Request) -> list[str]:
    try:
        return await job.run(request)
    except _EngineFailed as exc:
        raise APIError(500, f"generation failed: {exc}", type="server_error") from None


def _event_stream(job: _Job, opening: list[str], chunks, closing: Callable[[], dict] | None) -> StreamingResponse:
    """Server-sent events: `opening`, then `chunks(index, delta, finish)` for each piece of text
    as it is generated, then the usage chunk `closing()` (when asked for) and [DONE]."""

    async def events():
        try:
            for event in opening:
                yield event
            async for i, delta, finish in job.events():
                for event in chunks(i, delta, finish):
                    yield event
            if closing is not None:
                yield _sse(closing())
        except _EngineFailed as exc:
            yield _sse(APIError(500, f"generation failed: {exc}", type="server_error").body())
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- routes ------------------------------------------------------------------------------------

public = APIRouter()
v1 = APIRouter(dependencies=[Depends(_authorize)])  # /v1 and /sftlab: the API key when one is set


@public.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": _service(request).name}


@v1.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_service(request).model_card()]}


@v1.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    svc = _service(request)
    if model_id not in svc.accepted_names:
        raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{svc.name}`.",
                       param="model", code="model_not_found")
    return svc.model_card()


@v1.get("/sftlab/stats")
async def stats(request: Request):
    return _service(request).inference.engine.stats()


@v1.post("/sftlab/render")
async def render_route(request: Request):
    svc = _service(request)
    body = await _read_body(request)
    prompt = await asyncio.to_thread(svc.render, body)
    tokens = await asyncio.to_thread(svc.inference.encode, prompt)
    from sftlab.data.special import unmark

    return {"prompt": unmark(prompt), "prompt_tokens": len(tokens), "template": svc.inference.template_name}


def _check_chat_options(body: dict) -> None:
    _unsupported(body, "logprobs", "top_logprobs", "audio", "prediction")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")


@v1.post("/v1/chat/completions")
async def chat_completions(request: Request):
    svc, body = _service(request), await _read_body(request)
    model = svc.check_model(body)
    _check_chat_options(body)
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    stop = _stop(body)
    chat = await asyncio.to_thread(svc.chat, body)  # rendering and tokenizing never run on the event loop
    prompt_ids = await asyncio.to_thread(svc.inference.encode, chat.prompt)
    params, n = svc.sampling(body, len(prompt_ids), None, chat=True)
    job = _Job(svc.inference, [prompt_ids] * n, params, stop, chat.parser.special_markers)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model, "system_fingerprint": None}
    from sftlab.infer.tools import ReplyStream, parse_reply

    if not stream:
        texts = await _finished_texts(job, request)
        replies = [parse_reply(text, chat.parser, chat.names, prefix=chat.prefix, parallel=chat.parallel)
                   for text in texts]
        choices = [{"index": i, "message": reply.message(), "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else job.finish_reasons[i]}
                   for i, reply in enumerate(replies)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt_ids), job)}

    def chunk(index: int, delta: dict, finish: str | None) -> str:
        data = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return _sse({**data, "usage": None} if include_usage else data)

    readers = [ReplyStream(chat.parser, chat.names, prefix=chat.prefix, parallel=chat.parallel) for _ in range(n)]
    kinds = {"content": "content", "reasoning": "reasoning_content"}

    def chunks(index: int, delta: str, finish: str | None) -> list[str]:
        events = readers[index].push(delta) if delta else []
        out = [chunk(index, {kinds[kind]: text}, None) for kind, text in events]
        if finish:  # what was held back: the rest of the content, or the calls
            last, reply = readers[index].finish()
            out += [chunk(index, {kinds[kind]: text}, None) for kind, text in last]
            out += [chunk(index, {"tool_calls": [{"index": j, **call.openai_dict()}]}, None)
                    for j, call in enumerate(reply.tool_calls)]
            out.append(chunk(index, {}, "tool_calls" if reply.tool_calls else finish))
        return out

    closing = (lambda: {**head, "object": "chat.completion.chunk", "choices": [],
                        "usage": _usage(len(prompt_ids), job)}) if include_usage else None
    return _event_stream(job, [chunk(i, {"role": "assistant", "content": ""}, None) for i in range(n)], chunks, closing)


@v1.post("/v1/completions")
async def completions(request: Request):
    svc, body = _service(request), await _read_body(request)
    model = svc.check_model(body)
    _unsupported(body, "logprobs", "suffix", "best_of")
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    echo = _boolean(body, "echo")
    stop = _stop(body)
    prompts = await asyncio.to_thread(svc.completion_prompts, body)
    if any(not p for p in prompts):
        raise APIError(400, "'prompt' is empty (no tokens)", param="prompt", code="invalid_value")
    params, n = svc.sampling(body, max(map(len, prompts)), COMPLETIONS_DEFAULT_MAX_TOKENS, chat=False)
    if len(prompts) * n > MAX_N:
        raise APIError(400, f"at most {MAX_N} completions per request (prompts x n)", param="n", code="invalid_value")
    rows = [p for p in prompts for _ in range(n)]
    job = _Job(svc.inference, rows, [params[j] for _ in prompts for j in range(n)], stop)
    prompt_tokens = sum(map(len, prompts))
    echoed = [svc.inference.tokenizer.decode(p, skip_special_tokens=False) if echo else "" for p in rows]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None}
    if not stream:
        texts = await _finished_texts(job, request)
        choices = [{"index": i, "text": echoed[i] + text, "logprobs": None, "finish_reason": job.finish_reasons[i]}
                   for i, text in enumerate(texts)]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, job)}

    def chunk(index: int, text: str, finish: str | None) -> str:
        data = {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
        return _sse({**data, "usage": None} if include_usage else data)

    closing = (lambda: {**head, "choices": [], "usage": _usage(prompt_tokens, job)}) if include_usage else None
    return _event_stream(job, [chunk(i, text, None) for i, text in enumerate(echoed) if text],
                         lambda i, delta, finish: [chunk(i, delta, finish)] if delta or finish else [], closing)


# -- errors: OpenAI-style JSON, never a stack trace --------------------------------------------

async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _guard_error(request: Request, exc: GuardError):
    return APIError(exc.status, exc.message, code=exc.code).response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
    elif exc.status_code == 405:
        message, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return APIError(exc.status_code, message, code=code).response()


async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return APIError(500, "The server had an error while processing your request.", type="server_error").response()


def create_app(
    model_or_run: str | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    template: str | None = None,
    max_batch_size: int = 8,
    batch_window_ms: float = 20.0,
    inference: InferenceModel | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    allowed_hosts=(),
    cors_origins=(),
    max_request_mb: float = MAX_REQUEST_MB,
    read_timeout_s: float = READ_TIMEOUT_S,
    max_json_depth: int = MAX_JSON_DEPTH,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving a run directory, checkpoint, registry name or HF folder.

    api_key: when set (or env SFTLAB_API_KEY), every /v1 and /sftlab request needs
    `Authorization: Bearer KEY`. model_name: the name clients pass as `model` (default: the
    argument as given). template: for a plain model (a run uses its own; default alpaca).
    inference: an already loaded InferenceModel instead of model_or_run. host, port,
    allowed_hosts: the names requests may address when there is no API key; cors_origins: browser
    origins let in. The limits: body size, its read time, JSON nesting, prompt tokens.
    """
    owns_engine = inference is None  # an InferenceModel passed in is the caller's to close
    if inference is None:
        if model_or_run is None:
            raise ValueError("create_app needs model_or_run or inference")
        inference = InferenceModel.load(str(model_or_run), template, max_batch_size, batch_window_ms)
    name = model_name or str(model_or_run or inference.source).rstrip("/") or "sftlab"
    service = _Service(inference, name, {name, str(model_or_run or inference.source)},
                       api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
                       {"max_request_mb": max_request_mb, "read_timeout_s": read_timeout_s,
                        "max_json_depth": max_json_depth, "max_prompt_tokens": max_prompt_tokens})
    guard = Guard.for_binding(host, port, allowed_hosts, cors_origins)

    @asynccontextmanager
    async def shutdown(app_: FastAPI):
        yield
        if owns_engine:
            inference.engine.close()

    app = FastAPI(title="sftlab serve", version="1", lifespan=shutdown, docs_url=None, redoc_url=None)
    app.state.service, app.state.inference, app.state.model_name, app.state.guard = service, inference, name, guard

    @app.middleware("http")
    async def local_guard(request: Request, call_next):
        # a keyless server is a local one: DNS rebinding and other origins' pages are refused; with a key,
        # the key is the guard. A POST's body is JSON either way.
        try:
            if not service.api_key:
                guard.check(request.method, request.headers)
            elif request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip() != \
                    "application/json":
                raise GuardError(403, "send the request as Content-Type: application/json", "content_type")
        except GuardError as exc:
            return APIError(exc.status, exc.message, code=exc.code).response()
        return await call_next(request)

    if guard.cors_origins:  # browser clients on these origins opt in (preflight answered, CORS headers sent)
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sorted(guard.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(GuardError, _guard_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(public)
    app.include_router(v1)
    return app


# ---------------------------------------------------------------------------------------------
# running it


def serve(
    model_or_run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    template: str | None = None,
    max_batch_size: int = 8,
    batch_window_ms: float = 20.0,
    log_level: str = "info",
    **limits,
) -> None:
    """Load the model and serve it until interrupted (blocks); `limits` are create_app's."""
    import uvicorn

    from sftlab.http_guard import timed_http_protocol

    app = create_app(model_or_run, api_key=api_key, model_name=model_name, template=template,
                     max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, host=host, port=port, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                http=timed_http_protocol(limits.get("read_timeout_s", READ_TIMEOUT_S)))


class BackgroundServer:
    """A uvicorn server on its own thread (and its own socket, so port 0 picks a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        from sftlab.http_guard import timed_http_protocol

        guard = getattr(app.state, "guard", None)
        if guard is not None and guard.port is None:
            guard.port = self.port  # the Host check knows the port now
        head_timeout = getattr(getattr(app.state, "service", None), "read_timeout_s", READ_TIMEOUT_S)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                     http=timed_http_protocol(head_timeout),
                                                     timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="sftlab-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What the openai client takes: OpenAI(base_url=server.base_url, api_key=...)."""
        return self.url + "/v1"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(model_or_app, host: str = "127.0.0.1", port: int = 0, **create_kwargs) -> BackgroundServer:
    """Start a server on a thread; returns it started (use as a context manager to stop it)."""
    app = model_or_app if isinstance(model_or_app, FastAPI) else create_app(model_or_app, **create_kwargs)
    return BackgroundServer(app, host, port).start()
