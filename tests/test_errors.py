"""One error family: every user-facing error is a SftlabError, and the `sftlab` command prints
any of them as one clean line with exit code 1 — a traceback only with --debug."""

import importlib
import subprocess
import sys

import pytest

from conftest import write_jsonl
from sftlab.errors import SftlabError

USER_ERRORS = [
    ("sftlab.config", "ConfigError"), ("sftlab.data.readers", "DataError"), ("sftlab.data.templates", "TemplateError"),
    ("sftlab.data.templates", "TemplateConsistencyError"), ("sftlab.models.registry", "ModelNotFoundError"),
    ("sftlab.errors", "NonFiniteLossError"), ("sftlab.errors", "ResourceError"), ("sftlab.errors", "QualityError"),
    ("sftlab.eval.errors", "EvalError"), ("sftlab.selfinstruct.seeds", "SelfInstructError"),
    ("sftlab.selfinstruct.seeds", "SeedTaskError"), ("sftlab.infer.chat", "ChatError"), ("sftlab.infer.server", "APIError"),
]


@pytest.mark.parametrize("module,name", USER_ERRORS)
def test_every_user_facing_error_is_a_sftlab_error(module, name):
    assert issubclass(getattr(importlib.import_module(module), name), SftlabError)


def _sftlab(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "sftlab", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _broken_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    with data.open("a") as handle:
        handle.write('{"instruction": "cut off", "output": \n')  # line 2 is not JSON
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\noutput_dir: {tmp_path}/out\n")
    return ["prepare", config]


@pytest.mark.slow
def test_an_error_deep_in_a_command_is_one_line_naming_the_place(tmp_path, tiny_model_dir):
    result = _sftlab(*_broken_run(tmp_path, tiny_model_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "error:" in result.stdout and "data.jsonl:2" in result.stdout and "on_error: skip" in result.stdout


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    for how in (["--debug"], []):
        env = {} if how else {"SFTLAB_DEBUG": "1"}
        result = _sftlab(*how, *_broken_run(tmp_path, tiny_model_dir), env=env)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "DataError" in result.stderr and "data.jsonl:2" in result.stderr


def test_a_stage_command_error_is_clean_too(tmp_path):
    result = _sftlab("filter", tmp_path / "missing.jsonl", "-o", tmp_path / "clean.jsonl", "--near-threshold", "3")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "error:" in result.stdout
