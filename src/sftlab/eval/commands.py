"""The `sftlab eval` command: parse, call `sftlab.eval.run_eval`, print the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.eval.runner import DEFAULTS


def eval_cmd(
    run_dir: Path = typer.Argument(..., help="run directory (holds config.yaml and final/)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model to compare with; default: the run's base_model"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="held-out Alpaca .json/.jsonl; default: the run's validation data"),
    suite: Optional[Path] = typer.Option(
        None, "--suite", help="instruction-following suite JSONL; default: the built-in one"),
    corpus: Optional[Path] = typer.Option(
        None, "--corpus", help="general text for forgetting: .txt (split at blank lines) or .jsonl with a 'text' field; "
                               "default: text sampled from the base model"),
    lm_eval: Optional[str] = typer.Option(
        None, "--lm-eval",
        help="comma-separated lm-eval tasks, e.g. sftlab_mini_qa (local) or hellaswag,arc_challenge (network)"),
    lm_eval_include: list[Path] = typer.Option([], "--lm-eval-include", help="a folder of lm-eval task YAMLs (repeatable)"),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="examples per lm-eval task (default: all)"),
    lm_eval_fewshot: Optional[int] = typer.Option(None, "--lm-eval-fewshot", help="few-shot examples (default: the task's)"),
    lm_eval_base: bool = typer.Option(True, "--lm-eval-base/--no-lm-eval-base",
                                      help="also run the lm-eval tasks on the base model"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="report folder; default RUN_DIR/eval"),
    limit: int = typer.Option(DEFAULTS["limit"], "--limit", help="suite prompts to run (0 = skip instruction following)"),
    full_suite: bool = typer.Option(False, "--full-suite", help="run every suite prompt (overrides --limit)"),
    max_new_tokens: int = typer.Option(DEFAULTS["max_new_tokens"], "--max-new-tokens", help="longest generated response"),
    batch_size: int = typer.Option(DEFAULTS["batch_size"], "--batch-size", help="examples per forward/generation batch"),
    side_by_side: int = typer.Option(
        DEFAULTS["side_by_side"], "--side-by-side", help="held-out prompts answered by both models"),
    forgetting_threshold: float = typer.Option(
        DEFAULTS["forgetting_threshold"], "--forgetting-threshold",
        help="flag forgetting when general-text perplexity rises by more than this share (0.10 = +10%)"),
    corpus_samples: int = typer.Option(DEFAULTS["corpus_samples"], "--corpus-samples",
                                       help="texts to sample from the base model when no --corpus (0 = skip)"),
    corpus_tokens: int = typer.Option(DEFAULTS["corpus_tokens"], "--corpus-tokens", help="tokens per sampled text"),
    max_corpus_chunks: int = typer.Option(DEFAULTS["max_corpus_chunks"], "--max-corpus-chunks",
                                          help="most chunks of general text to score"),
    block_size: int = typer.Option(DEFAULTS["block_size"], "--block-size", help="tokens per chunk of general text"),
    seed: int = typer.Option(DEFAULTS["seed"], "--seed", help="seed for sampling the forgetting corpus and lm-eval"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    fail_on_forgetting: bool = typer.Option(False, "--fail-on-forgetting",
                                            help="exit with code 2 when forgetting is flagged (for CI)"),
) -> None:
    """Evaluate a run against its base model: held-out loss, instruction following, forgetting, side by side.

    Writes RUN_DIR/eval/eval_report.json and eval_report.html (training curves, tables, answers).

    Example: sftlab eval runs/demo --limit 60 --lm-eval sftlab_mini_qa
    """
    from rich.console import Console

    from sftlab import cli
    from sftlab.cli import _fail
    from sftlab.eval.errors import EvalError
    from sftlab.eval.report import print_summary
    from sftlab.eval.runner import run_eval

    console = Console()
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device {device}: use auto, cpu or cuda")
    try:
        report = run_eval(
            run_dir, base=base, data=data, suite=suite, corpus=corpus, lm_eval=lm_eval,
            lm_eval_include=lm_eval_include, lm_eval_limit=lm_eval_limit, lm_eval_fewshot=lm_eval_fewshot,
            lm_eval_base=lm_eval_base, output=output, limit=None if full_suite else limit,
            max_new_tokens=max_new_tokens, batch_size=batch_size, side_by_side=side_by_side,
            forgetting_threshold=forgetting_threshold, corpus_samples=corpus_samples, corpus_tokens=corpus_tokens,
            block_size=block_size, max_corpus_chunks=max_corpus_chunks, seed=seed,
            device=device, console=console,
        )
    except (EvalError, *getattr(cli, "_user_errors", tuple)()) as exc:
        _fail(str(exc))
    print_summary(report, console)
    if fail_on_forgetting and (report.get("forgetting") or {}).get("flagged"):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
