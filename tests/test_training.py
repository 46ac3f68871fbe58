"""Training on a tiny random-init Llama with the real tokenizer: the objective, accumulation,
learning, checkpoints and resume."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sftlab.config import load_config
from sftlab.data.batching import collate
from sftlab.data.prepare import prepare_data
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.train.loop import train
from sftlab.train.loss import evaluate_loss, token_loss_sum

FIXTURES = Path(__file__).parent / "fixtures"


def _config(tiny_model_dir, tmp_path, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", f"data={FIXTURES / 'tiny_train.json'}", f"eval_data={FIXTURES / 'tiny_eval.json'}",
        f"output_dir={tmp_path / 'run'}", "max_length=128", *extra,
    ])


def _examples(tiny_model_dir, tokenizer, tmp_path):
    return prepare_data(_config(tiny_model_dir, tmp_path), tokenizer).train


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_chunked_loss_equals_cross_entropy_on_full_logits(tiny_model_dir, tokenizer, tmp_path, impl):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate(_examples(tiny_model_dir, tokenizer, tmp_path)[:6], tokenizer.pad_token_id)
    summed, count = token_loss_sum(model, batch, chunk_size=7, impl=impl)  # chunks smaller than the token count
    (summed / count).backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (reference / count).backward()
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(summed, reference, rtol=1e-5)
    for mine, theirs in zip(chunked_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weight_trained", [True, False])
def test_fused_linear_cross_entropy_matches_autograd(softcap, weight_trained):
    """Value and gradients of the fused function (grads made in forward) against plain autograd,
    with Gemma-style logit soft-capping, a frozen output layer (LoRA) and a non-unit upstream grad."""
    from sftlab.train.loss import _FusedLinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trained)
    targets = torch.randint(0, 50, (23,))

    fused = _FusedLinearCrossEntropy.apply(hidden, weight, targets, 5, softcap)
    (fused * 0.37).backward()
    fused_grads = (hidden.grad.clone(), weight.grad.clone() if weight_trained else None)
    hidden.grad = None
    weight.grad = None

    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.37).backward()
    assert torch.allclose(fused.double(), reference, rtol=1e-6)
    assert torch.allclose(fused_grads[0], hidden.grad, atol=1e-10)
    if weight_trained:
        assert torch.allclose(fused_grads[1], weight.grad, atol=1e-10)
    else:
        assert weight.grad is None


def test_fused_loss_under_bf16_autocast_matches_autograd():
    """The CUDA path (bf16 autocast, fp32 weights), exercised with CPU autocast."""
    from sftlab.train.loss import _FusedLinearCrossEntropy

    torch.manual_seed(2)
    hidden = torch.randn(21, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (21,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _FusedLinearCrossEntropy.apply(hidden, weight, targets, 8, None, None)
    fused.backward()
    fused_grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    reference.backward()
    assert fused.dtype == torch.float32 and fused_grads[1].dtype == torch.float32
    assert torch.allclose(fused, reference, rtol=1e-2)
    assert torch.allclose(fused_grads[0], hidden.grad, rtol=5e-2, atol=5e-2)
    assert torch.allclose(fused_grads[1], weight.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("existing_grad", [False, True])
def test_fused_loss_can_add_the_weight_gradient_in_forward(existing_grad):
    """With the upstream factor promised (the loop's 1/step tokens), the weight gradient goes
    straight into weight.grad, adding to what is there; a different factor is refused."""
    from sftlab.train.loss import _FusedLinearCrossEntropy

    torch.manual_seed(1)
    hidden = torch.randn(19, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (19,))
    before = torch.randn_like(weight) if existing_grad else None
    weight.grad = None if before is None else before.clone()
    (_FusedLinearCrossEntropy.apply(hidden, weight, targets, 4, None, 0.25) * 0.25).backward()
    direct = (hidden.grad.clone(), weight.grad.clone())

    hidden.grad, weight.grad = None, None
    (F.cross_entropy(hidden @ weight.T, targets, reduction="sum") * 0.25).backward()
    assert torch.allclose(direct[0], hidden.grad, atol=1e-10)
    expected = weight.grad if before is None else weight.grad + before
    assert torch.allclose(direct[1], expected, atol=1e-10)

    with pytest.raises(RuntimeError, match="upstream factor"):
        (_FusedLinearCrossEntropy.apply(hidden, weight, targets, 4, None, 0.25) * 0.5).backward()


def test_one_batch_of_8_equals_4_micro_batches_of_2(tiny_model_dir, tokenizer, tmp_path):
    examples = _examples(tiny_model_dir, tokenizer, tmp_path)[:8]
    assert len({e.trained_token_count for e in examples}) > 1  # unequal lengths: a mean of means would differ

    def step_loss_and_grads(micro_batches):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        batches = [collate(examples[i : i + micro_batches], tokenizer.pad_token_id) for i in range(0, 8, micro_batches)]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        total = 0.0
        for b in batches:  # what the loop does: sum of token losses / the step's trained-token count
            summed, _ = token_loss_sum(model, b)
            (summed / step_tokens).backward()
            total += float(summed.detach()) / step_tokens
        return total, [p.grad.clone() for p in model.parameters()]

    loss_one, grads_one = step_loss_and_grads(8)
    loss_four, grads_four = step_loss_and_grads(2)
    assert abs(loss_one - loss_four) < 1e-5
    for a, b in zip(grads_one, grads_four):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_accumulation_in_the_loop_logs_the_same_first_step_loss(tiny_model_dir, tmp_path):
    # without length grouping both runs put the same 8 examples into step 1
    one = train(_config(tiny_model_dir, tmp_path / "a", "batch_size=8", "max_steps=1", "group_by_length=false"))
    four = train(_config(tiny_model_dir, tmp_path / "b", "batch_size=2", "gradient_accumulation_steps=4",
                         "max_steps=1", "group_by_length=false"))
    first = [json.loads(Path(r.output_dir, "metrics.jsonl").read_text().splitlines()[0]) for r in (one, four)]
    assert first[0]["tokens"] == first[1]["tokens"] > 0
    assert abs(first[0]["loss"] - first[1]["loss"]) < 1e-5


@pytest.mark.slow
def test_training_lowers_held_out_response_loss(tiny_model_dir, tmp_path):
    result = train(_config(tiny_model_dir, tmp_path, "learning_rate=3e-3", "max_steps=30", "batch_size=4", "warmup_ratio=0"))
    assert result.val_loss_after < result.val_loss_before - 1.0
    records = [json.loads(line) for line in Path(result.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"step", "loss", "learning_rate", "tokens"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["val_loss"] == pytest.approx(result.val_loss_after)


def test_full_checkpoint_loads_in_plain_transformers_with_the_template(tiny_model_dir, tokenizer, tmp_path):
    result = train(_config(tiny_model_dir, tmp_path, "max_steps=2"))
    final = Path(result.output_dir) / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert json.loads((final / "sftlab.json").read_text())["template"] == "alpaca"
    assert (Path(result.output_dir) / "config.yaml").is_file() and (Path(result.output_dir) / "data_report.json").is_file()
    # the saved weights are the trained ones: the held-out loss matches the run's final validation loss
    val = prepare_data(_config(tiny_model_dir, tmp_path), tokenizer).val
    loss = evaluate_loss(model, [collate(val, tokenizer.pad_token_id)], torch.device("cpu"))["loss"]
    assert loss == pytest.approx(result.val_loss_after, rel=1e-4)


@pytest.mark.slow
def test_lora_trains_only_adapters_and_saves_a_peft_checkpoint(tiny_model_dir, tmp_path):
    from peft import PeftModel

    result = train(_config(tiny_model_dir, tmp_path, "method=lora", "lora.r=4", "max_steps=3", "learning_rate=1e-2"))
    final = Path(result.output_dir) / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, final)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapters moved from their zero init


@pytest.mark.slow
def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tiny_model_dir, tmp_path):
    common = ["max_steps=6", "batch_size=4", "learning_rate=1e-3", "save_steps=3"]
    straight = train(_config(tiny_model_dir, tmp_path / "straight", *common))
    interrupted = _config(tiny_model_dir, tmp_path / "resumed", *common)
    _train_until(interrupted, stop_after=3)
    assert (Path(interrupted.output_dir) / "checkpoint-3" / "manifest.json").is_file()
    assert not (Path(interrupted.output_dir) / "final").exists()
    resumed = train(interrupted, resume=True)

    def steps(result):
        return [json.loads(line) for line in Path(result.output_dir, "metrics.jsonl").read_text().splitlines()]

    assert [s["step"] for s in steps(resumed)] == list(range(1, 7))
    for a, b in zip(steps(straight), steps(resumed)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert resumed.val_loss_after == pytest.approx(straight.val_loss_after, rel=1e-5)


def _train_until(config, stop_after: int):
    """Run the loop and kill it (KeyboardInterrupt) right after the checkpoint of step `stop_after`."""
    import sftlab.train.loop as loop

    original = loop.save_checkpoint

    def save_then_stop(*args, **kwargs):
        folder = original(*args, **kwargs)
        if args[3] == stop_after:  # save_checkpoint(module, optimizer, scheduler, step, ...)
            raise KeyboardInterrupt
        return folder

    loop.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config)
    finally:
        loop.save_checkpoint = original


def test_validation_every_n_steps_keeps_the_best_model_and_stops_early(tiny_model_dir, tmp_path):
    # a learning rate far too high: validation loss gets worse after the first evaluations
    result = train(_config(tiny_model_dir, tmp_path, "max_steps=40", "batch_size=4", "eval_steps=2",
                           "learning_rate=0.5", "warmup_ratio=0", "lr_scheduler=constant", "early_stopping_patience=2"))
    records = [json.loads(line) for line in Path(result.output_dir, "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == list(range(2, result.steps + 1, 2))
    assert result.steps < 40  # stopped early
    assert result.best_val_loss == min(r["val_loss"] for r in evaluated)
    assert result.best_step == min(evaluated, key=lambda r: r["val_loss"])["step"]
    # best/ holds the weights of the best step: its validation loss is the best one
    from sftlab.data.prepare import prepare_data
    from sftlab.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    val = prepare_data(_config(tiny_model_dir, tmp_path), tokenizer).val
    best = AutoModelForCausalLM.from_pretrained(Path(result.output_dir) / "best")
    loss = evaluate_loss(best, [collate(val, tokenizer.pad_token_id)], torch.device("cpu"))["loss"]
    assert loss == pytest.approx(result.best_val_loss, rel=1e-4)


def test_stashed_tokenizer_saves_the_same_files_and_cleans_up(tokenizer, tmp_path):
    """Training frees the tokenizer after tokenizing; checkpoints still get its exact files."""
    import gc

    from sftlab.train.checkpoint import StashedTokenizer

    direct, copied = tmp_path / "direct", tmp_path / "copied"
    direct.mkdir()
    copied.mkdir()
    tokenizer.save_pretrained(direct)
    stashed = StashedTokenizer(tokenizer)
    stashed.save_pretrained(copied)
    assert stashed.pad_token_id == tokenizer.pad_token_id and stashed.eos_token == tokenizer.eos_token
    names = sorted(f.name for f in direct.iterdir())
    assert names == sorted(f.name for f in copied.iterdir()) and "tokenizer.json" in names
    for name in names:
        assert (direct / name).read_bytes() == (copied / name).read_bytes(), name
    folder = stashed.folder
    del stashed
    gc.collect()
    assert not folder.exists()
