"""`sftlab eval` on a tiny run: the held-out loss is the training objective, KL, forgetting,
the report (curves + tables), the lm-eval bridge on the local task, and the CLI end to end."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sftlab.config import load_config
from sftlab.data.batching import collate
from sftlab.data.prepare import prepare_data
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.eval import run_eval
from sftlab.eval.measures import (heldout_examples, mean_kl, read_corpus, response_loss,
                                  sample_continuations, text_examples, text_perplexity)
from sftlab.train.batches import EvalBatches
from sftlab.train.loop import train
from sftlab.train.loss import token_loss_sum
from conftest import write_json

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config(overrides=[
        f"model={tiny_model_dir}", f"data={FIXTURES / 'tiny_train.json'}", f"eval_data={FIXTURES / 'tiny_eval.json'}",
        f"output_dir={out}", "max_steps=2", "max_length=128", "batch_size=4", "learning_rate=1e-3", "warmup_ratio=0",
    ]))
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "train_summary.json").read_text())


@pytest.mark.slow
def test_heldout_loss_is_the_training_objective_on_the_same_batch(tiny_run, tokenizer):
    config = load_config(tiny_run / "config.yaml")
    examples, where = heldout_examples(config, tokenizer)
    assert len(examples) == 3 and "tiny_eval.json" in where
    # masked exactly as in training: the very examples prepare_data gives the training loop
    def ids_and_labels(items):
        return [(list(map(int, e.input_ids)), list(map(int, e.labels))) for e in items]

    assert ids_and_labels(examples) == ids_and_labels(prepare_data(config, tokenizer).val)
    assert all(e.labels[0] == IGNORE_INDEX for e in examples)
    # --data with the same file gives the same examples
    again, _ = heldout_examples(config, tokenizer, FIXTURES / "tiny_eval.json")
    assert ids_and_labels(again) == ids_and_labels(examples)

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final")
    with torch.no_grad():
        summed, count = token_loss_sum(model, collate(examples, tokenizer.pad_token_id))
    result = response_loss(model, examples, tokenizer.pad_token_id, CPU, batch_size=2)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(float(summed) / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.exp(torch.tensor(result["loss"])).item(), rel=1e-5)
    # and it is the validation loss the run logged after training
    assert result["loss"] == pytest.approx(_summary(tiny_run)["val_loss_after"], rel=1e-5)


def _reference_kl(base, tuned, batch) -> float:
    """KL(base || tuned) from the full logits, at every position with a next token."""
    with torch.no_grad():
        p = F.log_softmax(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
        q = F.log_softmax(tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    mask = batch["attention_mask"][:, 1:].bool()
    return float(kl[mask].mean())


@pytest.mark.slow
def test_kl_is_zero_for_identical_models_and_positive_after_training(tiny_run, tiny_model_dir, tokenizer):
    config = load_config(tiny_run / "config.yaml")
    examples, _ = heldout_examples(config, tokenizer)
    batches = EvalBatches(examples, 2, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_run / "final")

    same = mean_kl(base, copy, batches, CPU, chunk_size=5)
    assert same["kl"] == 0.0 and same["kl_response"] == 0.0 and same["kl_prompt"] == 0.0
    assert same["tokens"] == sum(len(e) - 1 for e in examples)
    assert same["response_tokens"] == sum(e.trained_token_count for e in examples)

    moved = mean_kl(base, tuned, batches, CPU, chunk_size=5)  # chunks smaller than the token count
    assert moved["kl"] > 0 and moved["kl_response"] > 0 and moved["kl_prompt"] > 0
    batch = collate(examples, tokenizer.pad_token_id)
    assert moved["kl"] == pytest.approx(_reference_kl(base, tuned, batch), rel=1e-4)
    # far apart (much sharper logits), the direction matters: KL(base || other) != KL(other || base)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(40.0)
    far = mean_kl(base, other, batches, CPU)["kl"]
    assert far == pytest.approx(_reference_kl(base, other, batch), rel=1e-4)
    assert abs(far - _reference_kl(other, base, batch)) > 1e-3 * far


def test_text_chunks_perplexity_and_reproducible_samples(tiny_model_dir, tokenizer, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The river runs to the sea.\n\nBirds fly south in the autumn when the days grow short.\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "The river runs to the sea."}\n{"text": "Birds fly south in the autumn when the days grow short."}\n')
    assert read_corpus(text) == read_corpus(jsonl) == ["The river runs to the sea.",
                                                       "Birds fly south in the autumn when the days grow short."]
    chunks = text_examples(read_corpus(text), tokenizer, block_size=5)
    assert all(2 <= len(c) <= 5 and c.labels == c.input_ids for c in chunks)
    expected = []
    for t in read_corpus(text):  # each text on its own, cut into blocks; a 1-token tail has no target
        ids = tokenizer(t)["input_ids"]
        expected += [tuple(ids[i:i + 5]) for i in range(0, len(ids), 5) if len(ids[i:i + 5]) >= 2]
    assert [tuple(c.input_ids) for c in chunks] == expected and len(expected) >= 3

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = text_perplexity(model, chunks, tokenizer.pad_token_id, CPU)
    assert result["tokens"] == sum(len(c) - 1 for c in chunks)
    assert result["perplexity"] == pytest.approx(torch.exp(torch.tensor(result["loss"])).item(), rel=1e-5)

    prompts = ["The old bridge", "Mountains form when"]
    first = sample_continuations(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert first == sample_continuations(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert all(t.startswith(p) for t, p in zip(first, prompts))


def test_base_answers_are_reused_across_evals_until_the_base_or_the_settings_change(tiny_run, tiny_model_dir,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_HOME", str(tmp_path / "home"))
    options = dict(limit=3, max_new_tokens=5, corpus_samples=2, corpus_tokens=10, side_by_side=1)
    first = run_eval(tiny_run, output=tmp_path / "1", **options)
    assert first["base"]["reused"] == []
    second = run_eval(tiny_run, output=tmp_path / "2", **options)
    assert second["base"]["reused"] == ["instruction_following", "forgetting_corpus", "side_by_side"]
    base = [r["base"]["response"] for r in first["instruction_following"]["responses"]]
    assert [r["base"]["response"] for r in second["instruction_following"]["responses"]] == base
    assert second["instruction_following"]["base"]["prompt_strict"] == first["instruction_following"]["base"]["prompt_strict"]
    assert second["forgetting"]["texts"] == first["forgetting"]["texts"]
    assert second["forgetting"]["base"] == first["forgetting"]["base"]  # perplexity recomputed on the same texts
    assert [p["base"] for p in second["side_by_side"]] == [p["base"] for p in first["side_by_side"]]

    assert run_eval(tiny_run, output=tmp_path / "3", cache=False, **options)["base"]["reused"] == []
    longer = run_eval(tiny_run, output=tmp_path / "4", **{**options, "max_new_tokens": 6})
    assert longer["base"]["reused"] == ["forgetting_corpus"]  # the answers depend on max_new_tokens; the corpus not
    weights = next(tiny_model_dir.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the base model's files changed
    try:
        assert run_eval(tiny_run, output=tmp_path / "5", **options)["base"]["reused"] == []
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_run_eval_writes_json_and_html_with_curves_tables_and_escaped_answers(tiny_run, tmp_path):
    data = write_json(tmp_path / "held.json", [
        {"instruction": "Reply with <b>bold</b> & more.", "input": "", "output": "<script>alert(1)</script>"},
        {"instruction": "Name a colour.", "input": "a fruit", "output": "Yellow."},
    ])
    out = tmp_path / "report"
    report = run_eval(tiny_run, data=data, limit=4, max_new_tokens=6, corpus_samples=2, corpus_tokens=12,
                      side_by_side=2, forgetting_threshold=-1.0, output=out)
    saved = json.loads((out / "eval_report.json").read_text())
    assert saved["heldout"] == report["heldout"] and saved["heldout"]["rows"] == 2
    assert report["heldout"]["base"]["tokens"] == report["heldout"]["tuned"]["tokens"] > 0
    follow = report["instruction_following"]
    assert follow["prompts"] == 4 and len(follow["responses"]) == 4
    for side in ("base", "tuned"):
        assert 0.0 <= follow[side]["prompt_strict"] <= follow[side]["prompt_loose"] <= 1.0
        assert follow[side]["generation"]["tokens_per_second"] >= 0
    forgetting = report["forgetting"]
    assert forgetting["source"] == "base_samples" and len(forgetting["texts"]) == 2
    assert forgetting["flagged"] is True  # any change exceeds a threshold of -100%
    assert forgetting["kl"]["kl"] > 0
    assert [p["reference"] for p in report["side_by_side"]] == ["<script>alert(1)</script>", "Yellow."]

    page = (out / "eval_report.html").read_text()
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    for heading in ("Training curves", "Held-out response loss", "Instruction following", "Per instruction type",
                    "Forgetting", "Side by side"):
        assert f">{heading}" in page
    assert "prompt-level strict" in page and "instruction-level loose" in page
    assert f"<td>{report['heldout']['tuned']['loss']:.4f}</td>" in page
    assert "<td>keywords:existence</td>" in page or "<td>change_case:english_lowercase</td>" in page
    assert "FLAGGED" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "Reply with &lt;b&gt;bold&lt;/b&gt; &amp; more." in page


def test_lm_eval_bridge_runs_the_local_task_and_a_user_folder(tiny_run, tmp_path, monkeypatch):
    from sftlab.eval.lm_eval_bridge import LOCAL_TASKS_DIR, run_lm_eval
    from sftlab.models.loading import load_for_inference

    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    shutil.copy(LOCAL_TASKS_DIR / "sftlab_mini_qa.jsonl", user_tasks / "qa.jsonl")
    yaml_text = (LOCAL_TASKS_DIR / "sftlab_mini_qa.yaml").read_text()
    (user_tasks / "mine.yaml").write_text(yaml_text.replace("task: sftlab_mini_qa", "task: my_qa")
                                          .replace("test: sftlab_mini_qa.jsonl", "test: qa.jsonl"))
    monkeypatch.chdir(tmp_path)  # relative data_files resolve against the YAML's folder, not here

    model, tokenizer, _ = load_for_inference(str(tiny_run), CPU)
    result = run_lm_eval(model, tokenizer, "sftlab_mini_qa,my_qa", include_paths=[user_tasks], limit=5, batch_size=4)
    for task in ("sftlab_mini_qa", "my_qa"):
        assert 0.0 <= result["tasks"][task]["acc"] <= 1.0
        assert result["n_samples"][task] == 5
    # the same questions give the same score, whichever folder they came from
    assert result["tasks"]["sftlab_mini_qa"]["acc"] == result["tasks"]["my_qa"]["acc"]


def _sftlab(*args):
    return subprocess.run([sys.executable, "-m", "sftlab", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_eval_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "cli-report"
    result = _sftlab("eval", tiny_run, "--limit", "3", "--max-new-tokens", "6", "--corpus-samples", "2",
                     "--corpus-tokens", "12", "--side-by-side", "1", "--lm-eval", "sftlab_mini_qa", "--no-lm-eval-base",
                     "--lm-eval-limit", "4", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out response loss" in result.stdout and "IF prompt-level strict" in result.stdout
    assert "forgetting:" in result.stdout and "eval_report.html" in result.stdout
    report = json.loads((out / "eval_report.json").read_text())
    assert report["heldout"]["tuned"]["loss"] == pytest.approx(_summary(tiny_run)["val_loss_after"], rel=1e-5)
    assert report["heldout"]["base"]["loss"] == pytest.approx(_summary(tiny_run)["val_loss_before"], rel=1e-5)
    assert report["instruction_following"]["prompts"] == 3
    assert 0.0 <= report["lm_eval"]["tuned"]["tasks"]["sftlab_mini_qa"]["acc"] <= 1.0 and "base" not in report["lm_eval"]
    assert "lm-evaluation-harness" in (out / "eval_report.html").read_text()


@pytest.mark.slow
def test_cli_eval_user_errors_are_one_red_line(tmp_path):
    result = _sftlab("eval", tmp_path / "nowhere")
    assert result.returncode == 1
    assert "error:" in result.stdout and "run directory not found" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
