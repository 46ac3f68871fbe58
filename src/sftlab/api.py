"""Everything the CLI does, callable from Python.

    from sftlab.api import load_config, prepare, train, generate
    config = load_config("examples/demo.yaml", ["max_steps=10"])
    report = prepare(config).report
    result = train(config)
    print(generate(result.output_dir, "Name three primary colours."))
"""

from __future__ import annotations

from sftlab.config import RunConfig, load_config
from sftlab.data.prepare import PreparedData, prepare_data
from sftlab.infer.generate import Generator, generate
from sftlab.models.convert import pull
from sftlab.models.loading import load_tokenizer
from sftlab.train.loop import TrainResult, train


def prepare(config: RunConfig) -> PreparedData:
    """Prepare the run's data with its model's tokenizer and save OUTPUT_DIR/data_report.json."""
    data = prepare_data(config, load_tokenizer(config.model))
    data.save_report(config.output_dir)
    return data


__all__ = ["Generator", "PreparedData", "RunConfig", "TrainResult", "generate", "load_config", "prepare", "pull", "train"]
