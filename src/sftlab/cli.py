"""The `sftlab` command: one thin command per verb — parse, call the library, print."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sftlab.config import describe_keys, load_config
from sftlab.terminal import console, fail, guard_all

app = typer.Typer(
    help="sftlab: supervised fine-tuning of language models — data, exact loss masks, training, generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Offline model registry: list and pull (convert GGUF once into the cache).", no_args_is_help=True)
app.add_typer(models_app, name="models")

SET_HELP = "Override a config key, e.g. --set learning_rate=1e-4 --set lora.r=8 (repeatable)."


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error (also SFTLAB_DEBUG=1)"),
) -> None:
    if debug:
        os.environ["SFTLAB_DEBUG"] = "1"


@models_app.command("list")
def models_list() -> None:
    """List registered offline models and whether they are installed and pulled."""
    from sftlab.models.registry import REGISTRY, cached_model_dir, is_installed, is_pulled

    table = Table(title="sftlab models")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("pulled", no_wrap=True)
    table.add_column("license", no_wrap=True)
    table.add_column("description")
    for name, entry in REGISTRY.items():
        pulled = "yes" if is_pulled(name) else "no" if is_installed(name) else f"no; first: {entry.install}"
        table.add_row(name, pulled, entry.license, entry.description)
    console.print(table)
    console.print(f"cache: {cached_model_dir('x').parent}  (set SFTLAB_HOME to move it)", highlight=False)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="a registered model name (see `sftlab models list`)"),
    force: bool = typer.Option(False, help="convert again even when already in the cache"),
) -> None:
    """Convert a registered GGUF model once into a Hugging Face checkpoint in $SFTLAB_HOME.

    Example: sftlab models pull smollm2-135m-instruct
    """
    from sftlab.models.convert import pull

    path = pull(name, force=force)
    console.print(f"{name}: {path}")


@app.command("config")
def config_cmd(
    config: Optional[Path] = typer.Argument(None, help="a run config to resolve; omitted: show all keys and defaults"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Show every config key with its default and meaning, or the resolved values of a config.

    Example: sftlab config examples/demo.yaml --set method=lora
    """
    if config is None and not set_:
        table = Table("key", "default", "meaning", title="run config keys")
        for key, default, meaning in describe_keys():
            table.add_row(key, json.dumps(default), meaning)
        console.print(table)
        return
    cfg = load_config(config, set_)
    import yaml

    data = cfg.model_dump(mode="json")
    data["learning_rate"] = cfg.resolved_learning_rate
    console.print(yaml.safe_dump(data, sort_keys=False), highlight=False)


