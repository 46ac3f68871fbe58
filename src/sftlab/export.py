"""`sftlab export`: a fine-tuned run as a model that behaves the same outside sftlab.

    export("runs/demo", "out/demo")                 # a plain Hugging Face folder
    export("runs/demo", "out/demo", gguf="q8_0")    # + out/demo/<name>-q8_0.gguf (llama.cpp)
    export("runs/demo", "out/demo", gguf="q8_0", ollama=True)   # + out/demo/Modelfile

The folder holds the merged weights (a LoRA adapter merged into its base; a full fine-tune
copied) in safetensors, the tokenizer with the run's template as its `chat_template` (the
same Jinja text sftlab checks its own rendering against, so `apply_chat_template` gives the
training prompt's token ids), a `generation_config.json` whose `eos_token_id` lists every
token that ends a trained response, a model card, and the run's `sftlab.json` and
`config.yaml` (so `sftlab serve/chat/eval` take the folder too).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from sftlab.errors import SftlabError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(SftlabError):
    """A run or an option `sftlab export` cannot export; the message says what to do."""


def _checkpoint(run: str | Path) -> tuple[Path, Path | None]:
    """(the checkpoint folder holding sftlab.json, the run directory when there is one)."""
    from sftlab.models.loading import find_checkpoint, run_config_dir

    path = Path(run)
    if not path.exists():
        raise ExportError(f"{path}: no such run directory or checkpoint folder")
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise ExportError(f"{path}: no final checkpoint (no sftlab.json here or in {path / 'final'}); "
                          "train the run to its end, or pass a checkpoint folder")
    return checkpoint, run_config_dir(checkpoint)


def _base_dtype(info: dict, model) -> str:
    """The dtype the base model's config names (registry models: fp32, dequantized from GGUF);
    the loaded model's when the base is not a local folder (a hub id, or not pulled)."""
    from sftlab.models.convert import resolve_model

    named = None
    try:
        config = Path(resolve_model(info["base_model"], pull_if_missing=False)) / "config.json"
        if config.is_file():
            raw = json.loads(config.read_text())
            named = raw.get("dtype") or raw.get("torch_dtype")
    except (KeyError, SftlabError):
        pass
    named = named or str(getattr(model.config, "dtype", "float32")).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(named), "fp32")


def export(run: str | Path, output: str | Path, dtype: str | None = None, gguf: str | None = None,
           ollama: bool = False, max_shard_size: str = "2GB", say=print) -> dict:
    """Export a run (directory, checkpoint folder or final/) into `output`; returns what was written."""
    from sftlab.data.templates import run_template
    from sftlab.infer.engine import stop_tokens
    from sftlab.models.loading import load_for_inference, read_run_info

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if ollama and gguf is None:
        raise ExportError("--ollama writes a Modelfile FROM the GGUF file: give --gguf TYPE too (e.g. --gguf q8_0)")
    if gguf is not None:
        from sftlab.gguf_export import check_type

        check_type(gguf)
    checkpoint, run_dir = _checkpoint(run)
    out = Path(output)
    here, there = out.resolve(), checkpoint.resolve()
    if here == there or there in here.parents or here in there.parents:
        raise ExportError(f"-o {out}: would write over the run itself or into its checkpoint; export to a new folder")
    started = time.perf_counter()
    info = read_run_info(checkpoint)
    say(f"loading {checkpoint} ({info.get('method', 'full')}{', merging the adapter' if info.get('method') == 'lora' else ''})")
    # fp32 whatever the run computed in: a LoRA adapter merges into the full-precision base
    model, tokenizer, _ = load_for_inference(str(checkpoint), torch.device("cpu"), precision="fp32")
    template = run_template(info, tokenizer)
    dtype = dtype or _base_dtype(info, model)
    model = model.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.chat_template = template.export_jinja  # the run's template_kwargs become its defaults
    tokenizer.save_pretrained(out)
    stop_ids = sorted(stop_tokens(tokenizer, model, template)[0])
    _generation_config(model, tokenizer, stop_ids, out)
    _run_files(checkpoint, run_dir, info, out)
    (out / "README.md").write_text(model_card(info, run_dir, dtype, stop_ids, tokenizer))
    written = {"folder": str(out), "dtype": dtype, "eos_token_id": stop_ids}
    if gguf is not None:
        from sftlab.gguf_export import write_gguf

        path = write_gguf(out, gguf, say=say)
        written["gguf"] = str(path)
        written["gguf_bytes"] = path.stat().st_size
        if ollama:
            from sftlab.gguf_export import write_modelfile

            written["modelfile"] = str(write_modelfile(out, path, template, tokenizer, stop_ids))
    written["seconds"] = round(time.perf_counter() - started, 2)
    return written


