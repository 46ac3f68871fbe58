"""Checkpoints: plain Hugging Face (full) or PEFT (LoRA) folders, plus what inference and
resume need — the template (sftlab.json) and the trainer state (optimizer, schedule, step)."""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from sftlab import __version__
from sftlab.config import RunConfig
from sftlab.models.loading import RUN_INFO_FILE

TRAINER_STATE_FILE = "trainer_state.pt"
TEMPLATE_COPY = "sftlab_template.jinja"


def run_info(config: RunConfig, tokenizer) -> dict:
    return {
        "sftlab_version": __version__,
        "template": config.template,
        "train_on": config.train_on,
        "base_model": config.model,
        "method": config.method,
        "max_length": config.max_length,
        "eos_token": tokenizer.eos_token,
    }


class StashedTokenizer:
    """A tokenizer written to a temporary folder once, so the live one can be freed.

    Training needs the tokenizer only to tokenize the data and, later, to save it beside each
    checkpoint; Gemma 3's 262k-entry tokenizer holds about 300 MB meanwhile. Saving copies the
    files ``save_pretrained`` wrote, so checkpoints hold exactly what they would otherwise."""

    def __init__(self, tokenizer):
        self.folder = Path(tempfile.mkdtemp(prefix="sftlab-tokenizer-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        tokenizer.save_pretrained(self.folder)
        self.eos_token = tokenizer.eos_token
        self.pad_token_id = tokenizer.pad_token_id

    def save_pretrained(self, folder: Path) -> None:
        for file in self.folder.iterdir():
            if file.is_file():
                shutil.copy2(file, Path(folder) / file.name)


def save_model(model, tokenizer, config: RunConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    info = run_info(config, tokenizer)
    template_file = Path(config.template)
    if config.template.endswith((".jinja", ".j2")) and template_file.is_file():
        # a custom template travels with the model, so inference renders exactly what training did
        (folder / TEMPLATE_COPY).write_text(template_file.read_text())
        info["template"] = TEMPLATE_COPY
    (folder / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))


def save_checkpoint(model, tokenizer, config, optimizer, scheduler, step: int, output_dir: Path) -> Path:
    """A resumable checkpoint; older ones beyond save_total_limit are removed."""
    folder = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, config, tmp)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / TRAINER_STATE_FILE,
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a killed save never leaves a checkpoint that looks complete
    for old in list_checkpoints(output_dir)[: -config.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def load_trainer_state(folder: Path, optimizer, scheduler) -> int:
    state = torch.load(folder / TRAINER_STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def verify_saved_template(folder: Path, samples, train_on: str) -> None:
    """Load the tokenizer and template from a saved checkpoint exactly as inference will, and
    check that their prompts tokenize like the training rows (TemplateConsistencyError if not)."""
    from transformers import AutoTokenizer

    from sftlab.data.templates import check_consistency, get_template
    from sftlab.models.loading import read_run_info

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = get_template(read_run_info(folder)["template"], tokenizer)
    for conversation in samples:
        check_consistency(template, tokenizer, conversation, train_on)
