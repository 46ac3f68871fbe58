"""Mixed precision: what `auto` picks and why, bf16 against fp32 within stated tolerances (the
exact equalities of the other tests hold in fp32, which they pin), resume bit-exact in bf16 too,
LoRA's frozen base stored in bf16, and fp16 with its loss scaler."""

import json
from pathlib import Path

import pytest
import torch
from run_helpers import metrics, sftlab_train, weights, write_config

from sftlab import precision
from sftlab.config import load_config
from sftlab.train.loop import train

FIXTURES = Path(__file__).parent / "fixtures"


def _config(tiny_model_dir, tmp_path, *extra):
    return load_config(overrides=[f"model={tiny_model_dir}", f"data={FIXTURES / 'tiny_train.json'}",
                                  f"output_dir={tmp_path}", "max_length=128", "max_steps=4", "batch_size=4",
                                  "learning_rate=1e-3", "warmup_ratio=0", "eval_data=null", *extra])


def test_auto_follows_what_the_hardware_multiplies(monkeypatch):
    cpu = torch.device("cpu")
    native, why = precision.cpu_bf16_support()
    assert precision.resolve("auto", cpu).name == ("bf16" if native else "fp32")
    assert why in precision.resolve("auto", cpu).reason  # it says which and why
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "the CPU has neither AMX nor AVX512-BF16"))
    assert precision.resolve("auto", cpu) == precision.Precision("fp32", "auto: the CPU has neither AMX nor AVX512-BF16")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "the CPU has AMX"))
    assert precision.resolve("auto", cpu).name == "bf16"
    assert precision.resolve("fp32", cpu) == precision.Precision("fp32", "set in the config")


def test_the_cpu_flags_decide(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo.write_text("processor: 0\nflags\t\t: fpu sse avx2\n")
    assert not precision.cpu_bf16_support()[0]
    cpuinfo.write_text("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert precision.cpu_bf16_support() == (True, "the CPU has AVX512-BF16")
    cpuinfo.write_text("processor: 0\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n")
    assert precision.cpu_bf16_support()[0] and "AMX" in precision.cpu_bf16_support()[1]


def test_bf16_steps_stay_within_1_percent_of_fp32(tiny_model_dir, tmp_path):
    runs = {p: train(_config(tiny_model_dir, tmp_path / p, f"precision={p}", "group_by_length=false")) for p in ("fp32", "bf16")}
    fp32, bf16 = (metrics(tmp_path / p) for p in ("fp32", "bf16"))
    assert [r["tokens"] for r in fp32] == [r["tokens"] for r in bf16]
    for a, b in zip(fp32, bf16):
        assert abs(b["loss"] - a["loss"]) / a["loss"] < 0.01, (a["loss"], b["loss"])
    assert runs["bf16"].steps == 4


def test_lora_stores_its_frozen_base_in_bf16_and_trains_fp32_adapters(tiny_model_dir, tmp_path):
    from sftlab.train.loop import build_model

    config = _config(tiny_model_dir, tmp_path, "method=lora", "precision=bf16")
    with precision.use(precision.resolve("bf16", torch.device("cpu")), torch.device("cpu")):
        model = build_model(config, torch.device("cpu"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    result = train(config)
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path))


def test_fp16_trains_with_a_loss_scaler(tiny_model_dir, tmp_path):
    train(_config(tiny_model_dir, tmp_path / "fp16", "precision=fp16", "group_by_length=false"))
    train(_config(tiny_model_dir, tmp_path / "fp32", "precision=fp32", "group_by_length=false"))
    fp16, fp32 = metrics(tmp_path / "fp16"), metrics(tmp_path / "fp32")
    assert abs(fp16[0]["loss"] - fp32[0]["loss"]) / fp32[0]["loss"] < 0.01
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fp16)


@pytest.mark.slow
def test_bf16_resume_is_bit_identical(tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "straight", tiny_model_dir, max_steps=6, save_steps=1, precision="bf16")
    assert sftlab_train([str(config)]).returncode == 0
    interrupted = write_config(tmp_path / "stopped", tiny_model_dir, max_steps=6, save_steps=1, precision="bf16")
    stopped = sftlab_train([str(interrupted)], hook="if step == 3: os.kill(os.getpid(), signal.SIGTERM)")
    assert stopped.returncode == 0 and "stopped after step 3" in stopped.stdout
    resumed = sftlab_train([str(interrupted), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = metrics(tmp_path / "straight" / "run"), metrics(tmp_path / "stopped" / "run")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa, wb = weights(tmp_path / "straight" / "run" / "final"), weights(tmp_path / "stopped" / "run" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "stopped" / "run" / "final" / "sftlab.json").read_text())["precision"] == "bf16"
