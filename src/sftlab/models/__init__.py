"""Offline model registry, GGUF conversion and loading."""

from sftlab.models.registry import REGISTRY, ModelNotFoundError, cached_model_dir
from sftlab.paths import sftlab_home

_LAZY = {  # these import torch: loaded on first use
    "pull": "sftlab.models.convert", "load_causal_lm": "sftlab.models.loading",
    "load_for_inference": "sftlab.models.loading", "load_tokenizer": "sftlab.models.loading",
    "pick_device": "sftlab.models.loading", "resolve_model": "sftlab.models.convert",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftlab.models' has no attribute '{name}'")


__all__ = [
    "REGISTRY", "ModelNotFoundError", "cached_model_dir", "load_causal_lm", "load_for_inference",
    "load_tokenizer", "pick_device", "pull", "resolve_model", "sftlab_home",
]
