"""What every `sftlab` command shares at the terminal: the console, a clean failure, and the
guard that turns any SftlabError into one line and exit code 1."""

from __future__ import annotations

import functools
import os
from typing import Callable, NoReturn

import typer
from rich.console import Console

from sftlab.errors import SftlabError

console = Console()


def debug_enabled() -> bool:
    """`sftlab --debug ...` or SFTLAB_DEBUG=1: errors keep their traceback."""
    return os.environ.get("SFTLAB_DEBUG", "") not in ("", "0")


def fail(message: str) -> NoReturn:
    # soft_wrap: never insert line breaks into a message (a path or a row number must stay greppable);
    # the terminal wraps long lines itself. Under torchrun the rank says which process failed.
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f" (rank {rank})" if rank is not None else ""
    console.print(f"[bold red]error{where}:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def run(fn: Callable):
    """fn(), with a user-facing error printed as one line (exit code 1)."""
    try:
        return fn()
    except SftlabError as exc:
        if debug_enabled():
            raise
        fail(str(exc))


def guarded(command: Callable) -> Callable:
    """A command whose SftlabErrors, wherever they come from, end as one clean line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return run(lambda: command(*args, **kwargs))

    return wrapper


def guard_all(app: typer.Typer) -> None:
    """Wrap every command of `app` and its sub-apps with `guarded` (once)."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_sftlab_guarded", False):
            info.callback = guarded(info.callback)
            info.callback._sftlab_guarded = True
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_all(group.typer_instance)
