"""Micro-batches chosen by sftlab: a step cut into pieces under a token budget trains exactly what
one micro-batch trains, and the auto budget keeps memory down."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftlab.data.batching import collate, split_by_tokens
from sftlab.data.packing import collate_packed, pack_bfd
from sftlab.train.distributed import LossModule
from sftlab.train.loop import train
from sftlab.train.memory import (
    ACTIVATION_MARGIN, CPU_PIECE_TOKENS, activation_bytes_per_token, plan_memory, recompute_share,
)
from sftlab.train.step import cut_into_pieces, forward_backward
from test_training import _config, _examples


def test_pieces_take_every_unit_once_longest_first_within_the_budget():
    lengths = [5, 3, 8, 2, 3]
    pieces = split_by_tokens(lengths, budget=8)
    # 8 alone; 5 alone (2 x 5 > 8); then 3, 3 and 2 padded to 3: 3 x 3 = 9 > 8, so two pieces
    assert pieces == [[2], [0], [1, 4], [3]]
    assert sorted(i for p in pieces for i in p) == list(range(len(lengths)))
    assert all(len(p) * max(lengths[i] for i in p) <= 8 for p in pieces)
    assert split_by_tokens([20, 4], budget=8) == [[0], [1]]  # a unit above the budget is a piece of its own
    assert split_by_tokens([4, 4, 4], budget=10**6) == [[0, 1, 2]]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_a_step_cut_into_pieces_has_the_same_loss_and_gradients(tiny_model_dir, tokenizer, tmp_path, packing):
    examples = _examples(tiny_model_dir, tokenizer, tmp_path)[:12]
    assert len({len(e) for e in examples}) > 4
    if packing:
        units = [[examples[i] for i in row] for row in pack_bfd([len(e) for e in examples], capacity=128)]
        size, collate_units = (lambda row: sum(len(e) for e in row)), (lambda rows: collate_packed(rows, tokenizer.pad_token_id))
    else:
        units, size, collate_units = examples, len, (lambda ex: collate(ex, tokenizer.pad_token_id))
    micro_batches = [units[: len(units) // 2], units[len(units) // 2 :]]  # two micro-batches (accumulation)

    def step(budget):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        pieces = cut_into_pieces(micro_batches, size, collate_units, budget)
        done = forward_backward(LossModule(model), pieces, torch.device("cpu"))
        return float(done.loss_sum) / done.trained_tokens, done.pieces, [p.grad.clone() for p in model.parameters()]

    whole_loss, whole_pieces, whole_grads = step(10**9)
    assert whole_pieces == 2  # one piece per micro-batch
    for budget in (1, 100, 160, 300):
        loss, pieces, grads = step(budget)
        assert pieces > 2
        assert loss == pytest.approx(whole_loss, abs=1e-5)
        for a, b in zip(grads, whole_grads):
            assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_training_gives_the_same_losses_and_weights_for_any_budget(tiny_model_dir, tmp_path, packing):
    # Adam divides by the root of the squared gradients: where those are ~0, rounding differences
    # of 1e-9 move a weight by up to the learning rate, so weights are compared at lr 1e-4
    def run(name, budget):
        result = train(_config(tiny_model_dir, tmp_path / name, "max_steps=3", "batch_size=6", "learning_rate=1e-4",
                               f"packing={str(packing).lower()}", f"micro_batch_tokens={budget}"))
        losses = [json.loads(line)["loss"] for line in Path(result.output_dir, "metrics.jsonl").read_text().splitlines()]
        model = AutoModelForCausalLM.from_pretrained(Path(result.output_dir) / "final")
        return losses, model.state_dict(), result

    reference_losses, reference_weights, _ = run("whole", 10**9)
    for budget in (64, 200):
        losses, weights, result = run(f"b{budget}", budget)
        assert losses == pytest.approx(reference_losses, abs=1e-5)
        for name, tensor in weights.items():
            assert torch.allclose(tensor, reference_weights[name], atol=1e-5), name
    assert result.val_loss_after is not None


@pytest.mark.slow
def test_a_config_without_the_key_keeps_its_results(tiny_model_dir, tmp_path):
    """An old-style config (no micro_batch_tokens) trains the same steps as before the key existed:
    the same losses as one forward pass per micro-batch."""
    old = train(_config(tiny_model_dir, tmp_path / "old", "max_steps=2", "batch_size=2", "gradient_accumulation_steps=3"))
    whole = train(_config(tiny_model_dir, tmp_path / "whole", "max_steps=2", "batch_size=2",
                          "gradient_accumulation_steps=3", "micro_batch_tokens=1000000000"))
    read = lambda r: [json.loads(line) for line in Path(r.output_dir, "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(read(old), read(whole)):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    summary = json.loads(Path(old.output_dir, "train_summary.json").read_text())
    assert summary["micro_batch_tokens"] >= 128  # auto: at least one max_length row


def test_auto_budget_measures_activations_and_checkpointing_shrinks_them(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = activation_bytes_per_token(model, 128, torch.device("cpu"))
    # a 2-layer, 32-wide model keeps at least its layers' inputs (2 x 32 fp32) per token
    assert plain > 2 * 32 * 4
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert activation_bytes_per_token(model, 128, torch.device("cpu")) < plain / 2

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plan = plan_memory(fresh, torch.device("cpu"), 128, "full", 300, False)
    assert (plan.tokens, plan.checkpointing) == (300, False)
    plan = plan_memory(fresh, torch.device("cpu"), 128, "full", "auto", False)
    assert plan.tokens >= 128 and "auto" in plan.reason
    fits = int(plan.activation_allowance_bytes / (plan.activation_bytes_per_token * ACTIVATION_MARGIN))
    assert plan.tokens == max(128, min(CPU_PIECE_TOKENS, fits))  # on CPU no bigger than the point of full speed


def test_auto_checkpointing_is_on_where_the_recompute_is_cheap(smollm2_dir):
    """Recomputing the decoder adds ~26% to a SmolLM2 step (off), ~12% to a Gemma 3 270M step,
    whose 262k-vocabulary output layer is most of the work (on), ~19% under LoRA (off)."""
    from sftlab.models.convert import pull
    from transformers import AutoConfig

    def share(folder, method):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        return recompute_share(model, method)

    gemma = pull("gemma3-270m")
    assert share(smollm2_dir, "full") == pytest.approx(0.26, abs=0.01)
    assert share(gemma, "full") == pytest.approx(0.124, abs=0.01)
    assert share(gemma, "lora") == pytest.approx(0.187, abs=0.01)
    assert share(smollm2_dir, "full") > 0.15 > share(gemma, "full")


MEMORY_PROBE = r"""
import json, sys
from sftlab.config import load_config
from sftlab.train.distributed import LossModule
from sftlab.train.loop import train
result = train(load_config(overrides=sys.argv[1:]))
print("SUMMARY " + open(result.output_dir + "/train_summary.json").read().replace("\n", " "))
"""


def _peak_of_training(args: list[str]) -> tuple[float, dict]:
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    return summary["memory"]["phases"]["training steps"]["peak_mb"], summary


@pytest.mark.slow
def test_auto_budget_bounds_the_memory_of_a_big_micro_batch(tmp_path, tokenizer):
    """A micro-batch of 48 rows x 256 tokens on a small model: with the auto budget the training
    step's peak stays near the floor; in one piece its activations take hundreds of MB more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    words = "the quick brown fox jumps over the lazy dog and keeps running far away ".split()
    rows = [{"instruction": " ".join(words[(i + k) % len(words)] for k in range(40)),
             "output": " ".join(words[(i * 3 + k) % len(words)] for k in range(200))} for i in range(48)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    common = [f"model={model_dir}", f"data={data}", "max_length=256", "batch_size=48", "max_steps=1",
              "cache=false", "loss_chunk_size=256", "gradient_checkpointing=false", "precision=fp32"]
    auto_peak, auto = _peak_of_training(common + [f"output_dir={tmp_path / 'auto'}"])
    whole_peak, _ = _peak_of_training(common + [f"output_dir={tmp_path / 'whole'}", "micro_batch_tokens=1000000"])
    loaded = auto["memory"]["phases"]["load model"]["peak_mb"]
    budget = auto["micro_batch_tokens"]
    assert budget < 48 * 256  # the step was cut
    # the step adds at most the model's training state, the activations the budget allows and slack
    state_mb = auto["memory"]["training_state_mb"]
    assert auto_peak - loaded < state_mb + auto["memory"]["activation_allowance_mb"] * 1.5 + 150
    assert whole_peak - auto_peak > 300
