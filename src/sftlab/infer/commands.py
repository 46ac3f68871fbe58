"""CLI verbs of the inference stage: `sftlab serve` and `sftlab chat` (registered by sftlab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.errors import SftlabError

MODEL_HELP = "run directory, checkpoint folder, registry name or HF model folder"
TEMPLATE_HELP = "template for a plain model (a run uses its own); default alpaca"
THREADS_HELP = "torch CPU threads (default: torch's choice; 1 is often faster on a busy, shared CPU)"


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load_errors() -> tuple[type[BaseException], ...]:
    # a path that is neither a model folder nor reachable on the hub fails inside transformers
    return (OSError, ValueError)


def serve_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port to listen on"),
    api_key: Optional[str] = typer.Option(
        None, help="require 'Authorization: Bearer KEY' (default: env SFTLAB_API_KEY; unset = open)"),
    model_name: Optional[str] = typer.Option(None, help="the name clients pass as `model` (default: MODEL as given)"),
    template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP),
    max_batch_size: int = typer.Option(8, min=1, help="most requests decoded together in one batch"),
    batch_window_ms: float = typer.Option(20.0, min=0.0, help="how long to wait for more requests to batch"),
    log_level: str = typer.Option("info", help="uvicorn log level (warning, info, debug)"),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="without an API key: another name clients may address this server by "
                                   "(repeatable; loopback names on loopback, --host elsewhere, are always allowed)"),
    cors_origin: list[str] = typer.Option(
        [], "--cors-origin", help="a browser origin (e.g. http://localhost:3000) whose pages may call this server "
                                  "(repeatable; other origins are refused when there is no API key)"),
    max_request_mb: float = typer.Option(8.0, min=0.001, help="largest request body, in MB"),
    read_timeout: float = typer.Option(30.0, min=0.1, help="seconds a client has to send a request's head, and "
                                                           "again its body"),
    max_json_depth: int = typer.Option(64, min=2, help="deepest JSON nesting of a request body"),
    max_prompt_tokens: Optional[int] = typer.Option(None, min=1, help="longest prompt in tokens (default: the "
                                                                      "model's context)"),
) -> None:
    """Serve a run with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

    Concurrent requests are batched on the model; chat messages use the run's own template.
    Without an API key it is a local server: requests must address an allowed host name, and
    browser pages of other origins are refused (--cors-origin lets one in).

    Client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")

    Example: sftlab serve runs/demo --port 8000 --api-key secret
    """
    from sftlab.http_guard import timed_http_protocol
    from sftlab.infer.server import SHUTDOWN_GRACE_S, create_app
    from sftlab.terminal import console, fail

    _set_threads(threads)
    try:
        app = create_app(model, api_key=api_key, model_name=model_name, template=template,
                         max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, host=host, port=port,
                         allowed_hosts=allowed_host, cors_origins=cors_origin, max_request_mb=max_request_mb,
                         read_timeout_s=read_timeout, max_json_depth=max_json_depth,
                         max_prompt_tokens=max_prompt_tokens)
    except SftlabError:
        raise  # its own clean message (the command is guarded)
    except _load_errors() as exc:
        fail(f"cannot load '{model}': {exc}")
    import uvicorn

    name = app.state.model_name
    keyed = "an API key" if (api_key or _env_key()) else "no API key"
    console.print(f"serving [bold]{name}[/] (template {app.state.inference.template_name}, {keyed}) at "
                  f"http://{host}:{port}/v1", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                    http=timed_http_protocol(read_timeout))
    except (OSError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            return
        fail(f"cannot serve on {host}:{port}: {exc}")

def chat_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, help="system prompt (change it later with /system TEXT)"),
    max_new_tokens: int = typer.Option(256, min=1, help="longest reply in tokens"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="nucleus sampling threshold (temperature > 0)"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    tools: Optional[Path] = typer.Option(None, help="a JSON file with an OpenAI `tools` list to offer the model; "
                                                    "each call it makes asks you for the tool's result"),
    show_reasoning: bool = typer.Option(True, "--show-reasoning/--hide-reasoning",
                                        help="show the model's reasoning (<think>) apart from its answer"),
) -> None:
    """Chat with a run in the terminal, tokens streamed, in the template it trained with.

    Commands: /reset, /system TEXT, /save FILE (OpenAI messages JSON), /help, /exit.

    Reads lines from stdin when it is not a terminal, so a conversation can be piped in. With
    --tools, a reply that calls tools lists the calls and asks for each result (`tool NAME>`),
    then the model continues.

    Example: sftlab chat runs/agent --tools examples/data/agent_tools.json
    """
    from sftlab.infer.chat import ChatSession, run_chat
    from sftlab.terminal import fail

    _set_threads(threads)
    offered = _read_tools(tools) if tools is not None else ()
    try:
        session = ChatSession.load(model, template, system=system, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, tools=offered,
                                   show_reasoning=show_reasoning)
    except SftlabError:
        raise  # its own clean message (the command is guarded)
    except _load_errors() as exc:
        fail(f"cannot load '{model}': {exc}")
    try:
        run_chat(session)
    finally:
        session.inference.engine.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("chat")(chat_cmd)


def _env_key() -> str | None:
    import os

    from sftlab.infer.server import API_KEY_ENV

    return os.environ.get(API_KEY_ENV) or None


def _read_tools(path: Path) -> tuple:
    """An OpenAI `tools` list (or {"tools": [...]}) from a JSON file, checked like a request's."""
    import json

    from sftlab.data.formats import parse_tools
    from sftlab.data.readers import DataError
    from sftlab.terminal import fail

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"--tools {path}: cannot read a JSON tools list: {exc}")
    try:
        return parse_tools(value.get("tools") if isinstance(value, dict) else value, str(path))
    except DataError as exc:
        fail(f"--tools {path}: {exc}")
