"""Self-Instruct's filters, each with a named reason so that every dropped candidate is counted.

Instructions, in the paper's order: cut off by the length limit; 3 < words <= 150; a whole-word
blacklist (the paper's list plus Alpaca's additions); a "Write a program" opening; a first
character that is punctuation or not ASCII. The ROUGE-L novelty check (> 0.7 against the
pool drops) comes last and lives in the pipeline, because it needs the pool.

Instances (per task): empty output, input equal to output, input or output ending with ":"
(usually an unfinished generation), the same input with different outputs (the paper then
drops every instance of the task), exact duplicates, and at most 5 per task.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from sftlab.selfinstruct.parsing import Item
from sftlab.selfinstruct.prompts import MAX_INSTANCES

# instruction reasons
CUT_OFF = "cut_off"
MALFORMED = "malformed"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BLACKLISTED = "blacklisted_word"
WRITE_A_PROGRAM = "write_a_program"
STARTS_WITH_PUNCTUATION = "starts_with_punctuation"
STARTS_WITH_NON_ASCII = "starts_with_non_ascii"
SIMILAR = "similar"
TARGET_REACHED = "target_reached"  # the run reached --num before this candidate's turn
# instance reasons
EMPTY_OUTPUT = "empty_output"
INPUT_EQUALS_OUTPUT = "input_equals_output"
ENDS_WITH_COLON = "ends_with_colon"
CONFLICTING_OUTPUTS = "conflicting_outputs"
DUPLICATE_INSTANCE = "duplicate_instance"
OVER_INSTANCE_LIMIT = "over_instance_limit"
REQUEST_FAILED = "request_failed"  # the backend gave no answer for this task's instances

MIN_WORDS_EXCLUSIVE = 3
MAX_WORDS = 150
ROUGE_THRESHOLD = 0.7
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)


def blacklisted_word(text: str) -> str | None:
    """The first blacklisted word in text (whole words, any case), or None."""
    found = _BLACKLIST.search(text)
    return found.group(1).lower() if found else None


def instruction_reason(instruction: str) -> tuple[str | None, str | None]:
    """(reason, detail) for an instruction the text filters drop; (None, None) when it passes."""
    words = len(instruction.split())
    if words <= MIN_WORDS_EXCLUSIVE:
        return TOO_SHORT, f"{words} words"
    if words > MAX_WORDS:
        return TOO_LONG, f"{words} words"
    word = blacklisted_word(instruction)
    if word is not None:
        return BLACKLISTED, word
    if instruction.lower().startswith("write a program"):
        return WRITE_A_PROGRAM, None
    if instruction[0] in string.punctuation:
        return STARTS_WITH_PUNCTUATION, instruction[0]
    if not instruction[0].isascii():
        return STARTS_WITH_NON_ASCII, instruction[0]
    return None, None


def item_reason(item: Item) -> tuple[str | None, str | None]:
    """Reason a parsed instruction candidate is dropped before the novelty check (None: it passes)."""
    if item.cut_off:
        return CUT_OFF, None
    if item.malformed:
        return MALFORMED, None
    return instruction_reason(item.instruction)


def instance_reason(input_text: str, output: str) -> str | None:
    """The single-instance filters: empty output, input == output, a trailing ':'."""
    if not output.strip():
        return EMPTY_OUTPUT
    if input_text.strip() == output.strip():
        return INPUT_EQUALS_OUTPUT
    if input_text.strip().endswith(":") or output.strip().endswith(":"):
        return ENDS_WITH_COLON
    return None


def filter_instances(items: Sequence[Item], limit: int = MAX_INSTANCES) -> list[str | None]:
    """One reason (or None = kept) per instance of one task, in order."""
    reasons: list[str | None] = []
    for item in items:
        if item.cut_off:
            reasons.append(CUT_OFF)
        elif item.malformed:
            reasons.append(MALFORMED)
        else:
            reasons.append(instance_reason(item.input, item.output))
    valid = [i for i, r in enumerate(reasons) if r is None]
    outputs: dict[str, str] = {}
    for i in valid:
        key = items[i].input.strip()
        if key and outputs.setdefault(key, items[i].output.strip()) != items[i].output.strip():
            for j in valid:  # as the paper: a task whose instances contradict each other is dropped whole
                reasons[j] = CONFLICTING_OUTPUTS
            return reasons
    seen: set[tuple[str, str]] = set()
    kept = 0
    for i in valid:
        key = (items[i].input.strip(), items[i].output.strip())
        if key in seen:
            reasons[i] = DUPLICATE_INSTANCE
        elif kept >= limit:
            reasons[i] = OVER_INSTANCE_LIMIT
        else:
            seen.add(key)
            kept += 1
    return reasons
