"""Conversation -> text + the character spans that are trained.

One rendering of the whole conversation gives the text; the trained spans are character
ranges of that same text, so the mask can never drift from what the model sees. The prompt
used at inference (`render_prompt`) is rendered with the generation prompt, and
`check_consistency` proves, token by token, that it equals the training prompt.

    | template    | what                                                                  |
    |-------------|-----------------------------------------------------------------------|
    | alpaca      | the seed's Alpaca prompt; system text replaces the preamble sentence  |
    | chatml      | <|im_start|>role\\ncontent<|im_end|>\\n                                  |
    | tokenizer   | the model's own Jinja chat template (e.g. SmolLM2's)                  |
    | FILE.jinja  | a custom Jinja chat template (Hugging Face conventions)               |

`train_on`: `assistant` (every assistant turn, default), `last` (the last assistant turn
only) or `all` (every token). Each trained assistant turn ends with the template's end
token (EOS for alpaca), which is trained so generation stops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from sftlab.data.formats import Conversation, Message
from sftlab.errors import SftlabError

ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
TRAIN_ON = ("assistant", "last", "all")


class TemplateError(SftlabError, ValueError):
    pass


class TemplateConsistencyError(TemplateError):
    """The inference prompt does not tokenize like the training prompt."""


@dataclass(frozen=True)
class Rendered:
    text: str
    trained_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges that carry loss

    @property
    def prompt_end(self) -> int:
        return self.trained_spans[0][0] if self.trained_spans else len(self.text)


def _merge_inputs(messages: tuple[Message, ...]) -> list[Message]:
    """Chat templates have no 'input' role: Alpaca's input joins the user turn before it."""
    out: list[Message] = []
    for m in messages:
        if m.role == "input" and out and out[-1].role == "user":
            out[-1] = Message("user", out[-1].content + "\n\n" + m.content)
        elif m.role == "input":
            out.append(Message("user", m.content))
        else:
            out.append(m)
    return out


CHAT_TEMPLATES = Path(__file__).with_name("chat_templates")  # the built-in templates, as Jinja


def render_jinja(source: str, messages, add_generation_prompt: bool, **special_tokens) -> str:
    """A Jinja chat template rendered as transformers' apply_chat_template renders it (sandboxed,
    trim_blocks, lstrip_blocks), for messages of (role, content) or Message."""
    items = [{"role": m.role, "content": m.content} if isinstance(m, Message) else {"role": m[0], "content": m[1]}
             for m in messages]
    return _compiled(source).render(messages=items, add_generation_prompt=add_generation_prompt, **special_tokens)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)


