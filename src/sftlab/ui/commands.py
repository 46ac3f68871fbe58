"""CLI verb `sftlab ui` (registered by sftlab.cli)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

import typer

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "SFTLAB_UI_TOKEN"


def ui_cmd(
    runs: Path = typer.Option(Path("runs"), "--runs", help="folder of runs to show (run folders up to 3 levels down)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but localhost requires a token"),
    port: int = typer.Option(7860, help="port to listen on"),
    token: Optional[str] = typer.Option(
        None, help=f"access token (default: env {TOKEN_ENV}; made up and printed when bound beyond localhost)"),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="another name the page may be opened under (a DNS name or address of this "
                                   "machine; repeatable); every request's Host must be one of the allowed names"),
    log_level: str = typer.Option("warning", help="uvicorn log level (warning, info, debug)"),
) -> None:
    """A local web dashboard: live training curves, data with trained tokens coloured, eval reports,
    a chat playground, and a form that writes a config and starts, stops and resumes training.

    Runs are the folders `sftlab train` writes (config.yaml, metrics.jsonl). No CDN: every asset
    ships with sftlab. Bound to 127.0.0.1 by default; bound elsewhere, open the printed address
    with its ?token=. Requests must address an allowed host name (127.0.0.1, localhost, [::1] on
    loopback; --host and --allowed-host elsewhere), and changes need the page's CSRF token.

    Example: sftlab ui --runs runs --port 7860   (then open http://127.0.0.1:7860)
    """
    import uvicorn

    from sftlab.terminal import console, fail
    from sftlab.ui.app import create_ui_app

    if not runs.is_dir():
        fail(f"--runs {runs}: no such folder (train a run first, e.g. `make demo`, or pass --runs DIR)")
    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOCAL_HOSTS and not token:
        token = secrets.token_urlsafe(16)
    from sftlab.http_guard import timed_http_protocol

    app = create_ui_app(runs, token=token, host=host, port=port, allowed_hosts=allowed_host)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"sftlab ui: {address}  (runs in {runs.resolve()}; Ctrl-C to stop)", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=timed_http_protocol())


def register(app: typer.Typer) -> None:
    app.command("ui")(ui_cmd)
