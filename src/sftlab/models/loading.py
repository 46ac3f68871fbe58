"""Load a model + tokenizer for training or inference, with the device chosen, never assumed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftlab.errors import ResourceError
from sftlab.models.convert import resolve_model

RUN_INFO_FILE = "sftlab.json"  # written beside every checkpoint: template, base model, method


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ResourceError("device: cuda was asked for but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS labels are
        # decided by position (offsets), never by comparing ids to the pad id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM. On CUDA, SDPA attention; weights stay fp32 for training (bf16 autocast)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    kwargs = {"dtype": dtype}
    if device is not None and device.type == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return lm.to(device) if device is not None else lm


def find_checkpoint(path: str | Path) -> Path | None:
    """A run directory or checkpoint folder -> the folder holding sftlab.json (None if neither)."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / RUN_INFO_FILE).is_file():
            return candidate
    return None


def run_config_dir(checkpoint: Path) -> Path | None:
    """The folder holding the run's config.yaml: the checkpoint itself (an exported model) or the
    run directory above it (final/); None when neither has it."""
    return next((f for f in (checkpoint, checkpoint.parent) if (f / "config.yaml").is_file()), None)


def read_run_info(checkpoint: Path) -> dict:
    info = json.loads((checkpoint / RUN_INFO_FILE).read_text())
    if str(info.get("template", "")).endswith((".jinja", ".j2")):  # a custom template saved beside the model
        info["template"] = str(checkpoint / info["template"])
    return info


def load_for_inference(model_or_run: str, device: torch.device | None = None, precision: str | None = None):
    """(model, tokenizer, run_info) for a run directory, a checkpoint folder or a plain model.

    run_info is {} for a plain model; for a run it holds the template it trained with, so
    inference formats prompts exactly as training did. LoRA adapters are merged for speed. The
    weights are loaded in the compute dtype of `precision` (default: the run's `precision`, auto
    for a plain model) on this device: bf16 where the hardware multiplies it natively.
    """
    from transformers import AutoTokenizer

    from sftlab.precision import inference_dtype

    device = device or pick_device()
    checkpoint = find_checkpoint(model_or_run)
    if checkpoint is None:
        dtype = inference_dtype(precision or "auto", device)
        return load_causal_lm(model_or_run, device, dtype).eval(), load_tokenizer(model_or_run), {}
    info = read_run_info(checkpoint)
    dtype = inference_dtype(precision or info.get("precision", "auto"), device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if info.get("method") == "lora":
        from peft import PeftModel

        base = load_causal_lm(info["base_model"], device, dtype)
        lm = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
    else:
        lm = load_causal_lm(str(checkpoint), device, dtype)
    return lm.eval(), tokenizer, info
