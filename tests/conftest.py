"""Shared fixtures: the real SmolLM2 tokenizer, and a tiny randomly initialised model built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftlab.models.convert import pull
from sftlab.models.loading import load_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model, converted once into the cache (~25 s the first time)."""
    return pull(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and random weights: a real model, fast on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma 3's real tokenizer (adds a BOS; 262k vocabulary). Pulls gemma3-270m once (~60 s)."""
    return load_tokenizer(str(pull("gemma3-270m")))


# The control tokens of the model families the template tests imitate (Llama 3, Gemma, Mistral),
# added to a copy of SmolLM2's tokenizer so each family's end-of-turn token is one token.
FAMILY_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<start_of_turn>",
                 "<end_of_turn>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                 "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama on SmolLM2's tokenizer with the FAMILY_TOKENS added as special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(str(smollm2_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-family")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_tokenizer(family_model_dir):
    return load_tokenizer(str(family_model_dir))


def pytest_configure(config):
    """The tests that assert exact equalities (loss = reference, accumulation = one batch, N ranks =
    1 rank, bit-exact resume) run in fp32: the config's default precision is pinned to fp32 in this
    process; the tests that start `sftlab train` as a command pin it in their configs. Tests of
    mixed precision set `precision: bf16` themselves."""
    from sftlab.config import RunConfig

    RunConfig.model_fields["precision"].default = "fp32"
    RunConfig.model_rebuild(force=True)
