"""`sftlab self-instruct` end to end: a real `sftlab serve` over HTTP, and an in-process model.

Two real models, both on SmolLM2's real tokenizer:

- `tiny_model_dir` (conftest): a random 2-layer Llama. It writes garbage and never stops by
  itself, so every candidate is cut off by the length limit; the tests check the accounting.
- a "Markov-chain" Llama built here: a 1-layer Llama whose blocks output zero, so each next
  token depends only on the current one, with embedding and output weights set by hand to a
  small bigram grammar ("Write a formal poem about my dog\\n1. Plan ..."). It is an ordinary
  checkpoint served by `sftlab serve`, and its lists parse, so rows reach the output file.

The server and the command run in subprocesses with OMP_NUM_THREADS=1: on a busy 2-core
machine, torch's default threads make a tiny model tens of times slower.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from sftlab.config import DataSource
from sftlab.data.prepare import load_conversations

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sftlab serve MODEL --port P` in a subprocess, ready once GET /v1/models answers."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = free_port()
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sftlab", "serve", str(model_dir), "--port", str(self.port), "--model-name", "tiny",
             "--log-level", "warning"], cwd=ROOT, env=ENV, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sftlab serve did not start:\n{Path(log).read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def make_chain_model(tokenizer, folder: Path) -> Path:
    """A real Llama checkpoint that samples from a hand-written bigram grammar (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    groups = {
        "verb": [" Write", " Explain", " Describe", " Suggest", " List", " Compare", " Name", " Give", " Find",
                 " Create", " Tell", " Sort", " Plan"],
        "det": [" a", " the", " three", " some", " my"],
        "adj": [" short", " funny", " simple", " formal", " polite", " famous", " old"],
        "noun": [" poem", " story", " letter", " recipe", " song", " speech", " email", " essay", " joke", " review",
                 " garden", " river", " city", " dog", " map"],  # "map" is on the blacklist
        "prep": [" about", " for", " with", " on", " from"],
        "nl": ["\n"], "one": ["1"], "digit": ["0", "2", "3", "4", "5"], "dot": ["."], "qmark": ["?"],
        "yesno": [" Yes", " No"],
    }
    chain = {  # state -> {next group (or eos): probability}
        "dot": {"verb": 1.0}, "verb": {"det": 1.0}, "det": {"adj": 0.4, "noun": 0.6}, "adj": {"noun": 1.0},
        "noun": {"prep": 0.45, "eos": 0.3, "nl": 0.25}, "prep": {"det": 1.0},
        "nl": {"one": 0.9, "nl": 0.1}, "one": {"digit": 0.6, "dot": 0.4}, "digit": {"dot": 1.0},
        "qmark": {"yesno": 1.0}, "yesno": {"nl": 1.0},
    }
    ids = {}
    for name, words in groups.items():
        ids[name] = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        assert all(len(t) == 1 for t in ids[name]), name
        ids[name] = [t[0] for t in ids[name]]
    states, hidden = list(chain), 32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # the blocks add nothing: the last hidden state is the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.model.embed_tokens.weight
        embedding.zero_()
        embedding[:, states.index("dot")] = 1.0  # every token outside the grammar acts like "."
        for s, name in enumerate(states):
            for t in ids[name]:
                embedding[t].zero_()
                embedding[t, s] = 1.0
        head = model.lm_head.weight  # the final RMSNorm turns a one-hot row into sqrt(hidden) at its state
        head.fill_(-40.0 / math.sqrt(hidden))
        for s, name in enumerate(states):
            for group, p in chain[name].items():
                members = [tokenizer.eos_token_id] if group == "eos" else ids[group]
                for t in members:
                    head[t, s] = math.log(p / len(members)) / math.sqrt(hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sftlab(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftlab", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def check_accounting(output: Path, log: Path) -> tuple[list[dict], list[dict]]:
    """Every candidate has a fate, reasons only on drops, rows = kept instances; returns (records, rows)."""
    recs = records(log)
    rows = json.loads(output.read_text())
    assert recs[0]["type"] == "header" and recs[-1]["type"] == "round_end"
    candidates = [r for r in recs if r["type"] in ("instruction", "instance")]
    assert all(r["fate"] in ("kept", "dropped") and (r["fate"] == "kept") == (r["reason"] is None) for r in candidates)
    kept = [r for r in recs if r["type"] == "instance" and r["fate"] == "kept"]
    assert rows == [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in kept]
    instructions = [r["instruction"] for r in recs if r["type"] == "instruction" and r["fate"] == "kept"]
    assert len(instructions) == len(set(instructions))
    rounds = [r["round"] for r in recs if r["type"] == "round_end"]
    assert rounds == list(range(1, len(rounds) + 1))
    if rows:  # what `sftlab train` reads (`data: OUTPUT`); an empty list is no training data and is refused
        loaded = load_conversations(DataSource(path=str(output)))
        assert len(loaded.conversations) == len(rows) and not loaded.dropped
    return recs, rows


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    server = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.mark.slow
def test_cli_against_sftlab_serve_with_the_random_tiny_model_then_resume(tiny_server, tmp_path):
    out = tmp_path / "gen.json"
    args = ["self-instruct", "--api-base", tiny_server.base_url, "--num", 3, "-o", out, "--max-tokens", 16,
            "--concurrency", 4, "--batch", 4]
    first = sftlab(*args, "--max-rounds", 2)  # no --model: the first one the server lists
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped at --max-rounds" in first.stdout and "0 rows" in first.stdout
    recs, rows = check_accounting(out, tmp_path / "gen.log.jsonl")
    assert recs[0]["backend"].endswith("model tiny")
    requests = [r for r in recs if r["type"] == "requests"]
    assert [(r["round"], r["stage"], r["sent"], r["failed"]) for r in requests] == [
        (1, "instructions", 4, 0), (2, "instructions", 4, 0)]
    instructions = [r for r in recs if r["type"] == "instruction"]
    # random weights never write a stop sequence: every response ends at max_tokens, its only item cut off
    assert len(instructions) == 8 and {r["reason"] for r in instructions} == {"cut_off"}
    assert rows == []

    again = sftlab(*args, "--max-rounds", 3)  # the same command, one round further
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout
    recs, _ = check_accounting(out, tmp_path / "gen.log.jsonl")
    assert sum(r["type"] == "header" for r in recs) == 1
    assert [r["round"] for r in recs if r["type"] == "requests"] == [1, 2, 3]
    assert sum(r["type"] == "instruction" for r in recs) == 12


@pytest.mark.slow
def test_pipeline_over_http_keeps_rows_with_the_chain_model(tokenizer, tmp_path_factory, tmp_path):
    from sftlab.selfinstruct import OpenAIBackend, Settings, run_self_instruct

    model_dir = make_chain_model(tokenizer, tmp_path_factory.mktemp("chain-llama"))
    server = Server(model_dir, tmp_path / "serve.log")
    try:
        backend = OpenAIBackend(server.base_url, model="tiny", concurrency=4, max_retries=2, timeout=60)
        settings = Settings(num=6, seed=0, prompts_per_round=4, max_tokens=40, instance_max_tokens=40, max_rounds=8)
        result = run_self_instruct(backend, tmp_path / "gen.json", settings)
        stats = httpx.get(server.url + "/sftlab/stats").json()
        # the same pipeline on /v1/chat/completions (the server wraps the prompt in the model's template)
        chat = OpenAIBackend(server.base_url, model="tiny", chat=True, concurrency=2, max_retries=2, timeout=60)
        chat_result = run_self_instruct(chat, tmp_path / "chat.json", Settings(num=2, prompts_per_round=2, max_tokens=24,
                                                                              instance_max_tokens=24, max_rounds=2))
    finally:
        server.stop()
    summary = result.summary
    recs, rows = check_accounting(tmp_path / "gen.json", tmp_path / "gen.log.jsonl")
    assert summary["instructions"]["kept"] == 6 and result.stopped == "done"
    assert summary["failed_requests"] == {"instructions": 0, "classification": 0, "instances": 0}
    assert summary["requests"]["classification"] == summary["requests"]["instances"] == 6
    assert len(rows) == summary["instances"]["kept"] >= 1
    dropped = summary["instructions"]["dropped_by_reason"]
    assert dropped.get("too_short", 0) + dropped.get("similar", 0) > 0  # the filters were at work
    assert stats["requests"] >= sum(summary["requests"].values())
    for r in recs:
        if r["type"] == "instruction" and r["fate"] == "kept":
            assert r["classification"] in ("yes", "no") and r["rouge_l"] <= 0.7
    check_accounting(tmp_path / "chat.json", tmp_path / "chat.log.jsonl")
    assert chat_result.summary["requests"]["instructions"] >= 2 and not any(chat_result.summary["failed_requests"].values())


@pytest.mark.slow
def test_local_backend_with_the_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "local.json"
    result = sftlab("self-instruct", "--local", tiny_model_dir, "--num", 2, "-o", out, "--max-tokens", 12,
                    "--batch", 3, "--max-rounds", 2, "--seed", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    recs, rows = check_accounting(out, tmp_path / "local.log.jsonl")
    assert recs[0]["backend"] == f"local {tiny_model_dir}"
    assert [(r["stage"], r["sent"], r["failed"]) for r in recs if r["type"] == "requests"] == [("instructions", 3, 0)] * 2
    assert {r["reason"] for r in recs if r["type"] == "instruction"} == {"cut_off"} and rows == []
