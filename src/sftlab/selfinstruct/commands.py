"""The `sftlab self-instruct` command (registered by sftlab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.selfinstruct.backends import OpenAIBackend
from sftlab.selfinstruct.pipeline import Settings as S
from sftlab.settings import option


def self_instruct_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="Alpaca-format JSON to write (and resume)"),
    api_base: Optional[str] = typer.Option(
        None, "--api-base", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (sftlab serve)"),
    model: Optional[str] = typer.Option(None, "--model", help="model name at the endpoint (default: the first it lists)"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env",
                                    help="environment variable holding the API key (unset: no key)"),
    chat: bool = typer.Option(False, "--chat", help="use /chat/completions instead of /completions"),
    local: Optional[str] = typer.Option(
        None, "--local", help="generate in-process instead: registry name, run directory or HF model folder"),
    num: int = option(S, "num", "--num"),
    mode: str = option(S, "mode", "--mode"),
    seed_tasks: Optional[Path] = typer.Option(
        None, "--seed-tasks", help="seed tasks in Self-Instruct's JSONL schema (default: the built-in 115, CC0)"),
    seed: int = option(S, "seed", "--seed"),
    concurrency: int = typer.Option(OpenAIBackend.concurrency, "--concurrency", help="HTTP requests in flight at once"),
    batch: Optional[int] = typer.Option(
        None, "--batch", help="instruction-generation prompts per round, and the --local generate batch "
                              "(default: max(5, concurrency))"),
    max_tokens: Optional[int] = option(S, "max_tokens", "--max-tokens"),
    instance_max_tokens: int = option(S, "instance_max_tokens", "--instance-max-tokens"),
    temperature: float = option(S, "temperature", "--temperature"),
    top_p: float = option(S, "top_p", "--top-p"),
    presence_penalty: float = option(S, "presence_penalty", "--presence-penalty"),
    rouge_threshold: float = option(S, "rouge_threshold", "--rouge-threshold"),
    max_retries: int = typer.Option(OpenAIBackend.max_retries, "--max-retries",
                                    help="retries per request on 429/5xx/timeouts (exponential back-off)"),
    timeout: float = typer.Option(OpenAIBackend.timeout, "--timeout", help="seconds per HTTP request"),
    max_rounds: Optional[int] = option(S, "max_rounds", "--max-rounds"),
    patience: int = option(S, "patience", "--patience"),
    log: Optional[Path] = typer.Option(None, "--log", help="candidate log, JSONL (default: OUTPUT with .log.jsonl)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start again: delete OUTPUT and its log first"),
) -> None:
    """Generate instruction data from seed tasks with Self-Instruct; resumable, every candidate logged.

    Each round shows the model in-context instructions from the seed tasks and the growing pool and keeps the new ones that pass the filters (length, blacklist, "Write a program", first character, ROUGE-L > 0.7 against the pool).

    In self-instruct mode it then asks whether each task is classification and generates up to 5 instances per task (output-first for classification). In alpaca mode each new task comes with its one instance.

    OUTPUT is Alpaca JSON (`data: OUTPUT` in a run config); the log holds every candidate and its fate. Run the same command again to continue after a kill.

    Example: sftlab self-instruct --api-base http://127.0.0.1:8000/v1 --model tiny --num 1000 -o gen.json
    """
    from sftlab.terminal import console, fail

    if (api_base is None) == (local is None):
        fail("give exactly one backend: --api-base URL (an OpenAI-compatible server) or --local MODEL")
    if concurrency < 1:
        fail(f"--concurrency {concurrency}: must be at least 1")
    if batch is not None and batch < 1:
        fail(f"--batch {batch}: must be at least 1")
    if local is not None and (chat or model):
        fail("--chat and --model apply to --api-base; --local takes the model itself")
    prompts_per_round = batch or max(5, concurrency)
    settings = S.from_options({**locals(), "prompts_per_round": prompts_per_round})
    # a bad seed file fails before any model is loaded
    from sftlab.selfinstruct.prompts import ALPACA_EXAMPLES, SELF_INSTRUCT_MACHINE, SELF_INSTRUCT_SEED
    from sftlab.selfinstruct.seeds import load_seed_tasks

    load_seed_tasks(seed_tasks, minimum=ALPACA_EXAMPLES if mode == "alpaca" else SELF_INSTRUCT_SEED + SELF_INSTRUCT_MACHINE)
    if api_base is not None:
        import os

        backend = OpenAIBackend(api_base, model=model, api_key=os.environ.get(api_key_env) or None, chat=chat,
                                concurrency=concurrency, max_retries=max_retries, timeout=timeout)
        backend.resolve_model()
    else:
        from sftlab.selfinstruct.backends import LocalBackend

        try:
            backend = LocalBackend(local, batch_size=prompts_per_round)
        except (OSError, ValueError) as exc:
            fail(f"cannot load '{local}': {exc}")
    result = _run_with_progress(backend, output, settings, seed_tasks, log, overwrite)
    _print_summary(result, console)


def _run_with_progress(backend, output: Path, settings: S, seed_tasks, log, overwrite: bool):
    """The run under a progress bar (kept instructions of --num); Ctrl-C leaves it resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sftlab.selfinstruct.pipeline import SelfInstruct
    from sftlab.terminal import console

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("self-instruct", total=settings.num, stats="")

        def show(run: SelfInstruct, stage: str) -> None:
            c = run.counts
            stats = f"kept {c.kept} · dropped {c.dropped} · rows {c.rows}"
            progress.update(task, completed=min(c.kept, settings.num), description=stage, stats=stats)

        run = SelfInstruct(backend, output, settings, seed_tasks, log, overwrite, on_progress=show)
        if run.resumed_rounds:
            note = f" ({run.discarded_records} records of an unfinished round dropped)" if run.discarded_records else ""
            console.print(f"resuming {run.log}: {run.resumed_rounds} rounds, {run.counts.kept} instructions, "
                          f"{run.counts.rows} rows{note}", highlight=False)
        show(run, "starting")
        try:
            return run.run()
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"[yellow]interrupted[/]: {run.counts.rounds} rounds are committed in {run.log}; "
                          "run the same command to continue", highlight=False)
            raise typer.Exit(130) from None


