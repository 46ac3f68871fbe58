"""Conversation -> text + the character spans that are trained.

One rendering of the whole example gives both the text and the trained spans, so the mask
can never drift from what the model sees. The prompt used at inference is the same
rendering cut at the start of the response (`render_prompt`), which a test checks token by
token against training.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftlab.data.formats import Conversation, Message

# Stanford Alpaca's prompt, both variants, byte for byte (the seed's form ends with a newline
# after "### Response:").
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Rendered:
    text: str
    trained_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges that carry loss

    @property
    def prompt_end(self) -> int:
        return self.trained_spans[0][0] if self.trained_spans else len(self.text)


class TemplateError(ValueError):
    pass


class AlpacaTemplate:
    """The seed's Alpaca template; the response is followed by the tokenizer's EOS, which is trained."""

    name = "alpaca"

    def __init__(self, eos_token: str):
        if not eos_token:
            raise TemplateError("the tokenizer has no EOS token; the Alpaca template needs one to end responses")
        self.eos_token = eos_token

    def _prompt(self, messages: tuple[Message, ...]) -> str:
        instruction = "\n\n".join(m.content for m in messages if m.role == "user")
        context = "\n\n".join(m.content for m in messages if m.role == "input")
        if not instruction:
            raise TemplateError("the Alpaca template needs a user instruction")
        if context:
            return f"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        return f"{ALPACA_PREAMBLE_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n"

    def render(self, conversation: Conversation) -> Rendered:
        responses = [m for m in conversation.messages if m.role == "assistant"]
        if len(responses) != 1:
            raise TemplateError(f"{conversation.source}: the Alpaca template takes exactly one response, found {len(responses)}")
        prompt = self._prompt(conversation.prompt_messages())
        text = prompt + responses[0].content + self.eos_token
        spans = ((len(prompt), len(text)),) if responses[0].trained else ()
        return Rendered(text, spans)

    def render_prompt(self, conversation: Conversation) -> str:
        """The inference prompt: the conversation up to (not including) its response."""
        return self._prompt(conversation.prompt_messages())


TEMPLATES = {"alpaca": AlpacaTemplate}


def get_template(name: str, tokenizer) -> AlpacaTemplate:
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template '{name}'; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer.eos_token)
