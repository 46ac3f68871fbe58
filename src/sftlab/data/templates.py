"""Conversation -> text + the character spans that are trained.

The trained spans are character ranges of rendered text, so the mask can never drift from what
the model sees. The prompt used at inference (`render_prompt`) is rendered with the generation
prompt, and `check_consistency` proves, token by token, that it equals the training prompt.

    | template    | what                                                                  |
    |-------------|-----------------------------------------------------------------------|
    | alpaca      | the seed's Alpaca prompt; system text replaces the preamble sentence  |
    | chatml      | <|im_start|>role\\ncontent<|im_end|>\\n; tools in the Hermes form       |
    | tokenizer   | the model's own Jinja chat template (e.g. SmolLM2's)                  |
    | FILE.jinja  | a custom Jinja chat template (Hugging Face conventions)               |

The mask rule: every trained assistant turn is trained once, in the context the model sees
when it generates that turn at inference — the tokens of the turn as the template renders the
conversation up to and including it, after the generation prompt the template renders for it.
Where the template renders the history the same way at every turn (chatml, alpaca, most
templates), that context is a prefix of the whole conversation, which stays one sequence (one
"view"). Where it does not (a family that drops earlier turns' reasoning, moves the system
prompt into the last user turn, ...), the turn is trained in a view of its own: the
conversation rendered up to that turn. The end token closing each turn is trained so
generation stops; an empty think block the template writes for a turn that has no reasoning
is masked (`train_empty_think`), and `train_reasoning: false` masks a turn's reasoning.

`train_on`: `assistant` (every trained assistant turn, default), `last` (the last one only) or
`all` (every token).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sftlab.data.formats import Conversation, Message, ToolCall
from sftlab.data.readers import DataError
from sftlab.errors import SftlabError

ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
TRAIN_ON = ("assistant", "last", "all")
# The Hermes/Qwen tool block of the built-in chatml (also in chat_templates/chatml.jinja).
CHATML_TOOLS_INTRO = ("# Tools\n\nYou can call functions to help with the request. Their signatures are listed "
                      "inside <tools></tools>, one JSON object a line:\n<tools>")
CHATML_TOOLS_RULES = ("\n</tools>\n\nTo call a function, write a JSON object with its name and arguments inside "
                      "<tool_call></tool_call> tags, one block a call:\n<tool_call>\n"
                      '{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')
# An empty think block at the start of a reply (Qwen3 writes one for a turn without reasoning).
EMPTY_THINK = re.compile(r"\s*<(think|thinking|reasoning)>\s*</\1>\s*")
# What opens a reasoning block at the start of a reply: a tag, or a special token.
REASONING_OPENER = re.compile(r"\s*(?:<[A-Za-z_][\w-]*>|<\|[^<>|]*\|>)")
# What closes a reasoning block after its text: a closing tag or a special token, then blank lines.
AFTER_REASONING = re.compile(r"\s*(?:</[A-Za-z_][\w-]*>|<\|[^<>|]*\|>|<｜[^<>]*｜>)?[ \t]*\n*")
# A template shows what it writes into the text: the probes below find out which of these it does.
SHOWS = ("tools", "tool_calls", "tool_results", "reasoning")


class TemplateError(SftlabError, ValueError):
    pass


class TemplateConsistencyError(TemplateError):
    """The inference prompt does not render or tokenize like the training text."""

    reason = "template_mismatch"


@dataclass(frozen=True)
class Rendered:
    """One sequence: text, the [start, end) character ranges that carry loss, and for each
    trained turn in it (message index, the character where its reply starts)."""

    text: str
    trained_spans: tuple[tuple[int, int], ...]
    turns: tuple[tuple[int, int], ...] = ()
    # tokenize text[:split_at] and text[split_at:] apart (see sftlab.data.tokenize.exact_views)
    split_at: int | None = None

    @property
    def prompt_end(self) -> int:
        return self.trained_spans[0][0] if self.trained_spans else len(self.text)


@dataclass(frozen=True)
class RenderedRow:
    """A conversation rendered for training: views[0] is the whole conversation; each further
    view is the conversation up to a turn the whole rendering shows in another context."""

    views: tuple[Rendered, ...]
    empty_think_masked: int = 0  # turns whose empty think block was masked
    reasoning_masked: int = 0  # turns whose reasoning was masked (train_reasoning: false)

    @property
    def text(self) -> str:
        return self.views[0].text

    @property
    def trained_spans(self) -> tuple[tuple[int, int], ...]:
        return self.views[0].trained_spans

    @property
    def prompt_end(self) -> int:
        return self.views[0].prompt_end


def _merge_inputs(messages) -> list[Message]:
    """Chat templates have no 'input' role: Alpaca's input joins the user turn before it."""
    out: list[Message] = []
    for m in messages:
        if m.role == "input" and out and out[-1].role == "user":
            out[-1] = dataclasses.replace(out[-1], content=out[-1].content + "\n\n" + m.content)
        elif m.role == "input":
            out.append(Message("user", m.content))
        else:
            out.append(m)
    return out


