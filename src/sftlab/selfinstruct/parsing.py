"""Turn model responses into candidates: numbered instruction lists, Alpaca task sets, instances.

A response stopped by the length limit (finish_reason "length") may end in the middle of an
item, so its last item is marked `cut_off` (and later dropped under that reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sftlab.selfinstruct.prompts import NO_INPUT


@dataclass
class Item:
    """One candidate from a response: an instruction (with input/output in alpaca mode) or an instance."""

    instruction: str = ""
    input: str = ""
    output: str = ""
    cut_off: bool = False
    malformed: bool = False


def normalize_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


_NUMBERED = re.compile(r"\n\s*\d+\s?\.(?:[ \t]+|(?=\n)|$)")


def parse_numbered_list(text: str, first_number: int, finish_reason: str | None) -> list[Item]:
    """Split a continuation of 'N.' on the numbering ('\\n10. ', '\\n11. ', ...) into instructions.

    The text continues the prompt's last line ('9.'), so the first piece is item 9. A reply
    that repeats the number itself (chat models do) has it removed first. Empty pieces are
    not candidates.
    """
    text = text.replace("\r\n", "\n")
    restated = re.match(rf"\s*(?:[^\n]*\n\s*)?{first_number}\s?\.[ \t]+", text)
    if restated is not None:  # also after one preamble line ("Sure, here are more tasks:")
        text = text[restated.end():]
    pieces = [normalize_space(p) for p in _NUMBERED.split("\n" + text)]
    items = [Item(instruction=p) for p in pieces if p]
    if items and finish_reason == "length":
        items[-1].cut_off = True
    return items


_ALPACA_FIELD = re.compile(r"\d+\s?\.\s*(Instruction|Input|Output)\s*:")
_ALPACA_START = re.compile(r"\s*(?:###\s*)?\d+\s?\.\s*Instruction\s*:")


def parse_alpaca(text: str, first_number: int, finish_reason: str | None) -> list[Item]:
    """Split an Alpaca-style continuation ('###'-separated 'N. Instruction/Input/Output:' blocks).

    A block without exactly one instruction, input and output, in that order, is `malformed`.
    An input of <noinput> becomes "".
    """
    text = text.replace("\r\n", "\n")
    if not _ALPACA_START.match(text):
        text = f"{first_number}. Instruction:" + text
    items: list[Item] = []
    for chunk in text.split("###"):
        if not chunk.strip():
            continue
        parts = _ALPACA_FIELD.split(chunk)
        labels, values = parts[1::2], [p.strip() for p in parts[2::2]]
        if parts[0].strip() or labels != ["Instruction", "Input", "Output"]:
            first = values[0] if labels and labels[0] == "Instruction" else chunk
            items.append(Item(instruction=normalize_space(first), malformed=True))
            continue
        instruction, input_text, output = values
        if input_text.strip().lower() == NO_INPUT:
            input_text = ""
        items.append(Item(instruction=normalize_space(instruction), input=input_text, output=output))
    if items and finish_reason == "length":
        items[-1].cut_off = True
    return items


def parse_classification(text: str) -> bool | None:
    """'Yes' -> True, 'No' -> False, anything else -> None."""
    answer = text.strip().lower()
    if answer.startswith("yes"):
        return True
    if answer.startswith("no"):
        return False
    return None


_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")


def _input_output(text: str) -> tuple[str, str]:
    if _OUTPUT.search(text):
        before, after = _OUTPUT.split(text, maxsplit=1)
        input_text, output = before.strip(), after.strip()
    else:
        input_text, output = "", text.strip()
    if _INPUT.search(output):  # a second pair run on without a new "Example N" line
        output = _INPUT.split(output, maxsplit=1)[0].strip()
    input_text = _INPUT.sub("", input_text, count=1).strip() if _INPUT.match(input_text) else input_text
    return input_text, output


def parse_input_first(text: str, finish_reason: str | None) -> list[Item]:
    """'Example N / Input: ... / Output: ...' blocks (or a bare output) -> instances."""
    pieces = [p for p in re.split(r"Example\s?\d+\s*:?", text.replace("\r\n", "\n")) if p.strip()]
    items = []
    for piece in pieces:
        input_text, output = _input_output(piece)
        items.append(Item(input=input_text, output=output))
    if items and finish_reason == "length":
        items[-1].cut_off = True
    return items


def parse_output_first(text: str, finish_reason: str | None) -> list[Item]:
    """'Class label: L / Input: ...' blocks -> instances (output L). Text before the first label is ignored."""
    text = text.replace("\r\n", "\n")
    if "Class label:" not in text:
        return [Item(output=text.strip(), malformed=True)] if text.strip() else []
    items = []
    for block in text.split("Class label:")[1:]:
        label, _, rest = block.strip().partition("\n")
        rest = rest.strip()
        rest = _INPUT.sub("", rest, count=1).strip() if _INPUT.match(rest) else rest
        items.append(Item(input=rest, output=label.strip()))
    if items and finish_reason == "length":
        items[-1].cut_off = True
    return items
