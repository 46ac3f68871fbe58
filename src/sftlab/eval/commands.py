"""The `sftlab eval` command: parse, call `sftlab.eval.run_eval`, print the summary. Every
option's default and help text come from `sftlab.eval.settings.EvalSettings`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.eval.settings import EvalSettings as S
from sftlab.settings import option
from sftlab.terminal import console


def eval_cmd(
    run_dir: Path = typer.Argument(..., help="run directory (holds config.yaml and final/)"),
    base: Optional[str] = option(S, "base", "--base"),
    data: Optional[Path] = option(S, "data", "--data"),
    suite: Optional[Path] = option(S, "suite", "--suite"),
    corpus: Optional[Path] = option(S, "corpus", "--corpus"),
    lm_eval: Optional[str] = option(S, "lm_eval", "--lm-eval"),
    lm_eval_include: list[Path] = option(S, "lm_eval_include", "--lm-eval-include"),
    lm_eval_limit: Optional[int] = option(S, "lm_eval_limit", "--lm-eval-limit"),
    lm_eval_fewshot: Optional[int] = option(S, "lm_eval_fewshot", "--lm-eval-fewshot"),
    lm_eval_base: bool = option(S, "lm_eval_base", "--lm-eval-base/--no-lm-eval-base"),
    tool_calls: Optional[Path] = option(S, "tool_calls", "--tool-calls"),
    output: Optional[Path] = option(S, "output", "-o", "--output"),
    limit: int = option(S, "limit", "--limit", help="suite prompts to run (0 = skip instruction following)"),
    full_suite: bool = typer.Option(False, "--full-suite", help="run every suite prompt (overrides --limit)"),
    max_new_tokens: int = option(S, "max_new_tokens", "--max-new-tokens"),
    batch_size: int = option(S, "batch_size", "--batch-size"),
    side_by_side: int = option(S, "side_by_side", "--side-by-side"),
    forgetting_threshold: float = option(S, "forgetting_threshold", "--forgetting-threshold"),
    corpus_samples: int = option(S, "corpus_samples", "--corpus-samples"),
    corpus_tokens: int = option(S, "corpus_tokens", "--corpus-tokens"),
    max_corpus_chunks: int = option(S, "max_corpus_chunks", "--max-corpus-chunks"),
    block_size: int = option(S, "block_size", "--block-size"),
    seed: int = option(S, "seed", "--seed"),
    device: str = option(S, "device", "--device"),
    cache: bool = option(S, "cache", "--cache/--no-cache"),
    fail_on_forgetting: bool = typer.Option(False, "--fail-on-forgetting",
                                            help="exit with code 2 when forgetting is flagged (for CI)"),
) -> None:
    """Evaluate a run against its base model: held-out loss, instruction following, forgetting, side by side.

    Writes RUN_DIR/eval/eval_report.json and eval_report.html (training curves, tables, answers).

    Example: sftlab eval runs/demo --limit 60 --lm-eval sftlab_mini_qa
    |   sftlab eval runs/agent --tool-calls examples/data/agent_eval.jsonl --limit 0
    """
    from sftlab.eval.report import print_summary
    from sftlab.eval.runner import run_eval

    settings = S.from_options({**locals(), "limit": None if full_suite else limit})
    report = run_eval(run_dir, settings, console=console)
    print_summary(report, console)
    if fail_on_forgetting and (report.get("forgetting") or {}).get("flagged"):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
