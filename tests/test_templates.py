"""The seed's Alpaca template, byte for byte, and the inference prompt as a prefix of training."""

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import AlpacaTemplate

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\nBonjour</s>"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a prime number.\n\n### Response:\nSeven.</s>"
)


def _conv(instruction, output, context=""):
    messages = [Message("user", instruction)] + ([Message("input", context)] if context else [])
    return Conversation(tuple(messages + [Message("assistant", output, trained=True)]))


def test_alpaca_with_input_byte_for_byte():
    rendered = AlpacaTemplate("</s>").render(_conv("Translate to French.", "Bonjour", "Good morning"))
    assert rendered.text == WITH_INPUT
    assert rendered.text[rendered.trained_spans[0][0]:] == "Bonjour</s>"


def test_alpaca_without_input_byte_for_byte():
    rendered = AlpacaTemplate("</s>").render(_conv("Name a prime number.", "Seven."))
    assert rendered.text == NO_INPUT
    assert rendered.trained_spans == ((len(NO_INPUT) - len("Seven.</s>"), len(NO_INPUT)),)


def test_inference_prompt_is_the_training_text_up_to_the_response():
    template = AlpacaTemplate("</s>")
    conversation = _conv("Translate to French.", "Bonjour", "Good morning")
    rendered = template.render(conversation)
    assert template.render_prompt(conversation) == rendered.text[: rendered.prompt_end]
    assert template.render_prompt(conversation).endswith("### Response:\n")


def test_a_chat_waiting_for_a_reply_keeps_all_its_turns():
    template = AlpacaTemplate("</s>")
    waiting = Conversation((Message("user", "Hi"), Message("assistant", "Hello", trained=True), Message("user", "Bye")))
    prompt = template.render_prompt(waiting)
    assert prompt.endswith("### Instruction:\nBye\n\n### Response:\n") and "Hello</s>" in prompt
