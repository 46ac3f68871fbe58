"""Raw rows -> the one internal shape: a Conversation of Messages (role, content, trained or not).

    | format            | fields (defaults; remap with `fields:`)             | becomes                               |
    |-------------------|-----------------------------------------------------|---------------------------------------|
    | alpaca            | instruction, input?, output                         | user, input?, assistant               |
    | dolly             | instruction, context?, response, category?          | user, input?, assistant (+ category)  |
    | openorca          | id?, system_prompt?, question, response             | system?, user, assistant              |
    | sharegpt          | conversations: [{from, value}], system?, tools?     | system?, user/assistant/tool turns    |
    | openai            | messages: [{role, content, ...}], tools?/functions? | the messages (+ tools)                |
    | prompt_completion | prompt, completion                                  | user, assistant                       |
    | text              | text                                                | text (every token trained)            |

Roles are system, user, input (context for the user turn, Alpaca's `input`), assistant, tool
(a tool's result) and text. Assistant messages are marked trained unless the row says
`weight: 0`; the template's `train_on` decides which count.

Agent and reasoning data (the `openai` and `sharegpt` shapes) keep everything they carry:

    | in the row                                              | in the Message                        |
    |---------------------------------------------------------|---------------------------------------|
    | assistant `tool_calls` [{id, type, function: {name,     | tool_calls (arguments parsed: a JSON  |
    |   arguments}}], legacy `function_call`                  |   string becomes its object)          |
    | `tool` / legacy `function` messages (`tool_call_id`,    | role "tool", tool_call_id, name       |
    |   `name`); ShareGPT `observation` / `tool` turns        |                                       |
    | ShareGPT `function_call` turns (JSON {name, arguments}) | an assistant turn with tool_calls     |
    | `reasoning_content` (aliases `reasoning`, `thinking`);  | reasoning                             |
    |   `<think>...</think>` opening the content              |                                       |
    | Hermes `<tool_call>{json}</tool_call>` blocks in content| tool_calls                            |
    | `weight` 0/1 on an assistant message (OpenAI)           | trained                               |
    | top-level `tools` (or legacy `functions`), a list or a  | Conversation.tools                    |
    |   JSON string                                           |                                       |

Malformed rows raise DataError with a short `reason` that the data report counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sftlab.data.readers import DataError, RawRow


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes; `arguments` is the parsed JSON object."""

    name: str
    arguments: Any
    id: str = ""

    def template_dict(self) -> dict:
        """The Hugging Face chat-template shape (arguments as an object, never a string)."""
        call = {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"id": self.id, **call} if self.id else call

    def openai_dict(self) -> dict:
        """The OpenAI API shape (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "input" | "assistant" | "tool" | "text"
    content: str
    trained: bool = False
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None  # the turn's reasoning trace; None when it has none
    name: str = ""  # a tool result's function name (or a participant's name)
    tool_call_id: str = ""  # a tool result: the id of the call it answers

    def to_tuple(self) -> tuple:
        """Plain data (JSON-able, quick to pickle); Message.from_tuple reverses it."""
        if not (self.tool_calls or self.reasoning is not None or self.name or self.tool_call_id):
            return (self.role, self.content, self.trained)
        return (self.role, self.content, self.trained, [[c.name, c.arguments, c.id] for c in self.tool_calls],
                self.reasoning, self.name, self.tool_call_id)

    @classmethod
    def from_tuple(cls, item) -> Message:
        if len(item) == 3:
            return cls(item[0], item[1], bool(item[2]))
        role, content, trained, calls, reasoning, name, call_id = item
        return cls(role, content, bool(trained), tuple(ToolCall(*c) for c in calls), reasoning, name, call_id)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""  # provenance, e.g. "data.jsonl:17"
    metadata: dict = field(default_factory=dict, compare=False)
    tools: tuple = ()  # the functions offered, as JSON schemas {"type": "function", "function": {...}}

    def prompt_messages(self) -> tuple[Message, ...]:
        """What the model is given at inference: everything before a final assistant turn, or the
        whole conversation when it ends with the user (a chat waiting for its next reply)."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages

    def to_json(self) -> list:
        return [self.source, [m.to_tuple() for m in self.messages], list(self.tools)]

    @classmethod
    def from_json(cls, item) -> Conversation:
        source, messages, *rest = item
        return cls(tuple(Message.from_tuple(m) for m in messages), source, tools=tuple(rest[0]) if rest else ())


