"""End to end through the `sftlab` command on the real default model (SmolLM2-135M-Instruct)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sftlab(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "sftlab", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"sftlab {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.e2e
def test_pull_lora_train_load_with_peft_and_generate(smollm2_dir, tmp_path):
    listing = sftlab("models", "list", check=True).stdout
    assert "smollm2-135m-instruct" in listing
    assert str(smollm2_dir) in sftlab("models", "pull", "smollm2-135m-instruct").stdout.replace("\n", "")
    run = tmp_path / "lora-run"
    sftlab("train", "examples/demo.yaml", "--set", "method=lora", "--set", "max_steps=2", "--set", "batch_size=2",
           "--set", "max_length=128", "--set", f"output_dir={run}", "--set", "eval_data=[]")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["tokens"] > 0 for m in metrics)

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    assert any("lora_A" in name for name, _ in model.named_parameters())

    out = sftlab("generate", str(run), "-i", "Name three primary colours.", "--max-new-tokens", "24")
    assert len(out.stdout.strip()) > 0


@pytest.mark.e2e
def test_prepare_and_inspect_write_their_files(tmp_path):
    out = sftlab("prepare", "examples/demo.yaml", "--set", f"output_dir={tmp_path}")
    report = json.loads((tmp_path / "data_report.json").read_text())
    rows = {name: len(json.loads((ROOT / "examples" / "data" / name).read_text()))
            for name in ("alpaca_demo.json", "if_demo.json", "alpaca_demo_eval.json")}
    assert rows["alpaca_demo.json"] == 320 and rows["if_demo.json"] >= 200
    assert report["total"]["rows_read"] == sum(rows.values()) and report["total"]["rows_dropped"] == 0
    assert report["split"]["train_rows"] == rows["alpaca_demo.json"] + rows["if_demo.json"]
    assert "data report" in out.stdout
    sftlab("inspect", "examples/demo.yaml", "-n", "2", "--set", f"output_dir={tmp_path}")
    html = (tmp_path / "inspect.html").read_text()
    assert html.count("<section>") == 2 and 'class="t"' in html


@pytest.mark.slow
def test_cli_errors_are_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: smollm2-135m-instruct\n")
    result = sftlab("train", str(bad), check=False)
    assert result.returncode == 1
    assert "unknown config key 'modle'" in result.stdout and "Did you mean 'model'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # A long path must not be broken across lines: "FILE:LINE: what" stays one greppable piece.
    (tmp_path / ("deep" * 20)).mkdir()
    data = tmp_path / ("deep" * 20) / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    result = sftlab("prepare", "examples/demo.yaml", "--set", f"data={data}", "--set", f"output_dir={tmp_path}", check=False)
    assert result.returncode == 1 and f"{data}:2: missing field 'output'" in result.stdout
