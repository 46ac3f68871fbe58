"""Multi-turn masks for every template, on the real SmolLM2 tokenizer: exactly the assistant
turns (with their end token) are trained; the inference prompt matches training token for token."""

from pathlib import Path

import numpy as np
import pytest

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import TemplateConsistencyError, check_consistency, get_template
from sftlab.data.tokenize import IGNORE_INDEX, tokenize_rendered

FORMATS = Path(__file__).parent / "fixtures" / "formats"
CHAT = Conversation((
    Message("system", "Be brief."),
    Message("user", "Hi!"), Message("assistant", "Hello there.", trained=True),
    Message("user", "What is 2+2?"), Message("assistant", "It is 4.", trained=True),
), "chat[0]")


def _trained_segments(tokenizer, template_name, conversation, train_on="assistant"):
    template = get_template(template_name, tokenizer)
    rendered = template.render(conversation, train_on)
    example = tokenize_rendered(tokenizer, [rendered], [conversation.source], 4096)[0]
    segments, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(int(token))
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return template, rendered, example, segments


@pytest.mark.parametrize("name", ["chatml", "tokenizer", "alpaca"])
def test_every_assistant_turn_and_its_end_token_is_trained_and_nothing_else(tokenizer, name):
    template, _, _, segments = _trained_segments(tokenizer, name, CHAT)
    end = template.end_token
    assert segments == [f"Hello there.{end}", f"It is 4.{end}"]


def test_chatml_text_byte_for_byte(tokenizer):
    _, rendered, _, _ = _trained_segments(tokenizer, "chatml", CHAT)
    assert rendered.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello there.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )


def test_alpaca_system_replaces_the_preamble_and_turns_repeat(tokenizer):
    _, rendered, _, _ = _trained_segments(tokenizer, "alpaca", CHAT)
    eos = tokenizer.eos_token
    assert rendered.text == (
        f"Be brief.\n\n### Instruction:\nHi!\n\n### Response:\nHello there.{eos}"
        f"\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\nIt is 4.{eos}"
    )


def test_train_on_last_and_all(tokenizer):
    _, _, _, last = _trained_segments(tokenizer, "chatml", CHAT, "last")
    assert last == ["It is 4.<|im_end|>"]
    _, rendered, example, _ = _trained_segments(tokenizer, "chatml", CHAT, "all")
    assert np.all(example.labels == example.input_ids)


def test_tokenizer_template_is_smollm2s_own(tokenizer):
    _, rendered, _, _ = _trained_segments(tokenizer, "tokenizer", CHAT)
    expected = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CHAT.messages], tokenize=False)
    assert rendered.text == expected


@pytest.mark.parametrize("name", ["chatml", "tokenizer", "alpaca"])
def test_inference_prompt_tokens_equal_training_tokens_for_every_turn(tokenizer, name):
    check_consistency(get_template(name, tokenizer), tokenizer, CHAT)  # raises on any difference


def test_a_mismatched_template_is_caught_and_shows_both_sides(tokenizer):
    template = get_template(str(FORMATS / "mismatched.jinja"), tokenizer)
    with pytest.raises(TemplateConsistencyError) as error:
        check_consistency(template, tokenizer, CHAT)
    message = str(error.value)
    assert "inference" in message and "training" in message and "assistant:" in message


def test_input_role_joins_the_user_turn_in_chat_templates(tokenizer):
    conversation = Conversation((Message("user", "Translate."), Message("input", "Hello"),
                                 Message("assistant", "Bonjour", trained=True)))
    _, rendered, _, segments = _trained_segments(tokenizer, "chatml", conversation)
    assert "<|im_start|>user\nTranslate.\n\nHello<|im_end|>" in rendered.text
    assert segments == ["Bonjour<|im_end|>"]


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer):
    conversation = Conversation((Message("text", "Pack my box.", trained=True),))
    _, rendered, example, _ = _trained_segments(tokenizer, "chatml", conversation)
    assert rendered.text == "Pack my box." + tokenizer.eos_token
    assert np.all(example.labels == example.input_ids)


@pytest.mark.slow
def test_chatml_refuses_a_tokenizer_without_im_end(gemma_tokenizer):
    from sftlab.data.templates import TemplateError

    with pytest.raises(TemplateError, match="needs <\\|im_end\\|>"):
        get_template("chatml", gemma_tokenizer)


def test_a_run_saves_its_custom_template_and_passes_the_check_on_reload(tiny_model_dir, tmp_path):
    import json

    from sftlab.config import load_config
    from sftlab.infer.generate import Generator
    from sftlab.train.loop import train

    custom = tmp_path / "my.jinja"
    custom.write_text(
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    config = load_config(overrides=[f"model={tiny_model_dir}", f"data={FORMATS / 'openai.jsonl'}",
                                    f"template={custom}", "on_error=skip", "max_steps=1", f"output_dir={tmp_path / 'run'}"])
    train(config)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "sftlab.json").read_text())["template"] == "sftlab_template.jinja"
    custom.unlink()  # the run no longer needs the original file
    generator = Generator.load(str(tmp_path / "run"))
    assert generator.prompt_text("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