def _print_report(report: dict) -> None:
    sources = report["sources"] + [report["total"]]
    if len(report["sources"]) > 2:  # one line per source, then the full audit of the total
        per_source = Table(title="sources")
        per_source.add_column("file", overflow="fold", min_width=14)
        for name in ("format", "read", "kept", "dropped", "trunc.", "trained"):
            per_source.add_column(name, no_wrap=name != "format", justify="left" if name == "format" else "right")
        for r in report["sources"]:
            name = Path(r["path"]).name + (" (val)" if r["split"] == "val" else "")
            per_source.add_row(name, r["format"], f"{r['rows_read']:,}", f"{r['rows_kept']:,}",
                               f"{r['rows_dropped']:,}", f"{r['rows_truncated']:,}", f"{r['trained_tokens']:,}")
        console.print(per_source)
        sources = [report["total"]]
    table = Table(title="data report")
    table.add_column("", no_wrap=True, style="bold")
    for r in sources:
        header = "total" if r["split"] == "all" else f"{Path(r['path']).name} ({r['split']})"
        table.add_column(header, justify="right", overflow="fold")

    def pct(r: dict, key: str) -> str:
        p = r[key]
        return f"{p['p50']} / {p['p90']} / {p['max']}" if p else "-"

    lines = [
        ("rows read", lambda r: f"{r['rows_read']:,}"), ("rows kept", lambda r: f"{r['rows_kept']:,}"),
        ("rows dropped", lambda r: f"{r['rows_dropped']:,}"), ("rows truncated", lambda r: f"{r['rows_truncated']:,}"),
        ("  lost end token", lambda r: f"{r['rows_truncated_lost_end_token']:,}"),
        ("tokens", lambda r: f"{r['tokens']:,}"), ("trained tokens", lambda r: f"{r['trained_tokens']:,}"),
        ("length p50/p90/max", lambda r: pct(r, "length_percentiles")),
        ("trained p50/p90/max", lambda r: pct(r, "trained_length_percentiles")),
    ]
    lines += [
        ("identical rows", lambda r: f"{r['duplicate_rows']:,}"),
        ("prompt p50/p90/max", lambda r: pct(r, "prompt_length_percentiles")),
        ("turns p50/max", lambda r: f"{r['turns_percentiles'].get('p50', '-')} / {r['turns_percentiles'].get('max', '-')}"),
    ]
    total = report["total"]
    agent = total.get("agent_rows", {})
    for kind, label in (("tools", "rows with tools"), ("tool_calls", "  with tool calls"),
                        ("parallel_tool_calls", "  with parallel calls"), ("tool_results", "  with tool results"),
                        ("reasoning", "rows with reasoning"), ("untrained_turns", "rows with weight-0 turns")):
        if agent.get(f"rows_with_{kind}"):  # shown only for data that has them
            lines.append((label, lambda r, k=kind: f"{r.get('agent_rows', {}).get(f'rows_with_{k}', 0):,}"))
    views = total.get("turn_views", {})
    if views.get("rows_with_turn_views"):
        lines += [("rows with turn views", lambda r: f"{r['turn_views']['rows_with_turn_views']:,}"),
                  ("  extra sequences", lambda r: f"{r['turn_views']['turn_view_sequences']:,}"),
                  ("  their tokens", lambda r: f"{r['turn_views']['turn_view_tokens']:,}")]
    for key, label in (("empty_think_masked", "empty think masked"), ("reasoning_masked", "turns reasoning masked")):
        if views.get(key):
            lines.append((label, lambda r, k=key: f"{r['turn_views'][k]:,}"))
    for label, cell in lines:
        table.add_row(label, *(cell(r) for r in sources))
    console.print(table)
    dropped = report["total"]["dropped_by_reason"]
    if dropped:
        console.print("dropped by reason: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()), highlight=False)
    split = report["split"]
    sequences = ""
    if split.get("train_sequences", split["train_rows"]) != split["train_rows"]:
        sequences = f" ({split['train_sequences']} / {split['val_sequences']} sequences with the turn views)"
    console.print(f"split: {split['train_rows']} train / {split['val_rows']} validation rows{sequences}; "
                  f"template {report['template']}, train_on {report['train_on']}", highlight=False)
    if views.get("rows_with_turn_views"):
        console.print(f"{views['rows_with_turn_views']:,} conversations render earlier turns differently than the "
                      f"template shows them at inference: those turns train in views of their own "
                      f"(+{views['turn_view_sequences']:,} sequences, +{views['turn_view_tokens']:,} tokens)",
                      highlight=False)
    if report.get("cache") == "hit":
        console.print(f"tokenized data reused from the cache ({report['cache_key']})", highlight=False)
    if report.get("resumed"):
        console.print("continued a prepare that was stopped midway (from its last checkpoint)", highlight=False)


@app.command("prepare")
def prepare_cmd(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Read, validate, template, tokenize and mask the data; print and save the data report.

    Example: sftlab prepare examples/demo.yaml   (writes OUTPUT_DIR/data_report.json)
    """
    from sftlab.api import prepare

    cfg = load_config(config, set_)
    data = prepare(cfg)
    _print_report(data.report)
    meta = data.store.meta
    where = "(temporary: cache is off)" if data.report["cache"] == "off" else f"({data.report['cache']})"
    console.print(f"token store: {data.store.folder} {where}: {meta['rows']:,} rows, {meta['tokens']:,} tokens")
    console.print(f"report: {Path(cfg.output_dir) / 'data_report.json'}")


@app.command("inspect")
def inspect_cmd(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    n: int = typer.Option(3, "-n", help="how many examples to show"),
    row: Optional[int] = typer.Option(None, help="show this training example (0-based) instead"),
    random_rows: bool = typer.Option(False, "--random", help="pick examples at random (seeded by the config)"),
    where: Optional[str] = typer.Option(
        None, help="show dropped rows instead: 'dropped' or 'dropped:REASON' (reasons are in the data report)"),
    kind: Optional[str] = typer.Option(
        None, help="show rows of one kind with all their sequences: tools, tool_calls, parallel_tool_calls, "
                   "tool_results, reasoning, untrained_turns, or views (turns trained in views of their own)"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="HTML file to write (default OUTPUT_DIR/inspect.html)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Show training examples with the trained tokens highlighted (terminal + HTML), or dropped rows.

    Example: sftlab inspect examples/demo.yaml -n 3   |   sftlab inspect run.yaml --where dropped:unknown_role
    |   sftlab inspect examples/agent-formats.yaml --kind tool_calls -n 2
    """
    from sftlab.api import prepare
    from sftlab.data.inspect import to_rich, write_html
    from sftlab.models.loading import load_tokenizer

    cfg = load_config(config, set_)
    data = prepare(cfg)
    tokenizer = load_tokenizer(cfg.model)
    examples = data.train
    if where is not None:
        kind, _, reason = where.partition(":")
        if kind != "dropped":
            fail(f"--where {where}: expected 'dropped' or 'dropped:REASON'")
        rows = [d for d in data.dropped if not reason or d.reason == reason][:n]
        reasons = sorted({d.reason for d in data.dropped})
        if not rows:
            fail(f"--where {where}: no dropped rows match (reasons in this data: {', '.join(reasons) or 'none'})")
        for d in rows:
            console.rule(f"{d.source}  ·  dropped: {d.reason}")
            console.print(d.detail, highlight=False, markup=False)
        return
    if kind is not None:
        from sftlab.data.inspect import rows_of_kind

        chosen = rows_of_kind(cfg, examples, kind, n)
        if not chosen:
            fail(f"--kind {kind}: no training row of that kind")
    elif row is not None:
        if not 0 <= row < len(examples):
            fail(f"--row {row}: the training set has rows 0..{len(examples) - 1}")
        chosen = [examples[row]]
    elif random_rows:
        chosen = random.Random(cfg.seed).sample(examples, min(n, len(examples)))
    else:
        chosen = examples[:n]
    for example in chosen:
        console.rule(f"{example.source}  ·  {len(example)} tokens, {example.trained_token_count} trained")
        console.print(to_rich(example, tokenizer))
    path = write_html(chosen, tokenizer, html_path or Path(cfg.output_dir) / "inspect.html")
    console.print("[dim]legend: [bold black on green]trained[/] · masked (label -100)[/]")
    console.print(f"HTML: {path}")


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, help="continue from the newest complete checkpoint-N in output_dir"),
    force: bool = typer.Option(False, help="with --resume: resume even though config keys changed since the checkpoint"),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="train on N processes of this machine (starts torchrun; DDP or FSDP2 per `parallelism`)"),
) -> None:
    """Fine-tune (full or LoRA): checkpoints, metrics.jsonl, progress; final model in OUTPUT_DIR/final.

    One process by default; --nproc N (or `torchrun --nproc-per-node N -m sftlab train CONFIG`,
    also across nodes) trains on N processes. SIGTERM or Ctrl-C saves a checkpoint at the end of
    the step and exits 0; --resume continues from it.

    Example: sftlab train examples/demo.yaml --set max_steps=10
    """
    from sftlab.train.distributed import launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        from sftlab.train.launch import run_torchrun

        args = [str(config), *[a for s in set_ for a in ("--set", s)], *(["--resume"] if resume else []),
                *(["--force"] if force else [])]
        raise typer.Exit(run_torchrun(nproc, args))
    from sftlab.api import train

    cfg = load_config(config, set_)
    result = train(cfg, resume=resume, console=console, force=force)
    if result is not None and result.interrupted:
        raise typer.Exit(0)


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="run directory, checkpoint folder, registry name or HF model folder"),
    instruction: str = typer.Option(..., "--instruction", "-i", help="the instruction"),
    input: str = typer.Option("", "--input", help="optional input/context for the instruction"),
    template: Optional[str] = typer.Option(None, help="template for a plain model (a run uses its own); default alpaca"),
    max_new_tokens: int = typer.Option(256, help="longest response in tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling threshold (temperature > 0)"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    show_prompt: bool = typer.Option(False, help="also print the exact prompt text"),
) -> None:
    """Generate a response with the template the run trained with; stops at EOS.

    Example: sftlab generate runs/demo -i "Name three primary colours."
    """
    from sftlab.infer.generate import Generator

    generator = Generator.load(model, template)
    if show_prompt:
        console.rule("prompt")
        console.print(generator.prompt_text(instruction, input), highlight=False, markup=False)
        console.rule("response")
    response = generator.generate([(instruction, input)], max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)[0]
    console.print(response, highlight=False, markup=False)


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="run directory, checkpoint folder or final/"),
    output: Path = typer.Option(..., "-o", "--output", help="folder to write (a plain Hugging Face model folder)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: the base model's)"),
    gguf: Optional[str] = typer.Option(None, "--gguf", help="also write a GGUF file: f32, f16, bf16, q8_0, q4_0, "
                                                              "q4_1, q5_0, q5_1 (llama.cpp, Ollama)"),
    ollama: bool = typer.Option(False, "--ollama", help="also write an Ollama Modelfile for the GGUF (needs --gguf)"),
) -> None:
    """Export a run as a model that behaves the same outside sftlab: LoRA merged, the training template as the
    tokenizer's chat_template, every end token in generation_config.json, a model card; optionally GGUF + Modelfile.

    Example: sftlab export runs/demo -o out/demo --gguf q8_0 --ollama
    """
    from sftlab.export import export

    result = export(run, output, dtype=dtype, gguf=gguf, ollama=ollama,
                    say=lambda text: console.print(f"[dim]· {text}[/]", highlight=False))
    console.print(f"exported {run} -> {result['folder']} ({result['dtype']}; stops at {result['eos_token_id']}) "
                  f"in {result['seconds']:.1f} s", highlight=False)
    if "gguf" in result:
        console.print(f"GGUF: {result['gguf']} ({result['gguf_bytes'] / 2**20:.1f} MB)", highlight=False)
    if "modelfile" in result:
        console.print(f"Ollama: ollama create NAME -f {result['modelfile']}", highlight=False)


# Verbs of the other stages live beside their code; each module exposes register(app).
STAGE_COMMANDS = (
    "sftlab.eval.commands", "sftlab.infer.commands", "sftlab.selfinstruct.commands", "sftlab.quality.commands",
    "sftlab.ui.commands",
)
for _module in STAGE_COMMANDS:
    import importlib
    import importlib.util

    if importlib.util.find_spec(_module.rsplit(".", 1)[0]) and importlib.util.find_spec(_module):
        importlib.import_module(_module).register(app)
guard_all(app)  # any SftlabError of any command: one clean line, exit code 1 (traceback with --debug)


def main() -> None:
    # transformers draws a tqdm bar for every weight load; sftlab shows its own progress (read by
    # transformers when it is imported: commands that never load a model never import it)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    main()
