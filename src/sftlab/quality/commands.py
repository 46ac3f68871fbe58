"""The `sftlab quality` and `sftlab filter` commands: parse, call `sftlab.quality`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.quality.analysis import QualitySettings as Q
from sftlab.quality.filtering import FilterRules as R
from sftlab.settings import option
from sftlab.terminal import console

FORMAT_HELP = "row format: auto (detected), alpaca, dolly, openorca, sharegpt, openai, prompt_completion, text"


def _progress(console):
    return lambda step: console.print(f"[dim]· {step}[/]", highlight=False)


def quality_cmd(
    files: list[str] = typer.Argument(..., help="data files (.json/.jsonl/.csv/.parquet, optionally .gz/.zst) or hf:owner/name"),
    report: Path = typer.Option(Path("quality.html"), "--report", help="HTML report to write; the JSON goes beside it (.json)"),
    format: str = option(Q, "format", "--format"),
    model: Optional[str] = option(Q, "model", "--model"),
    max_length: int = option(Q, "max_length", "--max-length"),
    template: str = option(Q, "template", "--template"),
    against: list[Path] = option(Q, "against", "--against"),
    builtin_suite: bool = option(Q, "builtin_suite", "--builtin-suite/--no-builtin-suite"),
    ifd_model: Optional[str] = option(Q, "ifd_model", "--ifd-model"),
    ifd_batch_size: int = option(Q, "ifd_batch_size", "--ifd-batch-size"),
    near_threshold: float = option(Q, "near_threshold", "--near-threshold"),
    rouge_threshold: float = option(Q, "rouge_threshold", "--rouge-threshold"),
    rouge_method: str = option(Q, "rouge_method", "--rouge-method"),
    near_empty_words: int = option(Q, "near_empty_words", "--min-words"),
    diversity: bool = option(Q, "diversity", "--diversity/--no-diversity"),
) -> None:
    """Measure a dataset: lengths, duplicates, near duplicates, diversity, contamination, IFD; HTML + JSON report.

    Example: sftlab quality examples/data/alpaca_demo.json --report quality/demo.html
    """
    from sftlab.quality.analysis import analyze
    from sftlab.quality.report import print_summary

    result = analyze(files, Q.from_options(locals()), report=report, progress=_progress(console))
    print_summary(result, console)


def filter_cmd(
    files: list[str] = typer.Argument(..., help="data files to clean (any type sftlab reads)"),
    output: Path = typer.Option(..., "-o", "--output", help="cleaned file (one input; same file type) or folder (one file per input)"),
    rules: Optional[Path] = typer.Option(None, "--rules", help="YAML rules file (keys as the options below); options override it"),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    dedup: Optional[str] = option(R, "dedup", "--dedup", default=None),
    near_threshold: Optional[float] = option(R, "near_threshold", "--near-threshold", default=None),
    rouge_threshold: Optional[float] = option(R, "rouge_threshold", "--rouge-threshold", default=None),
    drop_contaminated: Optional[bool] = option(R, "drop_contaminated", "--drop-contaminated", default=None),
    against: list[str] = option(R, "against", "--against", default=[]),
    builtin_suite: Optional[bool] = option(R, "builtin_suite", "--builtin-suite/--no-builtin-suite", default=None),
    min_instruction_words: Optional[int] = option(R, "min_instruction_words", "--min-instruction-words", default=None),
    max_instruction_words: Optional[int] = option(R, "max_instruction_words", "--max-instruction-words", default=None),
    min_response_words: Optional[int] = option(R, "min_response_words", "--min-response-words", default=None),
    max_response_words: Optional[int] = option(R, "max_response_words", "--max-response-words", default=None),
    blacklist: Optional[str] = option(R, "blacklist", "--blacklist", default=None),
    ifd_top: Optional[float] = option(R, "ifd_top", "--ifd-top", default=None),
    ifd_model: Optional[str] = option(R, "ifd_model", "--ifd-model", default=None),
    cap: list[str] = option(R, "cap", "--cap", default=[]),
    seed: Optional[int] = option(R, "seed", "--seed", default=None),
) -> None:
    """Drop rows by rules and write the rest in the input's format and file type, plus a log of every removal.

    Example: sftlab filter data.jsonl -o clean.jsonl --dedup exact,near --min-response-words 3 --cap category=100
    """
    from rich.table import Table

    from sftlab.quality.filtering import filter_rows, load_rules, parse_caps

    chosen = load_rules(
        rules, dedup=dedup, near_threshold=near_threshold, rouge_threshold=rouge_threshold,
        drop_contaminated=drop_contaminated, against=against or None, builtin_suite=builtin_suite,
        min_instruction_words=min_instruction_words, max_instruction_words=max_instruction_words,
        min_response_words=min_response_words, max_response_words=max_response_words, blacklist=blacklist,
        ifd_top=ifd_top, ifd_model=ifd_model, cap=parse_caps(cap) if cap else None, seed=seed)
    summary = filter_rows(files, output, chosen, format=format, progress=_progress(console))
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
