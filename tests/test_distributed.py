"""Training on several processes (torchrun, gloo on CPU): 2 ranks train exactly what 1 rank trains
at the same global batch, with DDP and FSDP2, full and LoRA, packing on and off; checkpoints move
between world sizes (2 -> 1, 1 -> 2); only rank 0 writes; SIGTERM reaches every rank; a failing
rank stops the run with its message."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import ENV, metrics, sftlab_train, weights, write_config

pytestmark = pytest.mark.slow


def _same_run(one: Path, two: Path) -> None:
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]  # rank 0 alone logged, once a step
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]  # the same examples in every step
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        # the reduced gradient is the single process's (whose output layer and embedding gradients
        # bypass autograd): the same norm before clipping
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = weights(one / "final"), weights(two / "final")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


CASES = [("ddp", "full", False), ("ddp", "lora", True), ("fsdp", "full", True), ("fsdp", "lora", False)]


@pytest.mark.parametrize("parallelism,method,packing", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_train_exactly_what_one_rank_trains(tiny_model_dir, tmp_path, parallelism, method, packing):
    """2 ranks x batch 2 x 1 micro-batch against 1 rank x batch 2 x 2 micro-batches: the same
    global batch of 4, so the same examples, losses, gradients and final weights. With FSDP2,
    each run's step-2 checkpoint is then resumed on the other world size."""
    keys = {"method": method, "packing": packing, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_steps": 4,
            "save_steps": 2, "keep_last_checkpoints": 1, "parallelism": parallelism}
    one = write_config(tmp_path / "one", tiny_model_dir, gradient_accumulation_steps=2, **keys)
    two = write_config(tmp_path / "two", tiny_model_dir, gradient_accumulation_steps=1, **keys)
    single = sftlab_train([str(one)])
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    double = sftlab_train([str(two)], nproc=2)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    assert f"parallelism: {parallelism.upper()} on 2 processes" in double.stdout
    assert "global batch: 4 (2 x 1 accumulation x 2 processes)" in double.stdout
    _only_rank_0_wrote(tmp_path / "two" / "run")
    _same_run(tmp_path / "one" / "run", tmp_path / "two" / "run")
    final = tmp_path / "two" / "run" / "final"
    if method == "lora":  # a normal PEFT adapter
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
        assert not (final / "model.safetensors").exists()
    else:  # plain transformers loads it
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)
    if parallelism != "fsdp":
        return
    # the sharded checkpoints move between world sizes: 2 ranks' resumed on 1 rank, 1 rank's on 2
    # (at the same global batch: no --force needed); both end where the straight runs end
    reference = weights(tmp_path / "one" / "run" / "final")
    for run, nproc, config in ((tmp_path / "two" / "run", 1, one), (tmp_path / "one" / "run", 2, two)):
        assert (run / "checkpoint-2" / "manifest.json").is_file() and (run / "latest").read_text() == "checkpoint-2"
        shutil.rmtree(run / "final")
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "output_dir": str(run)}))
        resumed = sftlab_train([str(config), "--resume"], nproc=nproc)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
        assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
        moved = weights(run / "final")
        for key in reference:
            assert torch.allclose(reference[key], moved[key], atol=1e-5), key


def _only_rank_0_wrote(run: Path) -> None:
    """One writer: one metrics line a step (checked by _same_run), one TensorBoard log, one report."""
    assert len(list((run / "tensorboard").glob("events.*"))) == (1 if importlib.util.find_spec("tensorboard") else 0)
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
        "config.yaml", "data_report.json", "latest", "metrics.jsonl", "status.json", "train_summary.json"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["total_steps"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert [r["rank"] for r in summary["memory"]["ranks"]] == [0, 1]


def test_the_nproc_shortcut_starts_torchrun_and_passes_it_sigterm(tiny_model_dir, tmp_path):
    """`sftlab train --nproc 2` trains on 2 ranks; SIGTERM to it (a cluster's preemption) reaches
    both workers, which finish the step, save a checkpoint together and exit 0."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=100000, logging_steps=1, eval_data=None)
    proc = subprocess.Popen(command_line := [sys.executable, "-m", "sftlab", "train", str(config), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{command_line}: {output[-3000:]}"
    assert "on 2 processes" in output and "Resume with: sftlab train CONFIG --resume" in output
    step = metrics(tmp_path / "run")[-1]["step"]
    assert 2 <= step < 100000
    checkpoint = tmp_path / "run" / f"checkpoint-{step}"
    assert (checkpoint / "manifest.json").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, max_steps=20)
    started = time.monotonic()
    hook = "if rank == 1 and step == 1: raise ValueError('boom from rank 1 after step 1')"
    proc = sftlab_train([str(config)], nproc=2, hook=hook, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - started < 90  # not a collective timeout (30 min by default)
    assert "boom from rank 1 after step 1" in proc.stdout + proc.stderr
    assert len(metrics(tmp_path / "run")) <= 2  # rank 0 stopped too
