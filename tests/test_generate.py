"""Generation uses the run's template and stops at the EOS the template trained."""

import json

import pytest

from sftlab.config import load_config
from sftlab.infer.generate import Generator
from sftlab.train.loop import train
from conftest import write_json


@pytest.mark.slow
def test_a_trained_eos_stops_generation(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "one.json", [{"instruction": "Say hi.", "input": "", "output": "Hi there, friend."}])
    config = load_config(overrides=[
        f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}", "batch_size=1",
        "max_steps=40", "learning_rate=1e-2", "warmup_ratio=0", "lr_scheduler=constant",
    ])
    train(config)
    generator = Generator.load(str(tmp_path / "run"))
    assert generator.template_name == "alpaca"
    # exactly the response: without a trained EOS the model would run on to max_new_tokens
    assert generator.generate([("Say hi.", "")], max_new_tokens=40) == ["Hi there, friend."]


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_model_dir):
    generator = Generator.load(str(tiny_model_dir))
    prompts = [("Name a colour.", ""), ("Translate the sentence into French, please, and keep it short.", "I like tea.")]
    together = generator.generate(prompts, max_new_tokens=8, batch_size=2)
    alone = [generator.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone


def test_run_info_records_the_template(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", [{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    train(load_config(overrides=[f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}", "max_steps=1"]))
    info = json.loads((tmp_path / "run" / "final" / "sftlab.json").read_text())
    assert info["template"] == "alpaca" and info["method"] == "full" and info["base_model"] == str(tiny_model_dir)


@pytest.mark.slow
def test_generation_stops_at_the_templates_end_token_when_it_is_not_eos(gemma_tokenizer, tmp_path):
    """A Gemma-style template ends turns with <end_of_turn>, not <eos>: generation must stop there too."""
    from sftlab.data.templates import get_template
    from sftlab.infer.engine import stop_tokens

    jinja = tmp_path / "gemma.jinja"
    jinja.write_text(
        "{%- for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
        " + m['content'] + '<end_of_turn>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
    )
    template = get_template(str(jinja), gemma_tokenizer)
    assert template.end_token == "<end_of_turn>" != gemma_tokenizer.eos_token
    ids, _ = stop_tokens(gemma_tokenizer, None, template)
    assert {gemma_tokenizer.eos_token_id, gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")} <= ids
