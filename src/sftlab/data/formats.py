"""Raw rows -> the one internal shape: a Conversation of Messages (role, content, trained or not).

    | format            | fields (defaults; remap with `fields:`)       | becomes                                   |
    |-------------------|-----------------------------------------------|-------------------------------------------|
    | alpaca            | instruction, input?, output                   | user, input?, assistant                   |
    | dolly             | instruction, context?, response, category?    | user, input?, assistant (+ category)      |
    | openorca          | id?, system_prompt?, question, response       | system?, user, assistant                  |
    | sharegpt          | conversations: [{from, value}], system?       | system?, user/assistant turns             |
    | openai            | messages: [{role, content}]                   | the messages                              |
    | prompt_completion | prompt, completion                            | user, assistant                           |
    | text              | text                                          | text (every token trained)                |

Roles are system, user, input (context for the user turn, Alpaca's `input`), assistant, and
text. Assistant messages are marked trained; the template's `train_on` decides which count.
Malformed rows raise DataError with a short `reason` that the data report counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sftlab.data.readers import DataError, RawRow


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "input" | "assistant" | "text"
    content: str
    trained: bool = False


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""  # provenance, e.g. "data.jsonl:17"
    metadata: dict = field(default_factory=dict, compare=False)

    def prompt_messages(self) -> tuple[Message, ...]:
        """What the model is given at inference: everything before a final assistant turn, or the
        whole conversation when it ends with the user (a chat waiting for its next reply)."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages


@dataclass(frozen=True)
class FormatOptions:
    fields: dict = field(default_factory=dict)  # canonical field name -> the file's column name
    drop_leading_assistant: bool = False
    merge_consecutive_roles: bool = False
    drop_trailing_user: bool = False


# Role names seen in the wild (ShareGPT dumps, OpenAI exports, Bard/Bing scrapes).
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}


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


def _turns(row: RawRow, options: FormatOptions, list_field: str, role_key: str, content_key: str) -> list[Message]:
    column = options.fields.get(list_field, list_field)
    turns = row.data.get(column)
    if turns is None:
        raise DataError(f"{row.source}: missing field '{column}'", f"missing_{list_field}")
    if not isinstance(turns, list):
        raise DataError(f"{row.source}: field '{column}' must be a list of turns, found {type(turns).__name__}", "malformed_turns")
    if not turns:
        raise DataError(f"{row.source}: field '{column}' is an empty conversation", "empty_conversation")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{row.source}: {column}[{i}]"
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
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise DataError(f"{where}: only text content parts are supported", "non_text_content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise DataError(f"{where}: '{content_key}' must be a string, found {type(content).__name__}", "non_string_content")
        messages.append(Message(role, content, trained=role == "assistant"))
    return messages


def _validate_turns(row: RawRow, options: FormatOptions, messages: list[Message]) -> Conversation:
    """Check the order of turns; apply the opt-in repairs; raise with a reason otherwise."""
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
            if merged and merged[-1].role == m.role:
                merged[-1] = Message(m.role, merged[-1].content + "\n\n" + m.content, m.trained)
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
    for i in range(1, len(turns)):
        if turns[i].role == turns[i - 1].role:
            raise DataError(
                f"{row.source}: turns {i - 1} and {i} are both '{turns[i].role}' "
                "(set `merge_consecutive_roles: true` to join them)", "consecutive_roles",
            )
    if turns[-1].role != "assistant":
        raise DataError(
            f"{row.source}: the conversation ends without an assistant response "
            "(set `drop_trailing_user: true` to drop the unanswered turn)", "ends_without_response",
        )
    for i, m in enumerate(turns):
        if not m.content.strip():
            raise DataError(
                f"{row.source}: turn {i} ({m.role}) is empty",
                "empty_response" if m.role == "assistant" else "empty_prompt",
            )
    return Conversation(tuple(system + turns), row.source)


def from_sharegpt(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    messages = _turns(row, options, "conversations", "from", "value")
    system = _get(row, options, "system", False)
    if system.strip():
        messages.insert(0, Message("system", system))
    return _validate_turns(row, options, messages)


def from_openai(row: RawRow, options: FormatOptions) -> Conversation:
    _require_object(row)
    return _validate_turns(row, options, _turns(row, options, "messages", "role", "content"))


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