def _first_difference(a, b) -> int:
    """The first index where two sequences differ (the shorter one's length when one is a prefix)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@functools.lru_cache(maxsize=None)
def _builtin_jinja(name: str) -> str:
    return (CHAT_TEMPLATES / f"{name}.jinja").read_text()


class Template:
    """A chat template: `render_messages` draws text; spans come from rendering prefixes.

    `jinja` is the template as a Hugging Face chat template (what `sftlab export` writes into
    the tokenizer config). The built-in templates (alpaca, chatml) are defined by their Jinja
    files in `chat_templates/`; their Python `render_messages` is a fast path that
    `check_jinja` holds to the Jinja text on sample rows of every prepare (and the tests on
    every fixture)."""

    name = "template"
    end_token: str = ""  # closes every assistant turn; trained
    eos_token: str = ""  # ends plain-text (pre-training style) examples

    @property
    def jinja(self) -> str:
        return _builtin_jinja(self.name)

    def check_jinja(self, conversation: Conversation) -> None:
        """TemplateConsistencyError unless the Jinja text renders this conversation (and its
        inference prompt) exactly as `render_messages` does."""
        source = self.jinja
        for messages, generation in ((conversation.messages, False), (conversation.prompt_messages(), True)):
            ours = self.render_messages(messages, generation)
            theirs = render_jinja(source, messages, generation, eos_token=self.eos_token)
            if ours != theirs:
                at = _first_difference(ours, theirs)
                raise TemplateConsistencyError(
                    f"{conversation.source}: template '{self.name}' renders differently from its Jinja text "
                    f"from character {at}: {ours[max(0, at - 30): at + 30]!r} vs {theirs[max(0, at - 30): at + 30]!r}")

    def render_messages(self, messages: tuple[Message, ...], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def render_prompt(self, conversation: Conversation) -> str:
        """The inference prompt: the conversation up to its last response, plus the generation
        prompt, rendered from the template's Jinja text (what an exported model's chat template
        renders; training's fast renderer is held to the same text)."""
        return self.generation_prompt(conversation.prompt_messages())

    def generation_prompt(self, messages: tuple[Message, ...]) -> str:
        """`messages` and the start of the assistant's reply, from the Jinja text."""
        return render_jinja(self.jinja, messages, True, eos_token=self.eos_token)

    def render(self, conversation: Conversation, train_on: str = "assistant") -> Rendered:
        messages = conversation.messages
        if len(messages) == 1 and messages[0].role == "text":
            text = messages[0].content + self.eos_token
            return Rendered(text, ((0, len(text)),))
        text = self.render_messages(messages, False)
        if train_on == "all":
            return Rendered(text, ((0, len(text)),))
        turns = [i for i, m in enumerate(messages) if m.role == "assistant" and m.trained]
        if train_on == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            # the response starts where the generation prompt for it ends, and stops after its end token
            prompt = self.render_messages(messages[:i], True)
            upto = self.render_messages(messages[: i + 1], False)
            if not text.startswith(prompt) or not text.startswith(upto):
                bad = prompt if not text.startswith(prompt) else upto
                at = _first_difference(bad, text)
                raise TemplateConsistencyError(
                    f"{conversation.source}: template '{self.name}' renders turn {i} differently as an inference "
                    f"prompt than inside the conversation, from character {at}:\n"
                    f"  inference: {bad[max(0, at - 40): at + 40]!r}\n  training:  {text[max(0, at - 40): at + 40]!r}"
                )
            end = upto.rfind(self.end_token, len(prompt)) if self.end_token else -1
            if end < 0:
                raise TemplateError(
                    f"template '{self.name}' does not close assistant turns with {self.end_token!r}; "
                    "a model trained on it would not learn to stop"
                )
            spans.append((len(prompt), end + len(self.end_token)))
        return Rendered(text, tuple(spans))


class AlpacaTemplate(Template):
    """The seed's Alpaca template; each response is followed by the tokenizer's EOS (trained).

    Further turns repeat the Instruction/Response blocks; a system message replaces the
    preamble sentence.
    """

    name = "alpaca"

    def __init__(self, eos_token: str):
        if not eos_token:
            raise TemplateError("the tokenizer has no EOS token; the Alpaca template needs one to end responses")
        self.end_token = self.eos_token = eos_token

    def render_messages(self, messages, add_generation_prompt):
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        first_has_input = False
        for m in messages:
            if m.role == "input":
                first_has_input = True
            if m.role == "assistant":
                break
        if system:
            preamble = system
        else:
            preamble = ALPACA_PREAMBLE_WITH_INPUT if first_has_input else ALPACA_PREAMBLE_NO_INPUT
        parts = [preamble]
        for m in messages:
            if m.role == "user":
                parts.append(f"\n\n### Instruction:\n{m.content}")
            elif m.role == "input":
                parts.append(f"\n\n### Input:\n{m.content}")
            elif m.role == "assistant":
                parts.append(f"\n\n### Response:\n{m.content}{self.end_token}")
        if add_generation_prompt:
            parts.append("\n\n### Response:\n")
        return "".join(parts)

    def render(self, conversation: Conversation, train_on: str = "assistant") -> Rendered:
        if not any(m.role == "user" for m in conversation.messages) and conversation.messages[0].role != "text":
            raise TemplateError(f"{conversation.source}: the Alpaca template needs a user instruction")
        return super().render(conversation, train_on)