def inline_reasoning(message: Message) -> Message:
    """The turn with its reasoning written into the content, R1 style (for templates that do not
    render `reasoning_content`)."""
    if message.reasoning is None:
        return message
    return dataclasses.replace(message, content=f"<think>\n{message.reasoning}\n</think>\n\n{message.content}",
                               reasoning=None)


def template_messages(messages, reasoning_field: bool = True) -> list[dict]:
    """Messages as Hugging Face chat templates read them: tool calls with their arguments as
    objects, `reasoning_content` (or, with reasoning_field=False, the reasoning inline)."""
    items = []
    for m in messages:
        if not isinstance(m, Message):  # (role, content) pairs
            m = Message(m[0], m[1])
        if not reasoning_field:
            m = inline_reasoning(m)
        item = {"role": m.role, "content": m.content}
        if m.reasoning is not None:
            item["reasoning_content"] = m.reasoning
        if m.tool_calls:
            item["tool_calls"] = [c.template_dict() for c in m.tool_calls]
        if m.name:
            item["name"] = m.name
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        items.append(item)
    return items


CHAT_TEMPLATES = Path(__file__).with_name("chat_templates")  # the built-in templates, as Jinja


def render_jinja(source: str, messages, add_generation_prompt: bool, tools=(), **kwargs) -> str:
    """A Jinja chat template rendered exactly as transformers' apply_chat_template renders it
    (its sandbox, filters and message handling), for dicts, Messages or (role, content) pairs."""
    from transformers.utils.chat_template_utils import render_jinja_template

    items = [m if isinstance(m, dict) else template_messages([m])[0] for m in messages]
    rendered, _ = render_jinja_template(conversations=[items], tools=list(tools) or None, chat_template=source,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


def _jinja_literal(value) -> str:
    """A JSON-like value as a Jinja expression."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    raise TemplateError(f"template_kwargs: {value!r} is not a JSON value (give strings, numbers, booleans, lists, maps)")


def _first_difference(a, b) -> int:
    """The first index where two sequences differ (the shorter one's length when one is a prefix)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@functools.lru_cache(maxsize=None)
def _builtin_jinja(name: str) -> str:
    return (CHAT_TEMPLATES / f"{name}.jinja").read_text()


def template_errors() -> tuple[type[BaseException], ...]:
    """What rendering raises for messages a template cannot format: sftlab's errors, or a Jinja
    chat template's own error (e.g. its raise_exception for an unsupported role order)."""
    from jinja2 import TemplateError as JinjaError

    return (TemplateError, DataError, JinjaError)


class Template:
    """A chat template: `render_messages` draws text; spans come from rendering prefixes.

    `jinja` is the template as a Hugging Face chat template (what `sftlab export` writes into
    the tokenizer config). The built-in templates (alpaca, chatml) are defined by their Jinja
    files in `chat_templates/`; their Python `render_messages` is a fast path that
    `check_jinja` holds to the Jinja text on sample rows of every prepare (and the tests on
    every fixture). `shows` says which of tools, tool calls, tool results and reasoning the
    template writes into the text: a row with tools it cannot show is refused, and reasoning it
    does not render is written into the content as a <think> block."""

    name = "template"
    end_token: str = ""  # closes every assistant turn; trained
    eos_token: str = ""  # ends plain-text (pre-training style) examples
    shows: frozenset = frozenset()
    kwargs: dict = {}  # template_kwargs, passed to a Jinja template at every render
    special_tokens: str = "allow"  # special_tokens_in_content: text | allow | drop_row
    special = None  # a SpecialText that marks control-token text in messages (mode "text"), see data/special.py

    @property
    def jinja(self) -> str:
        return _builtin_jinja(self.name)

    @property
    def end_tokens(self) -> tuple[str, ...]:
        """Every token that closes an assistant turn (Llama 3.1 closes a tool call with <|eom_id|>)."""
        return (self.end_token,) if self.end_token else ()

    @property
    def export_jinja(self) -> str:
        """The Jinja text an exported model carries: the template, with the run's template_kwargs
        as defaults in front (a tokenizer config cannot carry kwargs; a caller's own value wins)."""
        defaults = "".join(f"{{%- if {name} is not defined %}}{{%- set {name} = {_jinja_literal(value)} %}}{{%- endif %}}"
                           for name, value in self.kwargs.items())
        return defaults + self.jinja

    def _prepared(self, messages) -> list[Message]:
        """The messages as this template renders them: control-token text marked (to stay text),
        reasoning inline when the template does not show it."""
        messages = [m if isinstance(m, Message) else Message(m[0], m[1]) for m in messages]
        if self.special is not None:
            messages = self.special.mark_messages(messages)
        if "reasoning" in self.shows or all(m.reasoning is None for m in messages):
            return messages
        return [inline_reasoning(m) for m in messages]

    def _tools(self, tools) -> tuple:
        return tuple(self.special.mark_value(list(tools))) if self.special is not None and tools else tuple(tools)

    def jinja_messages(self, messages) -> list[dict]:
        """What this template's Jinja text is given for `messages`."""
        return template_messages(self._prepared(messages))

    def check_jinja(self, conversation: Conversation) -> None:
        """TemplateConsistencyError unless the Jinja text renders this conversation (and its
        inference prompt) exactly as `render_messages` does."""
        for messages, generation in ((conversation.messages, False), (conversation.prompt_messages(), True)):
            ours = self.render_messages(messages, generation, conversation.tools)
            theirs = render_jinja(self.jinja, self.jinja_messages(messages), generation, self._tools(conversation.tools),
                                  eos_token=self.eos_token)
            if ours != theirs:
                at = _first_difference(ours, theirs)
                raise TemplateConsistencyError(
                    f"{conversation.source}: template '{self.name}' renders differently from its Jinja text "
                    f"from character {at}: {ours[max(0, at - 30): at + 30]!r} vs {theirs[max(0, at - 30): at + 30]!r}")

    def render_messages(self, messages, add_generation_prompt: bool, tools=()) -> str:
        raise NotImplementedError

    def render_prompt(self, conversation: Conversation) -> str:
        """The inference prompt: the conversation up to its last response, plus the generation
        prompt, rendered from the template's Jinja text (what an exported model's chat template
        renders; training's fast renderer is held to the same text)."""
        return self.generation_prompt(conversation.prompt_messages(), conversation.tools)

    def generation_prompt(self, messages, tools=()) -> str:
        """`messages` and the start of the assistant's reply, from the Jinja text."""
        return render_jinja(self.jinja, self.jinja_messages(messages), True, self._tools(tools), eos_token=self.eos_token)

    def check_shows(self, conversation: Conversation) -> None:
        """DataError (with the row's location) when the row has tools, tool calls or tool results
        and the template does not write them: a model trained on it would never see them."""
        if len(self.shows) == len(SHOWS):
            return
        missing = []
        if conversation.tools and "tools" not in self.shows:
            missing.append("tools (the functions offered)")
        if any(m.tool_calls for m in conversation.messages) and "tool_calls" not in self.shows:
            missing.append("tool calls")
        if any(m.role == "tool" for m in conversation.messages) and "tool_results" not in self.shows:
            missing.append("tool results")
        if missing:
            raise DataError(
                f"{conversation.source}: the row has {' and '.join(missing)}, but template '{self.name}' does not "
                "render them, so the model would never see them; use `template: chatml` (tools, calls and results in "
                "the Hermes <tool_call> form), the model's own chat template if it handles tools, or a .jinja file "
                "that does", "template_cannot_show_tools")

    def _render(self, conversation: Conversation, messages, generation: bool) -> str:
        try:
            return self.render_messages(messages, generation, conversation.tools)
        except (TemplateError, DataError):
            raise
        except template_errors() as exc:  # a Jinja template's raise_exception or a template bug
            raise DataError(f"{conversation.source}: template '{self.name}' cannot render this row: {exc}",
                            "template_error") from None

    def _turn_end(self, text: str, start: int, source: str) -> int:
        """The end of the turn whose reply starts at `start`: after its last end token."""
        found = [(text.rfind(token, start), token) for token in self.end_tokens if text.find(token, start) >= 0]
        if not found:
            raise DataError(
                f"{source}: template '{self.name}' does not close this assistant turn with "
                f"{' or '.join(map(repr, self.end_tokens)) or 'an end token'}; a model trained on it would not learn to "
                "stop", "no_end_token")
        at, token = max(found)
        return at + len(token)

    def render(self, conversation: Conversation, train_on: str = "assistant", train_reasoning: bool = True,
               train_empty_think: bool = False) -> RenderedRow:
        messages = conversation.messages
        if len(messages) == 1 and messages[0].role == "text":
            text = self._prepared(messages)[0].content + self.eos_token
            return RenderedRow((Rendered(text, ((0, len(text)),)),))
        self.check_shows(conversation)
        full = self._render(conversation, messages, False)
        if train_on == "all":
            return RenderedRow((Rendered(full, ((0, len(full)),)),))
        turns = [i for i, m in enumerate(messages) if m.role == "assistant" and m.trained]
        if train_on == "last":
            turns = turns[-1:]
        views = [(full, [], [])]  # (text, trained spans, (turn, reply start))
        masked_think = masked_reasoning = 0
        for i in reversed(turns):
            prompt = self._render(conversation, messages[:i], True)
            upto = full if i == len(messages) - 1 else self._render(conversation, messages[: i + 1], False)
            if not upto.startswith(prompt):
                at = _first_difference(prompt, upto)
                raise TemplateConsistencyError(
                    f"{conversation.source}: template '{self.name}' renders turn {i} differently as an inference "
                    f"prompt than inside the conversation, from character {at}:\n"
                    f"  inference: {prompt[max(0, at - 40): at + 40]!r}\n  training:  {upto[max(0, at - 40): at + 40]!r}"
                )
            start = len(prompt)
            end = self._turn_end(upto, start, conversation.source)
            trained_from = start
            reply = upto[start:end]
            if messages[i].reasoning is not None and self._shown(messages[i].reasoning) not in reply:
                raise DataError(
                    f"{conversation.source}: template '{self.name}' does not write turn {i}'s reasoning (it strips "
                    "reasoning from assistant turns, as DeepSeek-R1's own template does), so it would not be trained; "
                    "use a template that renders reasoning_content (chatml, or a .jinja file) or remove the reasoning",
                    "reasoning_not_rendered")
            if messages[i].reasoning is None:
                empty = EMPTY_THINK.match(reply)
                if empty and not train_empty_think and empty.end() < len(reply):
                    trained_from, masked_think = start + empty.end(), masked_think + 1
            elif not train_reasoning:
                trained_from = start + self._reasoning_end(reply, messages[i].reasoning, conversation.source, i)
                masked_reasoning += 1
            view = next((v for v in views if v[0][:end] == upto[:end]), None)
            if view is None:  # the whole rendering shows this turn in another context: a view of its own
                view = (upto, [], [])
                views.append(view)
            view[1].append((trained_from, end))
            view[2].append((i, start))
        extra = sorted(views[1:], key=lambda v: min(v[2]))
        rendered = tuple(Rendered(text, tuple(sorted(spans)), tuple(sorted(starts)))
                         for text, spans, starts in [views[0], *extra])
        return RenderedRow(rendered, masked_think, masked_reasoning)

    def _shown(self, text: str) -> str:
        """`text` as it appears in the rendered text (control-token text marked)."""
        text = text.strip()
        return self.special.mark(text) if self.special is not None else text

    def _reasoning_end(self, reply: str, reasoning: str, source: str, turn: int) -> int:
        """Where the reasoning block of a reply ends (after its closing tag and blank lines)."""
        text = self._shown(reasoning)
        opener = REASONING_OPENER.match(reply)  # the reasoning is searched after the block's opening tag
        at = reply.find(text, opener.end() if opener else 0)
        if at < 0:
            raise DataError(f"{source}: template '{self.name}' does not write turn {turn}'s reasoning as given, so "
                            "it cannot be masked; set `train_reasoning: true` or use a template that writes it",
                            "reasoning_not_rendered")
        return min(AFTER_REASONING.match(reply, at + len(text)).end(), len(reply) - 1)


class AlpacaTemplate(Template):
    """The seed's Alpaca template; each response is followed by the tokenizer's EOS (trained).

    Further turns repeat the Instruction/Response blocks; a system message replaces the
    preamble sentence. It has no place for tools; reasoning is written inline (<think>).
    """

    name = "alpaca"

    def __init__(self, eos_token: str):
        if not eos_token:
            raise TemplateError("the tokenizer has no EOS token; the Alpaca template needs one to end responses")
        self.end_token = self.eos_token = eos_token

    def render_messages(self, messages, add_generation_prompt, tools=()):
        messages = self._prepared(messages)
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

    def render(self, conversation: Conversation, train_on: str = "assistant", **options) -> RenderedRow:
        if not any(m.role == "user" for m in conversation.messages) and conversation.messages[0].role != "text":
            raise TemplateError(f"{conversation.source}: the Alpaca template needs a user instruction")
        return super().render(conversation, train_on, **options)


def _tool_call_json(call: ToolCall) -> str:
    arguments = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments, ensure_ascii=False)
    return '{"name": ' + json.dumps(call.name, ensure_ascii=False) + ', "arguments": ' + arguments + "}"


class ChatMLTemplate(Template):
    """ChatML, with tools in the Hermes/Qwen form and reasoning as a <think> block in every turn
    (so the history renders the same at every turn: one sequence a conversation)."""

    name = "chatml"
    end_token = "<|im_end|>"
    shows = frozenset(SHOWS)

    def __init__(self, tokenizer):
        self.eos_token = tokenizer.eos_token
        ids = tokenizer.convert_tokens_to_ids(self.end_token)
        if ids is None or ids == tokenizer.unk_token_id:
            raise TemplateError(
                "template 'chatml' needs <|im_end|> as a single token of the tokenizer (SmolLM2 has it); "
                "use `template: tokenizer` (the model's own chat template) or `alpaca` for this model"
            )

    def _prepared(self, messages) -> list[Message]:
        return _merge_inputs(super()._prepared(messages))

    def render_messages(self, messages, add_generation_prompt, tools=()):
        messages, tools = self._prepared(messages), self._tools(tools)
        parts = []
        if tools:
            block = CHATML_TOOLS_INTRO + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + CHATML_TOOLS_RULES
            system = messages[0].content + "\n\n" if messages and messages[0].role == "system" else ""
            parts.append(f"<|im_start|>system\n{system}{block}<|im_end|>\n")
        for k, m in enumerate(messages):
            if k == 0 and tools and m.role == "system":
                continue
            if m.role == "tool":
                opens = k == 0 or messages[k - 1].role != "tool"
                closes = k == len(messages) - 1 or messages[k + 1].role != "tool"
                parts.append(("<|im_start|>user\n" if opens else "\n") + f"<tool_response>\n{m.content}\n</tool_response>"
                             + ("<|im_end|>\n" if closes else ""))
            elif m.role == "assistant":
                body = m.content
                for call in m.tool_calls:
                    body += ("\n" if body else "") + "<tool_call>\n" + _tool_call_json(call) + "\n</tool_call>"
                think = f"<think>\n{m.reasoning}\n</think>\n\n" if m.reasoning else ""
                parts.append(f"<|im_start|>assistant\n{think}{body}<|im_end|>\n")
            else:
                parts.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


PROBE_TOOL = {"type": "function", "function": {"name": "sftlab_probe_tool", "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
# Mistral's templates want call ids of 9 letters and digits
PROBE_CALL = ToolCall("sftlab_probe_call", {"probe": 1}, "a1b2c3d4e")


class JinjaTemplate(Template):
    """The tokenizer's own chat template, or a custom Jinja file, rendered by transformers with
    `template_kwargs` (e.g. enable_thinking). What it shows (tools, calls, results, reasoning)
    and how it closes a tool-calling turn are found by rendering probe conversations."""

    def __init__(self, tokenizer, source: str | None = None, name: str = "tokenizer", kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token
        self.source = source
        self.name = name
        self.kwargs = dict(kwargs or {})
        if source is None and not tokenizer.chat_template:
            raise TemplateError("template 'tokenizer': this tokenizer has no chat template; use alpaca or chatml")
        self.shows = self._probe_shows()
        self.end_token = self._find_end_token()
        self._end_tokens = (self.end_token, *self._tool_call_end())

    @property
    def jinja(self) -> str:
        return self.source or self.tokenizer.chat_template

    @property
    def end_tokens(self) -> tuple[str, ...]:
        return self._end_tokens

    def check_jinja(self, conversation: Conversation) -> None:
        """Rendered by transformers from the Jinja text itself: nothing to compare."""

    def generation_prompt(self, messages, tools=()) -> str:
        return self.render_messages(messages, True, tools)

    def render_messages(self, messages, add_generation_prompt, tools=()):
        return self.tokenizer.apply_chat_template(
            template_messages(_merge_inputs(self._prepared(messages))), tools=list(self._tools(tools)) or None,
            tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.source, **self.kwargs,
        )

    def _special_tokens(self) -> list[str]:
        return sorted(set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()), key=len, reverse=True)

    def _probe_shows(self) -> frozenset:
        user = Message("user", "hi")
        call = Message("assistant", "", True, (PROBE_CALL,))
        result = Message("tool", "sftlab-probe-result", name=PROBE_CALL.name, tool_call_id=PROBE_CALL.id)
        probes = {
            "tools": (((user,), True, (PROBE_TOOL,)), PROBE_TOOL["function"]["name"]),
            "tool_calls": (((user, call), False, ()), PROBE_CALL.name),
            "tool_results": (((user, call, result, Message("assistant", "ok", True)), False, ()), "sftlab-probe-result"),
            "reasoning": (((user, Message("assistant", "sftlab-probe-answer", True, reasoning="sftlab-probe-reasoning")),
                           False, ()), "sftlab-probe-reasoning"),
        }
        found = set()
        for kind, ((messages, generation, tools), marker) in probes.items():
            try:
                text = self.tokenizer.apply_chat_template(
                    template_messages(messages), tools=list(tools) or None, tokenize=False,
                    add_generation_prompt=generation, chat_template=self.source, **self.kwargs)
            except Exception:  # noqa: BLE001 - a template that raises for a probe does not show that kind
                continue
            if marker in text:
                found.add(kind)
        return frozenset(found)

    def _find_end_token(self) -> str:
        """The special token the template writes right after an assistant's content (else EOS)."""
        probe = "sftlab-probe-answer"
        text = self.render_messages((Message("user", "hi"), Message("assistant", probe)), False)
        after = text[text.rfind(probe) + len(probe):]
        for token in self._special_tokens():
            if token and after.startswith(token):
                return token
        if self.tokenizer.eos_token and after.lstrip().startswith(self.tokenizer.eos_token):
            return self.tokenizer.eos_token
        raise TemplateError(
            f"template '{self.name}' writes {after[:30]!r} after an assistant turn, not a special end token; "
            "a model trained on it would not learn to stop"
        )

    def _tool_call_end(self) -> tuple[str, ...]:
        """The token that closes a turn ending in a tool call, when it is not the usual end token
        (the last special token the template writes for that turn)."""
        if "tool_calls" not in self.shows:
            return ()
        text = self.render_messages((Message("user", "hi"), Message("assistant", "", True, (PROBE_CALL,))), False)
        after = text[text.rfind(PROBE_CALL.name):]
        last = max(((after.rfind(t), t) for t in self._special_tokens() if t and t in after), default=None)
        return (last[1],) if last and last[1] != self.end_token else ()


def get_template(name: str, tokenizer, kwargs: dict | None = None, special_tokens: str = "text") -> Template:
    """alpaca | chatml | tokenizer | a path to a .jinja file; `kwargs` are the run's template_kwargs
    (for Jinja templates); `special_tokens` the run's special_tokens_in_content (text: control-token
    text in messages stays text)."""
    template = _template(name, tokenizer, kwargs)
    from sftlab.data.special import MODES, SpecialText, control_tokens

    if special_tokens not in MODES:
        raise TemplateError(f"special_tokens_in_content: {special_tokens!r}; use one of {', '.join(MODES)}")
    template.special_tokens = special_tokens
    template.special = SpecialText(control_tokens(tokenizer)) if special_tokens == "text" else None
    return template


def _template(name: str, tokenizer, kwargs: dict | None) -> Template:
    for key in kwargs or {}:
        if not re.fullmatch(r"[A-Za-z_]\w*", str(key)) or key in ("messages", "tools", "add_generation_prompt"):
            raise TemplateError(f"template_kwargs: {key!r} is not a variable name a chat template can be given")
    if kwargs and name in ("alpaca", "chatml"):
        raise TemplateError(f"template_kwargs ({', '.join(kwargs)}) are passed to Jinja chat templates (template: "
                            f"tokenizer or a .jinja file); the built-in '{name}' template reads none")
    if name == "alpaca":
        return AlpacaTemplate(tokenizer.eos_token)
    if name == "chatml":
        return ChatMLTemplate(tokenizer)
    if name == "tokenizer":
        return JinjaTemplate(tokenizer, kwargs=kwargs)
    if name.endswith((".jinja", ".j2")):
        path = Path(name)
        if not path.is_file():
            raise TemplateError(f"template file {path} not found")
        return JinjaTemplate(tokenizer, path.read_text(), name=path.name, kwargs=kwargs)
    raise TemplateError(f"unknown template '{name}'; use alpaca, chatml, tokenizer, or a path to a .jinja file")


def run_template(info: dict, tokenizer, template: str | None = None) -> Template:
    """The template a saved run trained with (its name, template_kwargs and special-token mode in
    sftlab.json; a run saved before the mode existed let control-token text through); `template`
    replaces the name (a plain model folder)."""
    mode = info.get("special_tokens_in_content", "allow" if info else "text")
    kwargs = info.get("template_kwargs") or None
    if template in ("alpaca", "chatml"):
        kwargs = None  # a built-in chosen over the run's own template reads no kwargs
    return get_template(template or info.get("template", "alpaca"), tokenizer, kwargs, mode)


def template_fingerprint(template: Template) -> str:
    """What identifies a template's output (for the data cache and the saved run)."""
    kwargs = json.dumps(template.kwargs, sort_keys=True, default=str) if template.kwargs else ""
    return f"{template.name}|{template.end_token}|{getattr(template, 'source', None) or ''}|{kwargs}|{template.special_tokens}"


def check_consistency(template: Template, tokenizer, conversation: Conversation, train_on: str = "assistant",
                      **options) -> None:
    """Raise TemplateConsistencyError unless, in every view, every trained turn's inference
    prompt tokenizes to exactly the view's token ids before that turn's reply."""
    if train_on == "all":
        return
    from sftlab.data.tokenize import encode_ids, exact_views, view_tokens

    row = exact_views(tokenizer, template.render(conversation, train_on, **options))
    for view in row.views:
        if not view.turns:
            continue
        ids, offsets = view_tokens(tokenizer, view)
        for turn, start in view.turns:
            prompt = template.generation_prompt(conversation.messages[:turn], conversation.tools)  # as inference renders it
            prompt_ids = encode_ids(tokenizer, prompt)
            first_reply = next((k for k, (s, _) in enumerate(offsets) if s >= start), len(ids))
            if prompt_ids != ids[:first_reply]:
                at = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), first_reply))
                show = lambda seq: " ".join(f"{t}:{tokenizer.decode([t])!r}" for t in seq[max(0, at - 3): at + 5])
                raise TemplateConsistencyError(
                    f"{conversation.source}: template '{template.name}': the inference prompt for turn {turn} does not "
                    f"tokenize like the training text (first difference at token {at}):\n"
                    f"  inference ids: {show(prompt_ids)}\n  training ids:  {show(ids)}\n"
                    "A model trained this way would see different tokens at inference; fix the template."
                )
