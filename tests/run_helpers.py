"""Running `sftlab train` as users do (a subprocess, or torchrun with N ranks) and reading its run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


def write_config(folder: Path, tiny_model_dir: Path, **keys) -> Path:
    config = {"model": str(tiny_model_dir), "data": str(FIXTURES / "tiny_train.json"),
              "eval_data": str(FIXTURES / "tiny_eval.json"), "max_length": 128, "max_steps": 3,
              "learning_rate": 1e-4, "batch_size": 2, "output_dir": str(folder / "run"), "seed": 0,
              "precision": "fp32", **keys}  # the exact equalities of these tests hold in fp32
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(args: list[str], nproc: int = 1, script: str | None = None) -> list[str]:
    """`sftlab train ARGS` (or SCRIPT ARGS, a wrapper that ends by calling sftlab's main)."""
    target = [script] if script else ["-m", "sftlab", "train"]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target, *args]


def sftlab_train(args: list[str], nproc: int = 1, timeout: int = 300, script: str | None = None,
                 hook: str | None = None) -> subprocess.CompletedProcess:
    """Run it; with `hook`, through the HOOKED wrapper (written to a temporary folder)."""
    if hook is None:
        return subprocess.run(command(args, nproc, script), check=False, capture_output=True, text=True, timeout=timeout, env=ENV)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "hooked.py"
        script.write_text(HOOKED)
        return subprocess.run(command(args, nproc, str(script)), check=False, capture_output=True, text=True, timeout=timeout,
                              env={**ENV, "SFTLAB_TEST_HOOK": hook})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(final: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(final / name)


# A wrapper around `sftlab train` that runs HOOK (Python, with `step` bound) after each step's
# log line — e.g. to send the process a real signal at a chosen step — then calls sftlab's main.
HOOKED = r"""
import os, signal, sys
import sftlab.train.log as log

original = log.RunLog.advance


def advance(self, step):
    original(self, step)
    rank = int(os.environ.get("RANK", "0"))
    exec(os.environ["SFTLAB_TEST_HOOK"])


log.RunLog.advance = advance
from sftlab.cli import main

sys.argv = ["sftlab", "train", *sys.argv[1:]]
main()
"""

