"""Interrupted runs, as they happen: SIGTERM (preemption) saves a checkpoint and exits 0; SIGKILL
at any moment, even in the middle of a save, loses at most the steps since the last complete
checkpoint; --resume then ends bit-identical to a run never interrupted. Broken checkpoints are
skipped, a changed config is refused unless --force, and a NaN loss stops naming the step and
its rows (or, with on_nan: skip, the step is skipped and counted)."""

import json
import random
import shutil

import pytest
import torch
from run_helpers import FIXTURES, metrics, sftlab_train, weights, write_config
from safetensors.torch import load_file

from sftlab.config import ConfigError, load_config
from sftlab.train.loop import NonFiniteLossError, train


def _same_as(straight, run) -> None:
    """Bit-identical on CPU: every logged loss and every final weight."""
    a, b = metrics(straight), metrics(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    wa, wb = weights(straight / "final"), weights(run / "final")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """A run of 8 steps never interrupted (checkpoints every step, as the interrupted ones)."""
    folder = tmp_path_factory.mktemp("straight")
    config = write_config(folder, tiny_model_dir, max_steps=8, save_steps=1, keep_last_checkpoints=2)
    proc = sftlab_train([str(config)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder / "run"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_matches(tiny_model_dir, tmp_path, straight_run):
    config = write_config(tmp_path, tiny_model_dir, max_steps=8, save_steps=1, keep_last_checkpoints=2)
    run = tmp_path / "run"
    # the process receives a real SIGTERM during step 3's bookkeeping (as from a cluster's scheduler)
    stopped = sftlab_train([str(config)], hook="if step == 3: os.kill(os.getpid(), signal.SIGTERM)")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "SIGTERM" in stopped.stdout and "stopped after step 3" in stopped.stdout
    assert "Resume with: sftlab train CONFIG --resume" in stopped.stdout
    assert (run / "latest").read_text() == "checkpoint-3" and (run / "checkpoint-3" / "manifest.json").is_file()
    assert not (run / "final").exists()
    assert json.loads((run / "train_summary.json").read_text())["interrupted"] == "SIGTERM"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]

    resumed = sftlab_train([str(config), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoint-3'} at step 3" in resumed.stdout.replace("\n", "")
    _same_as(straight_run, run)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tiny_model_dir, tmp_path, straight_run):
    """Killed three times — in the middle of writing a checkpoint, then twice at a random moment
    — and resumed each time: the same losses and weights as the run never interrupted."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=8, save_steps=1, keep_last_checkpoints=2)
    run = tmp_path / "run"
    # 1. SIGKILL while step 3's checkpoint is being written (its manifest is being hashed)
    during_save = ("if step == 3:\n    import sftlab.train.checkpoint as c\n"
                   "    c._sha256 = lambda path: os.kill(os.getpid(), signal.SIGKILL)")
    killed = sftlab_train([str(config)], hook=during_save)
    assert killed.returncode == -9
    assert (run / ".checkpoint-3.tmp").is_dir() and not (run / "checkpoint-3").exists()
    assert (run / "latest").read_text() == "checkpoint-2"

    # 2-3. resumed, and SIGKILLed again at a random moment of a random step (seeded, reproducible)
    rng = random.Random(12)
    for _ in range(2):
        last_saved = int((run / "latest").read_text().split("-")[1])
        step, delay = rng.randint(last_saved + 1, 7), rng.uniform(0.0, 0.05)
        at_random = (f"if step == {step}:\n    import threading\n"
                     f"    threading.Timer({delay}, os.kill, (os.getpid(), signal.SIGKILL)).start()")
        killed = sftlab_train([str(config), "--resume"], hook=at_random)
        assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
        assert not (run / "final").exists()

    resumed = sftlab_train([str(config), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _same_as(straight_run, run)


def _config(tiny_model_dir, run, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", f"data={FIXTURES / 'tiny_train.json'}", f"eval_data={FIXTURES / 'tiny_eval.json'}",
        f"output_dir={run}", "max_length=128", "batch_size=2", "max_steps=6", "save_steps=2",
        "keep_last_checkpoints=3", *extra,
    ])


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_skipped_and_a_changed_config_refused(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    config = _config(tiny_model_dir, run)
    train(config)
    uninterrupted = weights(run / "final")
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(run / "final")
    shard = next((run / "checkpoint-4" / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte on disk
    shard.write_bytes(bytes(data))

    # a changed key that changes what is trained: refused, naming the key and both values
    with pytest.raises(ConfigError) as error:
        train(_config(tiny_model_dir, run, "learning_rate=3e-4"), resume=True)
    assert "learning_rate: 2e-05 -> 0.0003" in str(error.value) and "--force" in str(error.value)
    # keys that change nothing trained may change freely (here: logging)
    result = train(_config(tiny_model_dir, run, "logging_steps=3"), resume=True)
    out = capsys.readouterr().out.replace("\n", "")
    assert f"skipping {run / 'checkpoint-4'}" in out and "does not match its checksum" in out
    assert f"resumed from {run / 'checkpoint-2'} at step 2" in out
    assert result.steps == 6
    resumed = weights(run / "final")
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


@pytest.mark.slow
def test_force_resumes_despite_a_changed_config(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(tiny_model_dir, run, "max_steps=4"))
    result = train(_config(tiny_model_dir, run, "max_steps=6"), resume=True, force=True)
    out = capsys.readouterr().out
    assert "resuming despite a changed config key (--force): max_steps: 4 -> 6" in out
    assert result.steps == 6 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


def _model_with_nan_token(tiny_model_dir, tmp_path, tokenizer, word: str):
    """The tiny model (output layer untied from the embedding) with the input embeddings of
    `word`'s tokens set to NaN: any row holding it gives a NaN loss, as a corrupt row would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = float("nan")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, ids


@pytest.mark.parametrize("on_nan", ["error", "skip"])
def test_a_nan_loss_names_the_step_and_its_rows_or_is_skipped(tiny_model_dir, tokenizer, tmp_path, on_nan):
    word = "\u2603\u2603"  # a snowman: bytes no other row holds
    rows = json.loads((FIXTURES / "tiny_train.json").read_text())
    rows[5]["output"] = f"{word} {rows[5]['output']}"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows, indent=1))
    model, ids = _model_with_nan_token(tiny_model_dir, tmp_path, tokenizer, word)
    config = load_config(overrides=[
        f"model={model}", f"data={data}", f"output_dir={tmp_path / 'run'}", "max_length=128", "batch_size=2",
        "num_epochs=1", f"on_nan={on_nan}", "group_by_length=false", "learning_rate=1e-3",
    ])
    if on_nan == "error":
        with pytest.raises(NonFiniteLossError) as error:
            train(config)
        message = str(error.value)
        assert message.startswith("step ") and "NaN/Inf" in message
        assert f"rows: {data}[5]" in message or f", {data}[5]" in message  # the poisoned row, by its place
        assert "on_nan: skip" in message
        failed_step = int(message.split()[1].rstrip(":"))
        logged = [r["step"] for r in metrics(tmp_path / "run")]
        assert logged == list(range(1, failed_step))  # nothing after the bad step
        return
    result = train(config)
    logged = metrics(tmp_path / "run")
    bad = [r["step"] for r in logged if r["loss"] != r["loss"]]  # NaN != NaN
    assert len(bad) == 1 and result.skipped_steps == 1 and result.steps == len(logged)
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["skipped_steps"] == 1
    # every other step trained: weights finite (but for the poisoned embedding rows) and changed
    before, after = load_file(model / "model.safetensors"), weights(tmp_path / "run" / "final")
    for name, tensor in after.items():
        if "embed_tokens" in name:
            keep = torch.ones(len(tensor), dtype=torch.bool)
            keep[ids] = False
            tensor = tensor[keep]
        assert torch.isfinite(tensor).all(), name
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
