"""The input embedding's gradient added in place (train/embedding.py): the same gradients as
autograd, on a plain (Llama) and a scaled (Gemma 3) embedding with padding rows, and no dense
vocabulary-sized buffer in backward."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from sftlab.data.batching import collate
from sftlab.data.prepare import prepare_data
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.train.embedding import add_embedding_grad_in_place
from sftlab.train.loss import token_loss_sum
from test_training import _config


def _tiny_gemma(vocab_size: int):
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=0, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
    )
    return Gemma3ForCausalLM(config)


def _loop_step_grads(model, batches, hooked: bool) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step over micro-batches, computed the way the loop does."""
    if hooked:
        assert add_embedding_grad_in_place(model)
    step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    for b in batches:
        summed, _ = token_loss_sum(model, b, weight_grad_scale=1 / step_tokens)
        (summed / step_tokens).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_in_place_embedding_gradient_equals_autograd(kind, tiny_model_dir, tokenizer, tmp_path):
    examples = prepare_data(_config(tiny_model_dir, tmp_path), tokenizer).train[:6]
    pad = tokenizer.pad_token_id if kind == "llama" else 0
    batches = [collate(examples[i : i + 3], pad) for i in (0, 3)]  # padded: the padding row is in the input
    batches[0]["input_ids"][0, 3] = pad  # the padding id inside a sequence gets an upstream gradient
    assert any(bool((b["input_ids"] == pad).any()) for b in batches)

    def fresh():
        if kind == "llama":
            return AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return _tiny_gemma(len(tokenizer))

    plain, hooked = _loop_step_grads(fresh(), batches, False), _loop_step_grads(fresh(), batches, True)
    assert plain.keys() == hooked.keys()
    for name in plain:
        assert torch.allclose(plain[name], hooked[name], atol=1e-6, rtol=1e-5), name
    embedding = "model.embed_tokens.weight"
    assert hooked[embedding].abs().sum() > 0
    if kind == "gemma3":  # a scaled embedding: the scale reaches the gradient
        assert float(fresh().get_input_embeddings().embed_scale) == pytest.approx(32**0.5)


def test_not_applied_to_a_frozen_or_unusual_embedding():
    class Wrapper(nn.Module):
        def __init__(self, embedding):
            super().__init__()
            self.embedding = embedding

        def get_input_embeddings(self):
            return self.embedding

    frozen = nn.Embedding(10, 4)
    frozen.weight.requires_grad_(False)
    assert not add_embedding_grad_in_place(Wrapper(frozen))

    class Shifted(nn.Embedding):  # not a plain (scaled) lookup: left to autograd
        def forward(self, input):
            return super().forward(input) + 1.0

    assert not add_embedding_grad_in_place(Wrapper(Shifted(10, 4)))
    assert not add_embedding_grad_in_place(Wrapper(nn.Embedding(10, 4, max_norm=1.0)))
    assert add_embedding_grad_in_place(Wrapper(nn.Embedding(10, 4)))


def _backward_extra_mb(hooked: bool) -> float:
    """Peak RSS a backward through a 262k x 256 embedding (256 MiB) adds, in a fresh process."""
    script = f"""
import torch
from torch import nn
from sftlab.train.embedding import add_embedding_grad_in_place
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(262144, 256)
    def get_input_embeddings(self):
        return self.e
m = M()
if {hooked}:
    assert add_embedding_grad_in_place(m)
m.e.weight.grad = torch.ones_like(m.e.weight)  # a later micro-batch: the gradient buffer exists
ids = torch.randint(0, 262144, (1, 512))
out = m.e(ids).sum()
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) / 1024
base = status('VmRSS')
out.backward()
print(status('VmHWM') - base)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


@pytest.mark.slow
def test_in_place_embedding_gradient_needs_no_vocabulary_sized_buffer():
    assert _backward_extra_mb(False) > 200  # autograd: a dense 256 MiB gradient, then added
    assert _backward_extra_mb(True) < 50
