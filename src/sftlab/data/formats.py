"""Raw rows -> the one internal shape: a Conversation of Messages (role, content, trained or not).

    | format | fields                          | becomes                                        |
    |--------|---------------------------------|------------------------------------------------|
    | alpaca | instruction, input?, output     | user(instruction), input(input)?, assistant(output, trained) |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sftlab.data.readers import DataError, RawRow


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "input" (context for the user turn) | "assistant"
    content: str
    trained: bool = False


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""  # provenance, e.g. "data.jsonl:17"
    metadata: dict = field(default_factory=dict, compare=False)

    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the final assistant turn: what the model is given at inference."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return self.messages[:last]


def _field(row: RawRow, name: str, required: bool) -> str:
    value = row.data.get(name)
    if value is None:
        if required:
            present = ", ".join(sorted(map(str, row.data))) or "none"
            raise DataError(f"{row.source}: missing field '{name}' (fields present: {present})", f"missing_{name}")
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{row.source}: field '{name}' must be a string, found {type(value).__name__} {value!r:.60}",
            f"non_string_{name}",
        )
    return value


def alpaca_to_conversation(row: RawRow) -> Conversation:
    """An Alpaca row ({instruction, input?, output}) -> Conversation; DataError when malformed."""
    if not isinstance(row.data, dict):
        raise DataError(
            f"{row.source}: expected a JSON object with instruction/input/output, found {type(row.data).__name__}",
            "not_an_object",
        )
    instruction = _field(row, "instruction", required=True)
    context = _field(row, "input", required=False)
    output = _field(row, "output", required=True)
    if not instruction.strip():
        raise DataError(f"{row.source}: field 'instruction' is empty", "empty_instruction")
    if not output.strip():
        raise DataError(f"{row.source}: field 'output' is empty; a row needs a response to train on", "empty_output")
    messages = [Message("user", instruction)]
    if context.strip():
        messages.append(Message("input", context))
    messages.append(Message("assistant", output, trained=True))
    return Conversation(tuple(messages), source=row.source)


FORMATS = {"alpaca": alpaca_to_conversation}
