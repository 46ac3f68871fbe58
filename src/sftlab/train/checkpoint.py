"""Checkpoints: what inference needs (a plain Hugging Face or PEFT folder, the template) and
what resume needs (model + optimizer state, schedule, step, random state of every rank).

A resumable checkpoint ``checkpoint-N/`` holds

- ``state/``: model (LoRA: adapters only) and optimizer state written with
  ``torch.distributed.checkpoint`` — each rank writes its own shards, nothing is gathered in one
  rank's memory, and the checkpoint loads under any world size (2 ranks -> 1, 1 -> 2);
- ``trainer_state.json``: step, scheduler, the resolved config and its hash, the world size;
- ``rng-RANK.pt``: Python and torch (CPU, CUDA) random state of each rank;
- the tokenizer and ``sftlab.json`` (template, base model, method);
- ``manifest.json``, written last: the size and SHA-256 of every other file.

Saving is atomic: everything goes to ``.checkpoint-N.tmp/``, which is renamed into place once
every rank has finished, and ``latest`` is updated after that. A checkpoint whose manifest is
missing or does not match its files is skipped with a warning on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from sftlab import __version__
from sftlab.config import RunConfig
from sftlab.models.loading import RUN_INFO_FILE
from sftlab.train.status import MANIFEST, list_checkpoints

TEMPLATE_COPY = "sftlab_template.jinja"


def run_info(config: RunConfig, tokenizer) -> dict:
    return {
        "sftlab_version": __version__,
        "template": config.template,
        "template_kwargs": dict(config.template_kwargs),
        "train_on": config.train_on,
        "train_reasoning": config.train_reasoning,
        "train_empty_think": config.train_empty_think,
        "special_tokens_in_content": config.special_tokens_in_content,
        "tool_parser": config.tool_parser,
        "base_model": config.model,
        "method": config.method,
        "precision": config.precision,
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


def save_model(model, tokenizer, config: RunConfig, folder: Path, state_dict: dict | None = None) -> None:
    """A plain Hugging Face (full) or PEFT (LoRA) folder, with the tokenizer and sftlab.json."""
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(folder)
    save_run_files(tokenizer, config, folder)


def save_run_files(tokenizer, config: RunConfig, folder: Path) -> None:
    """sftlab.json beside a model (and a custom template, which travels with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = run_info(config, tokenizer)
    if config.tool_parser == "auto" and hasattr(tokenizer, "convert_tokens_to_ids"):  # the resolved parser is recorded
        from sftlab.data.templates import TemplateError, get_template
        from sftlab.infer.tools import choose_parser

        try:
            info["tool_parser"] = choose_parser(get_template(config.template, tokenizer, config.template_kwargs or None))
        except TemplateError:
            pass
    template_file = Path(config.template)
    if config.template.endswith((".jinja", ".j2")) and template_file.is_file():
        # a custom template travels with the model, so inference renders exactly what training did
        (folder / TEMPLATE_COPY).write_text(template_file.read_text())
        info["template"] = TEMPLATE_COPY
    (folder / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))


# -- resumable checkpoints ------------------------------------------------------------------------

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"

# keys that change nothing in what is trained: a resume may change them freely
RESUME_SAFE_KEYS = {
    "output_dir", "logging_steps", "save_steps", "keep_last_checkpoints", "eval_steps", "save_best",
    "early_stopping_patience", "micro_batch_tokens", "gradient_checkpointing", "compile", "loss_impl",
    "fused_optimizer", "embedding_grad_in_place", "parallelism", "fsdp_cpu_offload", "device", "cache",
    "on_nan", "num_proc",
}


def config_fingerprint(config: RunConfig, world_size: int) -> dict:
    """What decides the training: the config less RESUME_SAFE_KEYS, with the global batch in
    place of gradient_accumulation_steps (1 rank x 2 accumulation trains what 2 ranks x 1 do, so
    a run may resume on another number of processes at the same global batch)."""
    data = config.model_dump(mode="json")
    data["learning_rate"] = config.resolved_learning_rate
    data["global_batch"] = config.batch_size * config.gradient_accumulation_steps * world_size
    return {k: v for k, v in data.items() if k not in RESUME_SAFE_KEYS | {"gradient_accumulation_steps"}}