@dataclass(frozen=True)
class FormatOptions:
    fields: dict = field(default_factory=dict)  # canonical field name -> the file's column name
    drop_leading_assistant: bool = False
    merge_consecutive_roles: bool = False
    drop_trailing_user: bool = False


# Role names seen in the wild (ShareGPT dumps, OpenAI exports, Bard/Bing scrapes, function-calling sets).
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system", "developer": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
    "function_call": "assistant",  # ShareGPT function-calling sets: the turn's value is the call
}
# What a message may carry besides its role and content (a key with a null value counts as absent).
MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id", "function_call", "weight", "reasoning_content", "reasoning",
                "thinking", "refusal")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_KNOWN_KEYS = frozenset(MESSAGE_KEYS)


def _get(row: RawRow, options: FormatOptions, name: str, required: bool, allow_empty: bool = True) -> str:
    column = options.fields.get(name, name)
    value = row.data.get(column)
    if value is None:
        if required:
            present = ", ".join(sorted(map(str, row.data))) or "none"
            raise DataError(f"{row.source}: missing field '{column}' (fields present: {present})", f"missing_{name}")
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{row.source}: field '{column}' must be a string, found {type(value).__name__} {value!r:.60}",
            f"non_string_{name}",
        )
    if required and not allow_empty and not value.strip():
        reason = "empty_response" if name in ("output", "response", "completion") else f"empty_{name}"
        raise DataError(f"{row.source}: field '{column}' is empty", reason)
    return value


def _require_object(row: RawRow) -> None:
    if not isinstance(row.data, dict):
        raise DataError(f"{row.source}: expected a JSON object, found {type(row.data).__name__}", "not_an_object")


def _single_turn(row, options, system, instruction, context, response, metadata=None) -> Conversation:
    messages = [Message("system", system)] if system.strip() else []
    messages.append(Message("user", instruction))
    if context.strip():
        messages.append(Message("input", context))
    messages.append(Message("assistant", response, trained=True))
    return Conversation(tuple(messages), row.source, metadata or {})


