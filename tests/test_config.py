"""The run config: defaults, overrides, unknown keys, path resolution."""

import json
from pathlib import Path

import pytest
import yaml

from sftlab.config import ConfigError, RunConfig, describe_keys, load_config, save_config


def test_sft_defaults_are_small_learning_rates_and_few_epochs():
    assert load_config().resolved_learning_rate == 2e-5
    assert load_config(overrides=["method=lora"]).resolved_learning_rate == 2e-4
    assert 1 <= RunConfig().num_epochs <= 3
    assert RunConfig().lr_scheduler == "cosine"


def test_every_key_has_a_meaning():
    keys = describe_keys()
    assert {"model", "data", "lora.r", "lora.target_modules", "max_steps", "save_steps"} <= {k for k, _, _ in keys}
    assert all(meaning for _, _, meaning in keys)
    defaults = {k: d for k, d, _ in keys}
    assert defaults["data[].path"] == "(required)" and defaults["data[].format"] == "auto"
    json.dumps(defaults)  # `sftlab config` prints every default as JSON


def test_set_overrides_nested_keys_with_typed_values(tmp_path):
    cfg = load_config(overrides=["lora.r=8", "learning_rate=1e-4", "max_steps=7", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.r == 8
    assert cfg.learning_rate == 1e-4
    assert cfg.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_is_named_with_the_closest_valid_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate'.*Did you mean 'learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="'lora.rank'.*Did you mean 'lora.r'"):
        load_config(overrides=["lora.rank=4"])


def test_invalid_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        load_config(overrides=["method=qlora"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(overrides=["batch_size=0"])


def test_data_accepts_plain_paths_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("data: train.json\neval_data: [held.jsonl]\n")
    cfg = load_config(path)
    assert cfg.data[0].path == str(tmp_path / "sub" / "train.json")
    assert cfg.data[0].format == "auto"  # detected from the fields when read
    assert cfg.eval_data[0].path == str(tmp_path / "sub" / "held.jsonl")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["method=lora", "seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-4 and saved["seed"] == 3
    assert load_config(tmp_path / "config.yaml").seed == 3


def test_a_saved_config_reloads_with_the_same_data_paths(tmp_path, monkeypatch):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "run.yaml").write_text("data: data/train.json\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("examples/run.yaml")  # a relative config path, as users type it
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml").data[0].path == str(tmp_path / "examples" / "data" / "train.json")


def test_sftlab_config_lists_every_key_with_its_default():
    from typer.testing import CliRunner

    from sftlab.cli import app

    result = CliRunner().invoke(app, ["config"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "data[].path" in result.output and "(required)" in result.output
    assert "lora.target_modules" in result.output and '"all-linear"' in result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.yaml")))
def test_every_example_config_loads_and_its_data_exists(name):
    cfg = load_config(Path(__file__).parents[1] / "examples" / name)
    for source in [*cfg.data, *cfg.eval_data]:
        assert Path(source.path).is_file(), source.path