def config_hash(config: RunConfig, world_size: int) -> str:
    return hashlib.sha256(json.dumps(config_fingerprint(config, world_size), sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is
    the intended case for a one-process run, not news for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _state_options(config: RunConfig):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base weights are the base model's; only the adapters are saved, and
    # loading leaves the base weights alone (dcp.load itself fails on a missing adapter key)
    lora = config.method == "lora"
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def save_checkpoint(module, optimizer, scheduler, step: int, config: RunConfig, tokenizer, world,
                    output_dir: Path, progress: dict | None = None) -> Path:
    """Every rank writes its shards and random state; rank 0 writes the rest, the manifest, and
    renames the folder into place. Older checkpoints beyond keep_last_checkpoints are removed.
    `progress` (best validation loss so far, skipped steps, ...) comes back from load_checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    model_state, optim_state = get_state_dict(module, optimizer, options=_state_options(config))
    with _quiet_single_process():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "state"))
    torch.save(_rng_state(world.device), tmp / f"rng-{world.rank}.pt")
    if world.is_main:
        trainer_state = {
            "step": step, "scheduler": scheduler.state_dict(), "world_size": world.size,
            "config_hash": config_hash(config, world.size), "config": config_fingerprint(config, world.size), "sftlab_version": __version__,
            "progress": progress or {},
        }
        from sftlab import precision

        if precision.scaler() is not None:  # fp16's loss scale resumes where it was
            trainer_state["grad_scaler"] = precision.scaler().state_dict()
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        tokenizer.save_pretrained(tmp)
        save_run_files(tokenizer, config, tmp)
    world.barrier()  # every rank's shards and random state are on disk
    if world.is_main:
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # a killed save never leaves a checkpoint that looks complete
        _write_atomically(output_dir / LATEST, folder.name)
        for old in list_checkpoints(output_dir)[: -config.keep_last_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return folder


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when its manifest matches every file)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    if set(manifest) - present:
        return f"missing files: {', '.join(sorted(set(manifest) - present)[:3])}"
    for name, entry in manifest.items():
        path = folder / name
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resumable(output_dir: Path, warn) -> Path | None:
    """The newest complete checkpoint; broken ones are named through `warn` and skipped."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warn(f"skipping {folder}: {problem}")
    return None


def check_resume_config(folder: Path, config: RunConfig, force: bool, world_size: int = 1) -> list[str]:
    """The config keys that changed since the checkpoint (an error unless force)."""
    from sftlab.config import ConfigError

    saved = json.loads((folder / TRAINER_STATE).read_text())["config"]
    current = config_fingerprint(config, world_size)
    changed = [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
               if saved.get(key) != current.get(key)]
    if changed and not force:
        raise ConfigError(
            f"{folder}: the config changed since this checkpoint, so resuming would not continue the same run:\n  "
            + "\n  ".join(changed) + "\nRestore those keys, or pass --force to resume anyway."
        )
    return changed


def load_checkpoint(folder: Path, module, optimizer, scheduler, config: RunConfig, world) -> tuple[int, dict]:
    """Model, optimizer, schedule and this rank's random state from `folder`; returns the step
    and the progress saved with it. The shards are resharded to this run's world size and
    parallelism by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _state_options(config)
    model_state, optim_state = get_state_dict(module, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(folder / "state"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    from sftlab import precision

    if precision.scaler() is not None and trainer_state.get("grad_scaler"):
        precision.scaler().load_state_dict(trainer_state["grad_scaler"])
    rng_file = folder / f"rng-{world.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    else:  # a rank the saving run did not have: a seeded state of its own
        random.seed(config.seed * 1000 + world.rank)
        torch.manual_seed(config.seed * 1000 + world.rank + trainer_state["step"])
    return int(trainer_state["step"]), trainer_state.get("progress", {})


def verify_saved_template(folder: Path, samples, train_on: str) -> None:
    """Load the tokenizer and template from a saved checkpoint exactly as inference will, and
    check that their prompts tokenize like the training rows (TemplateConsistencyError if not)."""
    from transformers import AutoTokenizer

    from sftlab.data.templates import check_consistency, run_template
    from sftlab.models.loading import read_run_info

    tokenizer = AutoTokenizer.from_pretrained(folder)
    info = read_run_info(folder)
    template = run_template(info, tokenizer)
    options = {"train_reasoning": info.get("train_reasoning", True), "train_empty_think": info.get("train_empty_think", False)}
    for conversation in samples:
        check_consistency(template, tokenizer, conversation, train_on, **options)