def _print_summary(result, console) -> None:
    from rich.table import Table

    summary = result.summary
    table = Table(title="self-instruct", show_header=True)
    table.add_column("", style="bold")
    table.add_column("candidates", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("dropped by reason")
    for name in ("instructions", "instances"):
        part = summary[name]
        if not part["candidates"]:
            continue
        reasons = ", ".join(f"{k}: {v}" for k, v in part["dropped_by_reason"].items()) or "-"
        table.add_row(name, f"{part['candidates']:,}", f"{part['kept']:,}", reasons)
    console.print(table)
    requests = ", ".join(f"{k}: {v}" + (f" ({summary['failed_requests'][k]} failed)"
                                        if summary["failed_requests"].get(k) else "")
                         for k, v in summary["requests"].items())
    if summary["classification"]:
        clf = ", ".join(f"{k}: {v}" for k, v in summary["classification"].items())
        console.print(f"classification: {clf}", highlight=False)
    console.print(f"rounds: {summary['rounds']}; requests: {requests or 'none'}", highlight=False)
    if result.stopped == "max_rounds":
        console.print("[yellow]stopped at --max-rounds[/] before reaching --num", highlight=False)
    elif result.stopped == "patience":
        console.print("[yellow]stopped[/]: too many rounds in a row kept nothing (--patience)", highlight=False)
    console.print(f"{summary['rows']:,} rows: {result.output}   (train with `data: {result.output}`)", highlight=False)
    console.print(f"log: {result.log}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("self-instruct")(self_instruct_cmd)
