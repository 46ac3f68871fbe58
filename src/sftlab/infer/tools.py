"""Generated text -> OpenAI's assistant message: content, `reasoning_content` and `tool_calls`.

    | parser  | the calls, as a model trained on that form writes them                        |
    |---------|-------------------------------------------------------------------------------|
    | hermes  | <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block a call    |
    |         | (sftlab's chatml, Qwen, Hermes)                                               |
    | mistral | [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or name[ARGS]{...}      |
    | llama3  | {"name": ..., "parameters": {...}} as the whole reply (after <|python_tag|>)  |
    | none    | no parsing: the text is the content                                           |

`auto` picks the parser from what the run's template writes (choose_parser). Reasoning is a
`<think>...</think>` block opening the reply. A call that does not parse (malformed JSON, a
block cut by max_tokens) comes back as plain content, never an error. `ReplyStream` does the
same while text streams in: content goes out as soon as it cannot be the start of a call, and
what may still become a call is held back until the reply ends.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from sftlab.data.formats import ToolCall

PARSERS = ("auto", "hermes", "mistral", "llama3", "none")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def choose_parser(template) -> str:
    """The parser for the calls a template writes: from its Jinja text (chatml: hermes)."""
    text = getattr(template, "jinja", "") or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or ("ipython" in text and '"parameters"' in text):
        return "llama3"
    return "none"


def resolve_parser(setting: str, template) -> str:
    if setting not in PARSERS:
        raise ValueError(f"tool_parser {setting!r}: use one of {', '.join(PARSERS)}")
    return choose_parser(template) if setting == "auto" else setting


def new_call_id(parser: str) -> str:
    """An id for a parsed call: 9 letters and digits for Mistral (its templates check), else OpenAI's form."""
    if parser == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def _call(item, parser: str, names: set[str] | None) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or (names is not None and item["name"] not in names):
        return None
    return ToolCall(item["name"], arguments, item["id"] if isinstance(item.get("id"), str) else new_call_id(parser))


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class _Parser:
    name = "none"
    markers: tuple[str, ...] = ()  # what opens the calls
    special_markers: tuple[str, ...] = ()  # markers that are special tokens (kept when decoding)

    def call_start(self, text: str, final: bool) -> int:
        """Where a call (possibly) starts in `text`: the first marker, or, while text streams in,
        the start of a suffix that may be a marker's beginning; len(text) when none."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        if found:
            return min(found)
        if not final:
            for k in range(min(len(text), max((len(m) for m in self.markers), default=0)), 0, -1):
                if any(m.startswith(text[-k:]) for m in self.markers):
                    return len(text) - k
        return len(text)

    def parse(self, text: str, names: set[str] | None) -> list[ToolCall] | None:
        return None


class HermesParser(_Parser):
    name, markers = "hermes", ("<tool_call>",)

    def parse(self, text, names):
        blocks = list(HERMES_BLOCK.finditer(text))
        if not blocks or HERMES_BLOCK.sub("", text).strip():
            return None
        calls = [_call(_json(b.group(1).strip()), self.name, None) for b in blocks]
        return calls if all(calls) else None


class MistralParser(_Parser):
    name, markers, special_markers = "mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")

    def parse(self, text, names):
        body = text.strip()
        if not body.startswith("[TOOL_CALLS]"):
            return None
        body = body[len("[TOOL_CALLS]"):].strip()
        value = _json(body)
        if value is not None:
            items = value if isinstance(value, list) else [value]
            calls = [_call(item, self.name, None) for item in items]
            return calls if calls and all(calls) else None
        calls = []  # the newer form: name[ARGS]{json}, several after [TOOL_CALLS] each
        for piece in filter(None, (p.strip() for p in body.split("[TOOL_CALLS]"))):
            name, found, arguments = piece.partition("[ARGS]")
            call = _call({"name": name.strip(), "arguments": arguments.strip()}, self.name, None) if found else None
            if call is None:
                return None
            calls.append(call)
        return calls or None


class Llama3Parser(_Parser):
    name, markers, special_markers = "llama3", ("<|python_tag|>", "{"), ("<|python_tag|>",)

    def call_start(self, text, final):
        start = len(text) - len(text.lstrip())
        rest = text[start:]
        if rest.startswith(("<|python_tag|>", "{")) or (not final and "<|python_tag|>".startswith(rest)):
            return start  # a JSON call is the whole reply
        return len(text)

    def parse(self, text, names):
        body = text.strip().removeprefix("<|python_tag|>").strip()
        items = [_json(part) for part in body.split(";")] if ";" in body and _json(body) is None else [_json(body)]
        calls = [_call(item, self.name, names) for item in items]  # names: JSON that is not a call stays content
        return calls if calls and all(calls) else None


PARSER_CLASSES = {"hermes": HermesParser, "mistral": MistralParser, "llama3": Llama3Parser, "none": _Parser}


def parser_for(name: str) -> _Parser:
    return PARSER_CLASSES[name]()


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict:
        """The OpenAI chat message (arguments as JSON strings)."""
        out: dict = {"role": "assistant", "content": self.content or (None if self.tool_calls else ""), "refusal": None}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [c.openai_dict() for c in self.tool_calls]
        return out


class ReplyStream:
    """Text deltas in, (kind, delta) out, kind "reasoning" or "content"; `finish` adds the calls.

    `prefix` is text written into the prompt after the generation prompt (a forced call's
    opening, for tool_choice), which the reply continues."""

    def __init__(self, parser: _Parser, names: set[str] | None = None, reasoning: bool = True, prefix: str = "",
                 parallel: bool = True):
        self.parser, self.names, self.reasoning, self.parallel = parser, names, reasoning, parallel
        self.text = prefix
        self.sent = {"reasoning": 0, "content": 0}

    def _parts(self, final: bool) -> tuple[str, str, str]:
        """(reasoning, content, held) of the text so far, each only growing while text streams in."""
        text = self.text
        stripped = text.lstrip()
        reasoning, rest = "", text
        if self.reasoning and stripped and (stripped.startswith(THINK_OPEN) or (not final and THINK_OPEN.startswith(stripped))):
            if not stripped.startswith(THINK_OPEN):
                return "", "", text  # may be the opening tag: wait
            inner = stripped[len(THINK_OPEN):]
            close = inner.find(THINK_CLOSE)
            if close < 0:
                hold = next((k for k in range(min(len(inner), len(THINK_CLOSE) - 1), 0, -1)
                             if THINK_CLOSE.startswith(inner[-k:])), 0)
                body = inner[: len(inner) - hold].lstrip("\n")
                return (body if final else body.rstrip("\n")), "", ""
            reasoning, rest = inner[:close].strip("\n"), inner[close + len(THINK_CLOSE):].lstrip("\n")
        start = self.parser.call_start(rest, final)
        return reasoning, rest[:start], rest[start:]

    def push(self, delta: str) -> list[tuple[str, str]]:
        self.text += delta
        reasoning, content, _ = self._parts(final=False)
        return self._emit(reasoning, content.rstrip())  # trailing space waits: it may end before a call

    def _emit(self, reasoning: str, content: str) -> list[tuple[str, str]]:
        out = []
        for kind, text in (("reasoning", reasoning), ("content", content)):
            if len(text) > self.sent[kind]:
                out.append((kind, text[self.sent[kind]:]))
                self.sent[kind] = len(text)
        return out

    def finish(self) -> tuple[list[tuple[str, str]], Reply]:
        reasoning, content, held = self._parts(final=True)
        calls = self.parser.parse(held, self.names) if held.strip() else None
        if calls is None:
            content, calls = content + held, []  # not a call after all: plain content
        if not self.parallel:
            calls = calls[:1]
        if calls:
            content = content.rstrip()  # the space before the calls is the template's, not the content's
        events = self._emit(reasoning, content)
        has_reasoning = self.reasoning and self.text.lstrip().startswith(THINK_OPEN)
        return events, Reply(content, reasoning if has_reasoning else None, calls)


def parse_reply(text: str, parser: _Parser, names: set[str] | None = None, reasoning: bool = True,
                prefix: str = "", parallel: bool = True) -> Reply:
    """A whole generated reply parsed (what ReplyStream gives at its end)."""
    stream = ReplyStream(parser, names, reasoning, prefix, parallel)
    stream.text += text
    return stream.finish()[1]


def forced_prefix(parser: str, tool_choice) -> str:
    """What tool_choice `required` or a named function writes into the prompt after the generation
    prompt, where the call form allows it ("" where it does not)."""
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if parser == "hermes":
        return "<tool_call>\n" + ('{"name": ' + json.dumps(named) + ', "arguments": ' if named else "")
    if parser == "mistral":
        return "[TOOL_CALLS]" + ('[{"name": ' + json.dumps(named) + ', "arguments": ' if named else "")
    if parser == "llama3" and named:
        return '{"name": ' + json.dumps(named) + ', "parameters": '
    return ""
