"""examples/sweep.py: each point trains and evaluates with sftlab's own commands, the table holds
their numbers, a finished point is not run again, and a bad point is refused before training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "examples" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_bad_point_is_refused_with_the_expected_form():
    sweep = _sweep()
    assert sweep.parse_point("lora:2e-4:2") == ("lora", "2e-4", "2")
    for bad in ("lora:2e-4", "qlora:1e-4:1", "full:fast:1", "full:1e-5:one"):
        with pytest.raises((SystemExit, ValueError)):
            sweep.parse_point(bad)


@pytest.mark.slow
def test_sweep_trains_evaluates_and_tabulates_each_point_once(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_HOME", str(tmp_path / "home"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": [str(FIXTURES / "tiny_train.json")],
        "eval_data": [str(FIXTURES / "tiny_eval.json")], "max_steps": 2, "max_length": 128, "batch_size": 4,
        "warmup_ratio": 0, "output_dir": str(tmp_path / "unused"),
    }))
    runs = tmp_path / "runs"
    options = "--limit 2 --max-new-tokens 4 --side-by-side 0 --corpus-samples 1 --corpus-tokens 8"
    sweep = _sweep()
    sweep.main([str(config), "--runs", str(runs), "--point", "full:1e-3:1", "--point", "lora:1e-3:1", "--eval", options])
    records = json.loads((runs / "sweep.json").read_text())
    assert [(r["method"], r["learning_rate"], r["epochs"]) for r in records] == [("full", 1e-3, 1), ("lora", 1e-3, 1)]
    for r, name in zip(records, ("full-1e-3-1ep", "lora-1e-3-1ep")):
        report = json.loads((runs / name / "eval" / "eval_report.json").read_text())
        assert r["heldout_loss"]["tuned"] == report["heldout"]["tuned"]["loss"]
        assert r["perplexity_change"] == report["forgetting"]["relative_change"]
        assert json.loads((runs / name / "final" / "sftlab.json").read_text())["method"] == r["method"]
        assert r["steps"] == 2 and r["prompts"] == 2
    assert records[1]["base_reused"] != []  # the second point reused the base model's text
    table = (runs / "sweep.md").read_text()
    assert table.count("\n") == 4 and "| lora | 0.001 | 1 | 2 |" in table

    final = runs / "full-1e-3-1ep" / "final"
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    sweep.main([str(config), "--runs", str(runs), "--point", "full:1e-3:1", "--eval", options])
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before  # not trained again
    assert json.loads((runs / "sweep.json").read_text()) == records[:1]
