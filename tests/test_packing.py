"""Packing: best-fit decreasing, restarting positions, and an unchanged objective."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sftlab.data.batching import collate
from sftlab.data.packing import collate_packed, pack_bfd
from sftlab.data.tokenize import Example
from sftlab.train.loop import train
from sftlab.train.loss import token_loss_sum
from test_training import _config, _examples


def test_bfd_places_every_example_once_within_capacity():
    lengths = [9, 2, 7, 3, 5, 5, 1, 8, 4, 6]
    rows = pack_bfd(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(10))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 50 tokens in rows of 10: best-fit decreasing fills them exactly here
    assert rows[0] == [0, 6]  # the longest (9) first, then the only item that fits its last slot (1)


def test_packed_rows_restart_positions_and_mask_each_first_label():
    a = Example(np.array([5, 6, 7], np.int32), np.array([-100, 6, 7], np.int32))
    b = Example(np.array([8, 9], np.int32), np.array([8, 9], np.int32))  # plain text: every label set
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    assert int(batch["num_tokens"]) == 7


def test_packed_batch_has_the_same_loss_and_gradients_as_unpacked(tiny_model_dir, tokenizer, tmp_path):
    examples = _examples(tiny_model_dir, tokenizer, tmp_path)[:8]
    assert len({len(e) for e in examples}) > 3  # different lengths

    def loss_and_grads(batch):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        summed, count = token_loss_sum(model, batch)
        (summed / count).backward()
        return float(summed.detach()) / count, count, [p.grad.clone() for p in model.parameters()]

    rows = [[examples[i] for i in row] for row in pack_bfd([len(e) for e in examples], capacity=128)]
    assert len(rows) < len(examples)  # several examples share a row
    packed_loss, packed_count, packed_grads = loss_and_grads(collate_packed(rows, tokenizer.pad_token_id))
    plain_loss, plain_count, plain_grads = loss_and_grads(collate(examples, tokenizer.pad_token_id))
    assert packed_count == plain_count
    assert packed_loss == pytest.approx(plain_loss, abs=1e-5)
    for a, b in zip(packed_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_without_the_restart_the_objective_changes(smollm2_dir, tiny_model_dir, tokenizer, tmp_path):
    """The equality above is not vacuous: on the real model, the same packed row with plain
    positions (attention leaking across examples) gives a clearly different loss."""
    examples = _examples(tiny_model_dir, tokenizer, tmp_path)[:4]
    batch = collate_packed([examples], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        right, count = token_loss_sum(model, batch)
        plain = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        leaky, _ = token_loss_sum(model, plain)
        unpacked, _ = token_loss_sum(model, collate(examples, tokenizer.pad_token_id))
    assert float(right) / count == pytest.approx(float(unpacked) / count, abs=1e-4)
    assert abs(float(right) - float(leaky)) / count > 0.01


@pytest.mark.slow
def test_training_with_packing_runs_and_learns(tiny_model_dir, tmp_path):
    result = train(_config(tiny_model_dir, tmp_path, "packing=true", "batch_size=2", "max_steps=30",
                           "learning_rate=3e-3", "warmup_ratio=0"))
    assert result.val_loss_after < result.val_loss_before - 1.0


def _peak_extra_mb(mode: str) -> float:
    """Run the loss on a 262k vocabulary in a fresh process; return the peak RSS it added (MB)."""
    import subprocess
    import sys

    script = f"""
import torch, torch.nn.functional as F
from sftlab.train.loss import _chunk_loss_sum
torch.manual_seed(0)
V, D, T = 262144, 64, 1024
weight = torch.randn(V, D, requires_grad=True)
hidden = torch.randn(T, D, requires_grad=True)
targets = torch.randint(0, V, (T,))
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
base = rss()
if "{mode}" == "full":
    loss = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
elif "{mode}" == "fused":
    from sftlab.train.loss import _FusedLinearCrossEntropy
    loss = _FusedLinearCrossEntropy.apply(hidden, weight, targets, 128, None, 1.0)
else:
    from torch.utils.checkpoint import checkpoint
    loss = sum(checkpoint(_chunk_loss_sum, hidden[s:s + 128], weight, targets[s:s + 128], None, use_reentrant=False)
               for s in range(0, T, 128))
loss.backward()
print(hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


@pytest.mark.slow
def test_chunked_loss_bounds_the_extra_memory_of_a_262k_vocabulary():
    full, chunked, fused = _peak_extra_mb("full"), _peak_extra_mb("chunked"), _peak_extra_mb("fused")
    # full logits: 1024 x 262144 fp32 = 1 GiB, plus their gradient; chunks of 128 rows: 128 MiB each
    assert full > 1500, full
    assert chunked < 600, chunked
    # fused: one chunk's logits, turned into their gradient in place (128 MiB), and the weight's
    # gradient (64 MiB); a second chunk-sized temporary (e.g. from torch.logsumexp) would exceed this
    assert fused < 300, fused
