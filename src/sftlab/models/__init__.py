"""Offline model registry, GGUF conversion and loading."""

from sftlab.models.convert import pull
from sftlab.models.loading import load_causal_lm, load_for_inference, load_tokenizer, pick_device
from sftlab.models.registry import REGISTRY, ModelNotFoundError, cached_model_dir, resolve_model, sftlab_home

__all__ = [
    "REGISTRY", "ModelNotFoundError", "cached_model_dir", "load_causal_lm", "load_for_inference",
    "load_tokenizer", "pick_device", "pull", "resolve_model", "sftlab_home",
]
