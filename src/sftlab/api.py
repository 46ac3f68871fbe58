"""Everything the CLI does, callable from Python.

    from sftlab.api import load_config, prepare, train, generate
    config = load_config("examples/demo.yaml", ["max_steps=10"])
    report = prepare(config).report
    result = train(config)
    print(generate(result.output_dir, "Name three primary colours."))
"""

from __future__ import annotations

from sftlab.config import RunConfig, load_config
from typing import TYPE_CHECKING

from sftlab.data.prepare import PreparedData, prepare_data

if TYPE_CHECKING:
    from sftlab.infer.generate import Generator, generate
    from sftlab.models.convert import pull
    from sftlab.train.loop import TrainResult, train

_LAZY = {  # imported on first use: `sftlab prepare` on a cached store never imports torch
    "Generator": "sftlab.infer.generate", "generate": "sftlab.infer.generate", "pull": "sftlab.models.convert",
    "TrainResult": "sftlab.train.loop", "train": "sftlab.train.loop",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftlab.api' has no attribute '{name}'")


def prepare(config: RunConfig) -> PreparedData:
    """Prepare the run's data with its model's tokenizer and save OUTPUT_DIR/data_report.json."""
    data = prepare_data(config)  # the tokenizer is loaded only if the store is not cached
    data.save_report(config.output_dir)
    return data


__all__ = ["Generator", "PreparedData", "RunConfig", "TrainResult", "generate", "load_config", "prepare", "pull", "train"]