class ChatMLTemplate(Template):
    name = "chatml"
    end_token = "<|im_end|>"

    def __init__(self, tokenizer):
        self.eos_token = tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids(self.end_token)
        if ids is None or ids == tokenizer.unk_token_id:
            raise TemplateError(
                "template 'chatml' needs <|im_end|> as a single token of the tokenizer (SmolLM2 has it); "
                "use `template: tokenizer` (the model's own chat template) or `alpaca` for this model"
            )

    def render_messages(self, messages, add_generation_prompt):
        text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in _merge_inputs(messages))
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class JinjaTemplate(Template):
    """The tokenizer's own chat template, or a custom Jinja file, rendered by transformers."""

    def __init__(self, tokenizer, source: str | None = None, name: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token
        self.source = source
        self.name = name
        if source is None and not tokenizer.chat_template:
            raise TemplateError("template 'tokenizer': this tokenizer has no chat template; use alpaca or chatml")
        self.end_token = self._find_end_token()

    @property
    def jinja(self) -> str:
        return self.source or self.tokenizer.chat_template

    def check_jinja(self, conversation: Conversation) -> None:
        """Rendered by transformers from the Jinja text itself: nothing to compare."""

    def generation_prompt(self, messages: tuple[Message, ...]) -> str:
        return self.render_messages(messages, True)

    def render_messages(self, messages, add_generation_prompt):
        dicts = [{"role": m.role, "content": m.content} for m in _merge_inputs(messages)]
        return self.tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.source,
        )

    def _find_end_token(self) -> str:
        """The special token the template writes right after an assistant's content (else EOS)."""
        probe = "sftlab-probe-answer"
        text = self.render_messages((Message("user", "hi"), Message("assistant", probe)), False)
        after = text[text.rfind(probe) + len(probe):]
        for token in sorted(self.tokenizer.all_special_tokens + list(self.tokenizer.get_added_vocab()), key=len, reverse=True):
            if token and after.startswith(token):
                return token
        if self.tokenizer.eos_token and after.lstrip().startswith(self.tokenizer.eos_token):
            return self.tokenizer.eos_token
        raise TemplateError(
            f"template '{self.name}' writes {after[:30]!r} after an assistant turn, not a special end token; "
            "a model trained on it would not learn to stop"
        )


def get_template(name: str, tokenizer) -> Template:
    """alpaca | chatml | tokenizer | a path to a .jinja file."""
    if name == "alpaca":
        return AlpacaTemplate(tokenizer.eos_token)
    if name == "chatml":
        return ChatMLTemplate(tokenizer)
    if name == "tokenizer":
        return JinjaTemplate(tokenizer)
    if name.endswith((".jinja", ".j2")):
        path = Path(name)
        if not path.is_file():
            raise TemplateError(f"template file {path} not found")
        return JinjaTemplate(tokenizer, path.read_text(), name=path.name)
    raise TemplateError(f"unknown template '{name}'; use alpaca, chatml, tokenizer, or a path to a .jinja file")


def template_fingerprint(template: Template) -> str:
    """What identifies a template's output (for the data cache and the saved run)."""
    return f"{template.name}|{template.end_token}|{getattr(template, 'source', None) or ''}"


def check_consistency(template: Template, tokenizer, conversation: Conversation, train_on: str = "assistant") -> None:
    """Raise TemplateConsistencyError unless every trained turn's inference prompt tokenizes to
    exactly the training token ids before that turn's first trained token."""
    rendered = template.render(conversation, train_on)
    if train_on == "all" or not rendered.trained_spans:
        return
    encoded = tokenizer(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    assistant_turns = [i for i, m in enumerate(conversation.messages) if m.role == "assistant" and m.trained]
    if train_on == "last":
        assistant_turns = assistant_turns[-1:]
    for turn, (start, _) in zip(assistant_turns, rendered.trained_spans):
        prompt = template.generation_prompt(conversation.messages[:turn])  # as inference renders it
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        first_trained = next((k for k, (s, _) in enumerate(offsets) if s >= start), len(ids))
        if prompt_ids != ids[:first_trained]:
            at = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), first_trained))
            show = lambda seq: " ".join(f"{t}:{tokenizer.decode([t])!r}" for t in seq[max(0, at - 3): at + 5])
            raise TemplateConsistencyError(
                f"{conversation.source}: template '{template.name}': the inference prompt for turn {turn} does not "
                f"tokenize like the training text (first difference at token {at}):\n"
                f"  inference ids: {show(prompt_ids)}\n  training ids:  {show(ids)}\n"
                "A model trained this way would see different tokens at inference; fix the template."
            )
