"""The `sftlab quality` and `sftlab filter` commands: parse, call `sftlab.quality`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

FORMAT_HELP = "row format: auto (detected), alpaca, dolly, openorca, sharegpt, openai, prompt_completion, text"


def _user_errors() -> tuple:
    from sftlab import cli

    return cli._user_errors() + (ValueError,)


def _call(fn):
    from sftlab.cli import _fail

    try:
        return fn()
    except _user_errors() as exc:
        _fail(str(exc))


def _progress(console):
    return lambda step: console.print(f"[dim]· {step}[/]", highlight=False)


def quality_cmd(
    files: list[str] = typer.Argument(..., help="data files (.json/.jsonl/.csv/.parquet, optionally .gz/.zst) or hf:owner/name"),
    report: Path = typer.Option(Path("quality.html"), "--report", help="HTML report to write; the JSON goes beside it (.json)"),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="tokenizer for token lengths and rows over --max-length "
                                                              "(registry name, HF folder or run directory)"),
    max_length: int = typer.Option(512, "--max-length", help="token limit for 'rows over max_length' and IFD truncation"),
    template: str = typer.Option("alpaca", "--template", help="template for token counts and IFD (alpaca, chatml, tokenizer, FILE.jinja)"),
    against: list[Path] = typer.Option([], "--against", help="evaluation file to check for 13-gram contamination (repeatable)"),
    builtin_suite: bool = typer.Option(True, "--builtin-suite/--no-builtin-suite",
                                       help="also check against the built-in eval suite (when installed)"),
    ifd_model: Optional[str] = typer.Option(None, "--ifd-model", help="model for IFD scores (registry name, HF folder or run directory)"),
    ifd_batch_size: int = typer.Option(8, "--ifd-batch-size", help="rows per forward pass for IFD"),
    near_threshold: float = typer.Option(0.7, "--near-threshold", help="Jaccard similarity of 5-gram shingles for near duplicates"),
    rouge_threshold: float = typer.Option(0.7, "--rouge-threshold", help="instruction ROUGE-L above which rows are flagged"),
    rouge_method: str = typer.Option("auto", "--rouge-method", help="auto | all (every earlier pair, exact) | lsh (MinHash candidates)"),
    min_words: int = typer.Option(3, "--min-words", help="responses with fewer words count as near-empty"),
    diversity: bool = typer.Option(True, "--diversity/--no-diversity", help="run the spaCy verb-noun analysis"),
) -> None:
    """Measure a dataset: lengths, duplicates, near duplicates, diversity, contamination, IFD; HTML + JSON report.

    Example: sftlab quality examples/data/alpaca_demo.json --report quality/demo.html
    """
    from rich.console import Console

    from sftlab.quality.analysis import analyze
    from sftlab.quality.report import print_summary

    console = Console()
    result = _call(lambda: analyze(
        files, format=format, model=model, template=template, max_length=max_length, near_empty_words=min_words,
        near_threshold=near_threshold, rouge_threshold=rouge_threshold, rouge_method=rouge_method, against=against,
        builtin_suite=builtin_suite, ifd_model=ifd_model, ifd_batch_size=ifd_batch_size, diversity=diversity,
        report=report, progress=_progress(console)))
    print_summary(result, console)


def filter_cmd(
    files: list[str] = typer.Argument(..., help="data files to clean (any type sftlab reads)"),
    output: Path = typer.Option(..., "-o", "--output", help="cleaned file (one input; same file type) or folder (one file per input)"),
    rules: Optional[Path] = typer.Option(None, "--rules", help="YAML rules file (keys as the options below); options override it"),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    dedup: Optional[str] = typer.Option(None, "--dedup", help="comma-separated: exact, near, instruction (ROUGE-L)"),
    near_threshold: Optional[float] = typer.Option(None, "--near-threshold", help="Jaccard for near duplicates (default 0.7)"),
    rouge_threshold: Optional[float] = typer.Option(None, "--rouge-threshold", help="instruction ROUGE-L threshold (default 0.7)"),
    drop_contaminated: Optional[bool] = typer.Option(None, "--drop-contaminated", help="drop rows sharing a 13-gram with eval data"),
    against: list[str] = typer.Option([], "--against", help="evaluation file for --drop-contaminated (repeatable)"),
    builtin_suite: Optional[bool] = typer.Option(None, "--builtin-suite/--no-builtin-suite",
                                                 help="include the built-in eval suite in contamination checks (default on)"),
    min_instruction_words: Optional[int] = typer.Option(None, "--min-instruction-words", help="drop shorter instructions"),
    max_instruction_words: Optional[int] = typer.Option(None, "--max-instruction-words", help="drop longer instructions"),
    min_response_words: Optional[int] = typer.Option(None, "--min-response-words", help="drop shorter responses"),
    max_response_words: Optional[int] = typer.Option(None, "--max-response-words", help="drop longer responses"),
    blacklist: Optional[str] = typer.Option(None, "--blacklist", help="comma-separated words/phrases; rows containing one are dropped"),
    ifd_top: Optional[float] = typer.Option(None, "--ifd-top", help="keep this top fraction by IFD (0.1 = 10%); needs --ifd-model"),
    ifd_model: Optional[str] = typer.Option(None, "--ifd-model", help="model for IFD (registry name, HF folder or run directory)"),
    cap: list[str] = typer.Option([], "--cap", help="KEY=N: at most N rows per value of a metadata key or column (repeatable)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for --cap sampling (default 0)"),
) -> None:
    """Drop rows by rules and write the rest in the input's format and file type, plus a log of every removal.

    Example: sftlab filter data.jsonl -o clean.jsonl --dedup exact,near --min-response-words 3 --cap category=100
    """
    from rich.console import Console
    from rich.table import Table

    from sftlab.quality.filtering import filter_rows, load_rules, parse_caps

    console = Console()
    chosen = _call(lambda: load_rules(
        rules, dedup=dedup, near_threshold=near_threshold, rouge_threshold=rouge_threshold,
        drop_contaminated=drop_contaminated, against=against or None, builtin_suite=builtin_suite,
        min_instruction_words=min_instruction_words, max_instruction_words=max_instruction_words,
        min_response_words=min_response_words, max_response_words=max_response_words, blacklist=blacklist,
        ifd_top=ifd_top, ifd_model=ifd_model, cap=parse_caps(cap) if cap else None, seed=seed))
    summary = _call(lambda: filter_rows(files, output, chosen, format=format, progress=_progress(console)))
    table = Table(title="filter")
    for name in ("file", "read", "kept", "removed", "written to"):
        table.add_column(name, justify="right" if name in ("read", "kept", "removed") else "left", overflow="fold")
    for x in summary["inputs"]:
        table.add_row(x["path"], f"{x['rows_read']:,}", f"{x['kept']:,}", f"{x['removed']:,}", x["output"])
    console.print(table)
    by_rule = summary["removed_by_rule"]
    console.print("removed by rule: " + (", ".join(f"{k}: {v}" for k, v in by_rule.items()) or "none"), highlight=False)
    console.print(f"log: {summary['log']}  ·  summary: {summary['summary']}", highlight=False)
    if summary["kept"] == 0:
        console.print("[yellow]warning:[/] no rows survived the rules; the cleaned files are empty", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("quality")(quality_cmd)
    app.command("filter")(filter_cmd)
