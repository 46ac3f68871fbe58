"""The benchmark runs end to end in quick mode, and both trainers optimise the same objective."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_runs_both_trainers_and_their_first_losses_agree(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--models", str(tiny_model_dir), "--methods", "full",
         "--trl-packing", "off", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "bench-quick.json").read_text())["results"]
    # a row for sftlab without and with activation checkpointing, against the same TRL run
    assert [r["sftlab_checkpointing"] for r in results] == ["off", "on"]
    assert results[0]["trl_best"] == results[1]["trl_best"]
    assert abs(results[0]["sftlab"]["final_loss"] - results[1]["sftlab"]["final_loss"]) < 1e-4  # same maths
    result = results[0]
    assert result["sftlab"]["tokens"] > 0 and result["trl_best"]["tokens"] > 0
    assert result["sftlab"]["peak_memory_mb"] > 0 and result["trl_best"]["peak_memory_mb"] > 0
    # same initial weights, same first batch, prompt masked in both: the same loss
    assert result["first_batch_loss_diff"] < 1e-3
    assert result["sftlab"]["first_batch_loss"] > 1.0  # a random model: a real loss, not zero
    table = (out / "bench-quick.md").read_text()
    assert "| full | off |" in table and "| full | on |" in table

    # both tools at the user's settings, as whole processes (loading and saving included)
    saved = json.loads((out / "user-settings-quick.json").read_text())
    user = saved["rows"]
    assert [r["precision"] for r in user] == ["fp32", "bf16"]  # both tools in each precision
    assert user[1]["sftlab"]["precision_line"] == "precision: bf16 (set in the config)"
    assert len(user[1]["sftlab"]["losses"]) == len(user[0]["sftlab"]["losses"]) > 0
    (gemm,) = saved["gemm"]  # the bf16 step against the matmul rate at its own shapes
    assert gemm["matmuls"] == 3 * (7 * 2 + 1) and 0 < gemm["share"] and gemm["flops_per_s"] > 0
    assert "sftlab bf16 against sftlab fp32" in (out / "user-settings-quick.md").read_text()
    ours, trl = user[0]["sftlab"], user[0]["trl"]
    assert ours["wall_s"] > 0 and trl["wall_s"] > 0 and trl["tokens"] > 0
    assert ours["peak_rss_mb"] > 100 and trl["peak_rss_mb"] > 100
    assert user[0]["memory_ratio"] == ours["peak_rss_mb"] / trl["peak_rss_mb"]
    phases = ours["memory"]["phases"]
    assert {"prepare data", "load model", "training steps", "save final"} <= set(phases)
    assert max(p["peak_mb"] for p in phases.values()) <= ours["memory"]["process_peak_mb"] + 1
    assert "Where sftlab's peak happens" in (out / "user-settings-quick.md").read_text()


@pytest.mark.slow
def test_ablation_mode_measures_each_variant(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--models", str(tiny_model_dir), "--methods", "full",
         "--ablate", "0,3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((out / "ablation-quick.json").read_text())["rows"]
    assert [r["variant"].split(" ")[0] for r in rows] == ["sftlab", "chunked"]
    assert rows[0]["throughput_vs_benchmarked"] == 1.0
    assert all(r["tokens"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    # the same steps on the same data: the same objective, whichever loss implementation
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 1e-4


@pytest.mark.slow
def test_the_gpu_bench_runs_its_tiny_cpu_mode(tmp_path):
    """bench/gpu.py, prepared for a CUDA machine, runs every row on CPU with a tiny model."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["packing"]) for r in rows] == [("full", False), ("full", True), ("lora", False), ("lora", True)]
    for r in rows:
        assert "error" not in r and r["steps"] == 2 and r["tokens_per_second"] > 0
        assert r["flops_per_token"] > 0 and r["loss_first"] > 5  # a random model's loss over 49k tokens
    assert rows[2]["flops_per_token"] < rows[0]["flops_per_token"]  # LoRA does no weight gradients
    assert "| tiny-llama | full | off |" in proc.stdout