def from_alpaca(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    instruction = _get(row, options, "instruction", True, allow_empty=False)
    context = _get(row, options, "input", False)
    output = _get(row, options, "output", True, allow_empty=False)
    system = _get(row, options, "system", False)
    return _single_turn(row, options, system, instruction, context, output)


def from_dolly(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    instruction = _get(row, options, "instruction", True, allow_empty=False)
    context = _get(row, options, "context", False)
    response = _get(row, options, "response", True, allow_empty=False)
    category = _get(row, options, "category", False)
    return _single_turn(row, options, "", instruction, context, response, {"category": category} if category else {})


def from_openorca(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    system = _get(row, options, "system_prompt", False)
    question = _get(row, options, "question", True, allow_empty=False)
    response = _get(row, options, "response", True, allow_empty=False)
    row_id = row.data.get(options.fields.get("id", "id"))
    return _single_turn(row, options, system, question, "", response, {"id": row_id} if row_id is not None else {})


def from_prompt_completion(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    prompt = _get(row, options, "prompt", True, allow_empty=False)
    completion = _get(row, options, "completion", True, allow_empty=False)
    return _single_turn(row, options, "", prompt, "", completion)


def from_text(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    text = _get(row, options, "text", True, allow_empty=False)
    return Conversation((Message("text", text, trained=True),), row.source)


# -- agent and reasoning data ------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
INLINE_MARKERS = re.compile(r"\s*<think>|</think>|tool_call>")  # content that may hold inline reasoning or calls
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)


def _json_value(value: Any, where: str, reason: str, what: str) -> Any:
    """A JSON string parsed (anything else as it is); DataError naming `where` when it is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise DataError(f"{where}: {what} is not valid JSON ({exc}): {value!r:.80}", reason) from None


def _tool_call(item: Any, where: str) -> ToolCall:
    """{id?, type: function, function: {name, arguments}} (OpenAI) or {name, arguments} (the legacy
    function_call, ShareGPT function-calling sets, Hermes blocks) -> ToolCall."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: a tool call must be an object, found {type(item).__name__}", "malformed_tool_call")
    call_id = item.get("id")
    if item.get("type") not in (None, "function"):
        raise DataError(f"{where}: tool call type {item.get('type')!r} is not supported (only 'function')",
                        "malformed_tool_call")
    function = item.get("function", item)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
        raise DataError(f"{where}: a tool call needs a function name ({{'function': {{'name': ..., 'arguments': ...}}}})",
                        "malformed_tool_call")
    arguments = function.get("arguments", function.get("parameters"))
    arguments = {} if arguments is None else _json_value(arguments, f"{where}.function.arguments",
                                                         "invalid_tool_arguments", "the arguments")
    if not isinstance(arguments, dict):
        raise DataError(f"{where}.function.arguments: must be a JSON object, found {type(arguments).__name__} "
                        f"{arguments!r:.60}", "invalid_tool_arguments")
    if call_id is not None and not isinstance(call_id, str):
        raise DataError(f"{where}.id: must be a string, found {type(call_id).__name__}", "malformed_tool_call")
    return ToolCall(function["name"], arguments, call_id or "")


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    value = _json_value(value, where, "malformed_tool_call", "the tool calls")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: tool calls must be a list, found {type(value).__name__}", "malformed_tool_call")
    return tuple(_tool_call(item, f"{where}[{k}]") for k, item in enumerate(value))


def _split_inline(content: str, where: str) -> tuple[str, str | None, tuple[ToolCall, ...]]:
    """R1-style `<think>...</think>` opening an assistant's content and Hermes-style
    `<tool_call>{json}</tool_call>` blocks after its text -> (content, reasoning, calls)."""
    reasoning = None
    if not INLINE_MARKERS.search(content):  # the common case
        return content, None, ()
    stripped = content.lstrip()
    if THINK_CLOSE in stripped and not stripped.startswith(THINK_OPEN) and THINK_OPEN not in stripped:
        stripped = THINK_OPEN + stripped  # R1 outputs often lack the opening tag (the prompt wrote it)
    if stripped.startswith(THINK_OPEN):
        close = stripped.find(THINK_CLOSE)
        if close < 0:
            raise DataError(f"{where}: the content opens {THINK_OPEN} but never closes it with {THINK_CLOSE}",
                            "malformed_think")
        reasoning = stripped[len(THINK_OPEN):close].strip("\n")
        content = stripped[close + len(THINK_CLOSE):].lstrip("\n")
        if THINK_OPEN in content or THINK_CLOSE in content:
            raise DataError(f"{where}: the content holds a second think block", "malformed_think")
    calls = ()
    blocks = list(TOOL_CALL_BLOCK.finditer(content))
    if blocks:
        calls = tuple(_tool_call(_json_value(b.group(1).strip(), f"{where}: <tool_call> block {k}", "malformed_tool_call",
                                             "the block"), f"{where}: <tool_call> block {k}")
                      for k, b in enumerate(blocks))
        between = [content[blocks[k].end(): blocks[k + 1].start()] for k in range(len(blocks) - 1)]
        if content[blocks[-1].end():].strip() or any(text.strip() for text in between):
            raise DataError(f"{where}: text after a <tool_call> block (a turn is its text, then its calls)",
                            "malformed_tool_call")
        content = content[: blocks[0].start()].rstrip("\n")
    if "<tool_call>" in content or "</tool_call>" in content:
        raise DataError(f"{where}: a <tool_call> block that does not close", "malformed_tool_call")
    return content, (reasoning or None), calls


def _content_text(content: Any, where: str, key: str, role: str) -> str | None:
    text_parts = isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)
    if isinstance(content, (dict, list)) and role == "tool" and not text_parts:  # a structured result: its JSON
        return json.dumps(content, ensure_ascii=False)
    if isinstance(content, list):  # OpenAI content parts: the text parts, joined
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise DataError(f"{where}: only text content parts are supported", "non_text_content")
        return "".join(p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        raise DataError(f"{where}: '{key}' must be a string, found {type(content).__name__}", "non_string_content")
    return content


def _message(turn: Any, where: str, role_key: str, content_key: str) -> list[Message]:
    """One message of a conversation (a tool turn holding several <tool_response> blocks gives one
    message a block)."""
    if not isinstance(turn, dict):
        raise DataError(f"{where} must be an object, found {type(turn).__name__}", "malformed_turns")
    role_name = turn.get(role_key)
    if not isinstance(role_name, str):
        raise DataError(f"{where}: missing or non-string '{role_key}'", "malformed_turns")
    role = ROLE_ALIASES.get(role_name.strip().lower())
    if role is None:
        known = ", ".join(sorted(ROLE_ALIASES))
        raise DataError(f"{where}: unknown role '{role_name}' (known: {known})", "unknown_role")
    content = turn.get(content_key)
    if len(turn) == 2 and isinstance(content, str):  # a plain chat turn (the common case)
        if role in ("user", "system"):
            return [Message(role, content)]
        if (role == "assistant" and not INLINE_MARKERS.search(content)
                and role_name.strip().lower() != "function_call"):
            return [Message(role, content, True)]
    # a key with an empty value counts as absent (unified-schema exports write every key on every message)
    turn = {k: v for k, v in turn.items() if k in (role_key, content_key) or not _empty(v)}
    unknown = [k for k in turn if k not in _KNOWN_KEYS and k != role_key and k != content_key]
    if unknown:
        raise DataError(f"{where}: field '{unknown[0]}' is not one sftlab reads; a message has '{role_key}', "
                        f"'{content_key}' and optionally {', '.join(MESSAGE_KEYS)}", "unknown_message_field")
    if turn.get("refusal") is not None:
        raise DataError(f"{where}: a refusal message (no template renders 'refusal'; write it as the content)",
                        "refusal_message")
    content = _content_text(turn.get(content_key), where, content_key, role)
    calls: tuple[ToolCall, ...] = ()
    if role_name.strip().lower() == "function_call":  # ShareGPT: {"from": "function_call", "value": "{name, arguments}"}
        calls, content = _tool_calls(content if content is not None else "", f"{where}.{content_key}"), ""
    for key in ("tool_calls", "function_call"):
        if turn.get(key) is not None:
            if role != "assistant":
                raise DataError(f"{where}: '{key}' on a {role} message (only assistant turns call tools)", "malformed_tool_call")
            if calls:
                raise DataError(f"{where}: the tool calls are given twice ('tool_calls' and 'function_call')",
                                "malformed_tool_call")
            calls = _tool_calls(turn[key], f"{where}.{key}")
    given = {k: turn[k] for k in REASONING_KEYS if turn.get(k) is not None}
    if len(set(map(str, given.values()))) > 1:
        raise DataError(f"{where}: different reasoning under {', '.join(given)}; give one", "malformed_reasoning")
    reasoning = next(iter(given.values()), None)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise DataError(f"{where}: '{next(iter(given))}' must be a string, found {type(reasoning).__name__}",
                            "malformed_reasoning")
        if role != "assistant":
            raise DataError(f"{where}: reasoning on a {role} message (only assistant turns reason)", "malformed_reasoning")
        reasoning = reasoning.strip("\n") or None
    trained = role == "assistant"
    weight = turn.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
            raise DataError(f"{where}: 'weight' must be 0 (not trained) or 1 (trained), found {weight!r} — it is "
                            "OpenAI's per-message flag; a source's sampling weight is `data[].weight`", "invalid_weight")
        if role != "assistant" and weight == 1:  # weight 0 on a prompt turn (SlimOrca writes it) is what it is anyway
            raise DataError(f"{where}: 'weight: 1' on a {role} message: only assistant turns are trained",
                            "invalid_weight")
        trained = role == "assistant" and weight == 1
    if content is None:
        if not calls:
            raise DataError(f"{where}: '{content_key}' is null and the message makes no tool call", "non_string_content")
        content = ""
    name, call_id = turn.get("name"), turn.get("tool_call_id")
    for key, value in (("name", name), ("tool_call_id", call_id)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, found {type(value).__name__}", "malformed_turns")
    if role == "assistant":
        text, inline_reasoning, inline_calls = _split_inline(content, where)
        if inline_reasoning is not None and reasoning is not None:
            raise DataError(f"{where}: reasoning given twice (a think block in the content and a reasoning field)",
                            "malformed_reasoning")
        if inline_calls and calls:
            raise DataError(f"{where}: tool calls given twice (<tool_call> blocks and a tool_calls field)",
                            "malformed_tool_call")
        return [Message(role, text, trained, calls or inline_calls, reasoning or inline_reasoning, name or "")]
    if role == "tool":
        blocks = TOOL_RESPONSE_BLOCK.findall(content) if "<tool_response>" in content else []
        if blocks and not TOOL_RESPONSE_BLOCK.sub("", content).strip():  # Hermes: results wrapped in the row's text
            return [Message("tool", b.strip("\n"), False, name=name or "", tool_call_id=call_id or "") for b in blocks]
        return [Message("tool", content, False, name=name or "", tool_call_id=call_id or "")]
    return [Message(role, content, False, name=name or "")]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _turns(row: RawRow, options: FormatOptions, list_field: str, role_key: str, content_key: str) -> list[Message]:
    column = options.fields.get(list_field, list_field)
    turns = row.data.get(column)
    if turns is None:
        raise DataError(f"{row.source}: missing field '{column}'", f"missing_{list_field}")
    if not isinstance(turns, list):
        raise DataError(f"{row.source}: field '{column}' must be a list of turns, found {type(turns).__name__}", "malformed_turns")
    if not turns:
        raise DataError(f"{row.source}: field '{column}' is an empty conversation", "empty_conversation")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        for message in _message(turn, f"{row.source}: {column}[{i}]", role_key, content_key):
            previous = messages[-1] if messages else None
            if (previous is not None and previous.role == "assistant" and message.role == "assistant"
                    and not previous.tool_calls and message.tool_calls and not message.content
                    and message.reasoning is None and previous.trained == message.trained):
                # ShareGPT function-calling sets write the text and the call as two turns: one turn
                messages[-1] = Message("assistant", previous.content, previous.trained, message.tool_calls,
                                       previous.reasoning, previous.name)
            else:
                messages.append(message)
    return messages


def _tools(row: RawRow, options: FormatOptions) -> tuple:
    """The row's `tools` (or legacy `functions`), a list or a JSON string, as typed function schemas."""
    found = {}
    for name in ("tools", "functions"):
        column = options.fields.get(name, name)
        if row.data.get(column) not in (None, "", []):
            found[column] = row.data[column]
    if len(found) > 1:
        raise DataError(f"{row.source}: both {' and '.join(found)} are given; give the tools once", "malformed_tools")
    if not found:
        return ()
    column, value = next(iter(found.items()))
    value = _json_value(value, f"{row.source}: field '{column}'", "malformed_tools", "the tool list")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{row.source}: field '{column}' must be a list of tools, found {type(value).__name__}",
                        "malformed_tools")
    tools = []
    for k, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or (isinstance(tool, dict) and tool.get("type") not in (None, "function"))):
            raise DataError(f"{row.source}: {column}[{k}] is not a function schema ({{'type': 'function', "
                            "'function': {'name': ..., 'description': ..., 'parameters': {...}}})", "malformed_tools")
        tools.append({"type": "function", "function": function})
    return tuple(tools)


def _validate_turns(row: RawRow, options: FormatOptions, messages: list[Message], tools: tuple = ()) -> Conversation:
    """Check the order of turns; apply the opt-in repairs; raise with a reason otherwise.

    The order: system messages first; then user and assistant turns alternating, where an
    assistant turn that calls tools is followed by their results (tool messages, at most one a
    call) before the next assistant or user turn; the conversation ends with an assistant turn."""
    system = [m for m in messages if m.role == "system"]
    if any(m.role == "system" for m in messages[len(system):]) or any(m.role != "system" for m in messages[: len(system)]):
        raise DataError(f"{row.source}: a system message may only come first", "misplaced_system")
    turns = messages[len(system):]
    if options.drop_leading_assistant:
        while turns and turns[0].role == "assistant":
            turns = turns[1:]
    if options.merge_consecutive_roles:
        merged: list[Message] = []
        for m in turns:
            last = merged[-1] if merged else None
            if (last is not None and last.role == m.role and m.role in ("user", "assistant")
                    and not last.tool_calls and last.reasoning is None and m.reasoning is None
                    and last.trained == m.trained):  # turns of different weights stay apart (and are refused)
                merged[-1] = Message(m.role, last.content + "\n\n" + m.content, m.trained, m.tool_calls, None,
                                     last.name or m.name)
            else:
                merged.append(m)
        turns = merged
    if options.drop_trailing_user:
        while turns and turns[-1].role == "user":
            turns = turns[:-1]
    if not turns:
        raise DataError(f"{row.source}: the conversation has no user/assistant turns", "empty_conversation")
    if turns[0].role == "assistant":
        raise DataError(
            f"{row.source}: the conversation starts with the assistant (set `drop_leading_assistant: true` to drop such turns)",
            "leading_assistant",
        )
    calls: list[ToolCall] = []  # the calls of the assistant turn whose results come now
    results, answered = 0, set()
    for i, m in enumerate(turns):
        previous = turns[i - 1] if i else None
        if m.role == "tool":
            if previous is None or not (previous.role == "tool" or previous.tool_calls):
                raise DataError(f"{row.source}: turn {i} is a tool result, but the turn before it calls no tool",
                                "orphan_tool_result")
            results += 1
            if results > len(calls):
                raise DataError(f"{row.source}: turn {i}: more tool results ({results}) than calls ({len(calls)})",
                                "unmatched_tool_result")
            ids = [c.id for c in calls if c.id]
            if m.tool_call_id and ids and m.tool_call_id not in ids:
                raise DataError(f"{row.source}: turn {i}: tool_call_id {m.tool_call_id!r} answers none of the calls "
                                f"before it ({', '.join(ids)})", "unmatched_tool_result")
            if m.tool_call_id and m.tool_call_id in answered:
                raise DataError(f"{row.source}: turn {i}: a second result for tool_call_id {m.tool_call_id!r}",
                                "unmatched_tool_result")
            answered.add(m.tool_call_id)
            continue
        if calls and results < len(calls):
            raise DataError(f"{row.source}: turn {i - 1 - results} calls {len(calls)} tool(s) but {results} result(s) "
                            "follow it: every call needs its result", "missing_tool_result")
        if previous is not None and previous.role == m.role:
            raise DataError(
                f"{row.source}: turns {i - 1} and {i} are both '{m.role}' "
                "(set `merge_consecutive_roles: true` to join them)", "consecutive_roles",
            )
        if previous is not None and previous.role == "tool" and m.role not in ("assistant", "user"):
            raise DataError(f"{row.source}: turn {i} ({m.role}) follows a tool result", "malformed_turns")
        calls, results, answered = list(m.tool_calls), 0, set()
    if calls and turns[-1].role == "tool" and results < len(calls):
        raise DataError(f"{row.source}: the last calls get {results} of {len(calls)} results", "missing_tool_result")
    if turns[-1].role != "assistant":
        raise DataError(
            f"{row.source}: the conversation ends without an assistant response "
            "(set `drop_trailing_user: true` to drop the unanswered turn)", "ends_without_response",
        )
    for i, m in enumerate(turns):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise DataError(f"{row.source}: turn {i} (assistant) is empty", "empty_response")
        if m.role in ("user", "input") and not m.content.strip():
            raise DataError(f"{row.source}: turn {i} ({m.role}) is empty", "empty_prompt")
    if any(m.role == "tool" for m in turns) and not any(m.tool_calls for m in turns):
        raise DataError(f"{row.source}: tool results without any tool call", "orphan_tool_result")
    return Conversation(tuple(system + turns), row.source, tools=tools)


def from_sharegpt(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    messages = _turns(row, options, "conversations", "from", "value")
    system = _get(row, options, "system", False)
    if system.strip():
        messages.insert(0, Message("system", system))
    return _validate_turns(row, options, messages, _tools(row, options))


def from_openai(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    return _validate_turns(row, options, _turns(row, options, "messages", "role", "content"), _tools(row, options))


FORMATS: dict[str, Callable[[RawRow, FormatOptions], Conversation]] = {
    "alpaca": from_alpaca,
    "dolly": from_dolly,
    "openorca": from_openorca,
    "sharegpt": from_sharegpt,
    "openai": from_openai,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}

# Detection: the first rule whose fields are all present wins (after the user's field map).
_SIGNATURES = [
    ("sharegpt", {"conversations"}),
    ("openai", {"messages"}),
    ("openorca", {"question", "response"}),
    ("dolly", {"instruction", "response"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("text", {"text"}),
]


def detect_format(row: RawRow, options: FormatOptions = FormatOptions()) -> str:
    if not isinstance(row.data, dict):
        raise DataError(f"{row.source}: expected a JSON object to detect the format from", "not_an_object")
    keys = set(row.data)
    for name, needed in _SIGNATURES:
        if all(options.fields.get(f, f) in keys for f in needed):
            return name
    raise DataError(
        f"{row.source}: cannot tell the data format from the fields {sorted(keys)}; set `format:` "
        f"({', '.join(FORMATS)}) and, if the columns are named differently, `fields:`", "unknown_format",
    )


def alpaca_to_conversation(row: RawRow) -> Conversation:
    """An Alpaca row ({instruction, input?, output}) -> Conversation; DataError when malformed."""
    return from_alpaca(row, FormatOptions())


def conversation_kinds(conversation: Conversation) -> set[str]:
    """Which agent/reasoning features a conversation has (the data report counts rows of each)."""
    kinds = set()
    if conversation.tools:
        kinds.add("tools")
    for m in conversation.messages:
        if m.tool_calls:
            kinds.add("tool_calls")
            if len(m.tool_calls) > 1:
                kinds.add("parallel_tool_calls")
        if m.role == "tool":
            kinds.add("tool_results")
        if m.reasoning is not None:
            kinds.add("reasoning")
        if m.role == "assistant" and not m.trained:
            kinds.add("untrained_turns")
    return kinds


def parse_message(turn: Any, where: str) -> list[Message]:
    """One OpenAI chat message (a request's, or a data row's) -> Messages; DataError when malformed."""
    return _message(turn, where, "role", "content")


def parse_tools(value: Any, where: str = "request") -> tuple:
    """An OpenAI `tools` list (or legacy `functions`) -> typed function schemas; DataError when malformed."""
    return _tools(RawRow({"tools": value}, where), FormatOptions())
