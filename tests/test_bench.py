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
    user = json.loads((out / "user-settings-quick.json").read_text())["rows"]
    assert len(user) == 1
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