def _generation_config(model, tokenizer, stop_ids: list[int], out: Path) -> None:
    """eos_token_id: every token that ends a trained response (EOS and the template's end-of-turn
    token), so generation stops in transformers, vLLM and TGI as it does in sftlab."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig()
    config.eos_token_id = list(stop_ids)  # a list even of one: readers need not special-case it
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(out)


def _run_files(checkpoint: Path, run_dir: Path | None, info: dict, out: Path) -> None:
    """sftlab.json (now a merged, full model) and config.yaml: sftlab serve/chat/eval take the folder."""
    from sftlab.train.checkpoint import TEMPLATE_COPY

    exported = {**info, "method": "full", "exported_from": str(checkpoint), "trained_method": info.get("method")}
    if (checkpoint / TEMPLATE_COPY).is_file():
        shutil.copyfile(checkpoint / TEMPLATE_COPY, out / TEMPLATE_COPY)
    (out / "sftlab.json").write_text(json.dumps(exported, indent=2))
    if run_dir is not None:
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
        for name in ("data_report.json", "train_summary.json", "metrics.jsonl"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out / name)


def model_card(info: dict, run_dir: Path | None, dtype: str, stop_ids: list[int], tokenizer) -> str:
    """README.md: base model, method, template, data (rows from the data report), the config and
    the eval summary when the run has one."""
    lines = ["---", "library_name: transformers", f"base_model: {info.get('base_model', '')}", "tags: [sftlab, sft]",
             "---", "", f"# Fine-tuned from {info.get('base_model', 'a base model')} with sftlab", "",
             f"- method: {info.get('method', 'full')} (exported merged, {dtype})",
             f"- template: `{info.get('template')}` — the tokenizer's `chat_template` renders exactly the training "
             f"prompt; `apply_chat_template(messages, add_generation_prompt=True)` is the prompt to use",
             *([f"- template_kwargs: `{json.dumps(info['template_kwargs'])}` — written into the chat template as its "
                f"defaults (a caller's own values still win)"] if info.get("template_kwargs") else []),
             f"- training on: {info.get('train_on')} tokens, max_length {info.get('max_length')}",
             f"- generation stops at token ids {stop_ids} "
             f"({', '.join(repr(tokenizer.convert_ids_to_tokens(i)) for i in stop_ids)})", ""]
    report = _read_json(run_dir / "data_report.json") if run_dir else None
    if report:
        lines += ["## Data", "", "| file | rows read | rows used | dropped |", "|---|---|---|---|"]
        for source in report.get("sources", []):
            lines.append(f"| {source['path']} | {source['rows_read']:,} | {source['rows_used']:,} | {source['rows_dropped']:,} |")
        total = report.get("total", {})
        lines += ["", f"{total.get('trained_tokens', 0):,} trained tokens of {total.get('tokens', 0):,}.", ""]
    summary = _read_json(run_dir / "train_summary.json") if run_dir else None
    if summary:
        loss = lambda value: f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        lines += ["## Training", "", f"{summary.get('steps')} steps; held-out response loss "
                  f"{loss(summary.get('val_loss_before'))} -> {loss(summary.get('val_loss_after'))}; last training "
                  f"loss {loss(summary.get('final_train_loss'))}.", ""]
    evaluation = _read_json(run_dir / "eval" / "eval_report.json") if run_dir else None
    if evaluation:
        lines += ["## Evaluation (`sftlab eval`)", "", "| measure | base | tuned |", "|---|---|---|"]
        heldout = evaluation.get("heldout") or {}
        if "tuned" in heldout:
            lines.append(f"| held-out response loss | {heldout['base']['loss']:.4f} | {heldout['tuned']['loss']:.4f} |")
        following = evaluation.get("instruction_following") or {}
        if "tuned" in following:
            lines.append(f"| instruction following (prompt, strict) | {following['base'].get('prompt_strict')} | "
                         f"{following['tuned'].get('prompt_strict')} |")
        forgetting = evaluation.get("forgetting") or {}
        if "tuned" in forgetting:
            lines.append(f"| general-text perplexity | {forgetting['base']['perplexity']:.2f} | "
                         f"{forgetting['tuned']['perplexity']:.2f} |")
        lines.append("")
    config = (run_dir / "config.yaml").read_text() if run_dir and (run_dir / "config.yaml").is_file() else None
    if config:
        lines += ["## Run config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
