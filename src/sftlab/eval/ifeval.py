"""Verifiable instruction following, in the spirit of IFEval (Zhou et al., 2023).

Each instruction type has an id, a sentence that states it to the model (`describe`), a
checker that decides compliance by code (`check`), a sampler of its arguments for the suite
generator (`sample`), and the types it cannot be combined with (`conflicts`).

Scoring follows IFEval's conventions:

- **strict**: the checker on the response as it is;
- **loose**: the instruction counts as followed when the checker accepts any of 8 variants
  of the response: as is, with its first line removed, its last line removed, both removed,
  and each of these four with markdown `*` emphasis removed.
- **prompt level**: a prompt counts when all its instructions are followed; **instruction
  level**: the share of single instructions followed.

Extend with `register(Instruction(...))`; a suite row names instruction ids and their kwargs.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable

from sftlab.eval.errors import EvalError

RELATIONS = ("at least", "less than")


@dataclass(frozen=True)
class Task:
    """A base task of the suite: the request and words that fit its topic (for keyword instructions)."""

    text: str
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Instruction:
    id: str
    describe: Callable[..., str]  # kwargs -> the sentence shown to the model
    check: Callable[..., bool]  # (response, **kwargs) -> followed?
    sample: Callable[[random.Random, Task], dict] = field(default=lambda rng, task: {})
    conflicts: frozenset[str] = frozenset()


INSTRUCTIONS: dict[str, Instruction] = {}


def register(instruction: Instruction) -> Instruction:
    """Add (or replace) an instruction type; conflicts are made symmetric."""
    INSTRUCTIONS[instruction.id] = instruction
    for other in instruction.conflicts:
        if other in INSTRUCTIONS and instruction.id not in INSTRUCTIONS[other].conflicts:
            existing = INSTRUCTIONS[other]
            INSTRUCTIONS[other] = Instruction(existing.id, existing.describe, existing.check, existing.sample,
                                              existing.conflicts | {instruction.id})
    return instruction


def conflicting(a: str, b: str) -> bool:
    return a == b or b in INSTRUCTIONS[a].conflicts or a in INSTRUCTIONS[b].conflicts


# -- text helpers ------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z0-9\u00C0-\u024F]+(?:['’][A-Za-z]+)*")


def words(text: str) -> list[str]:
    """Words: runs of letters/digits (apostrophe contractions kept whole); punctuation and markup ignored."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Sentences: split after . ! ? (repeated) followed by whitespace or the end; empty pieces dropped."""
    parts = re.split(r"(?<=[.!?])[\"')\]]*\s+", text.strip())
    return [p for p in parts if words(p)]


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "at least":
        return count >= n
    if relation == "less than":
        return count < n
    raise EvalError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _strip_code_fence(text: str) -> str:
    text = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if text.endswith("```"):
        text = text[:-3]
    return text.strip()


# -- the checkers ------------------------------------------------------------------------------

def check_lowercase(response: str) -> bool:
    return bool(re.search(r"[a-z]", response)) and response == response.lower()


def check_uppercase(response: str) -> bool:
    return bool(re.search(r"[A-Z]", response)) and response == response.upper()


def check_capital_word_frequency(response: str, relation: str, n: int) -> bool:
    capitals = [w for w in words(response) if len(w) > 1 and w.isupper()]
    return _compare(len(capitals), relation, n)


def check_min_words(response: str, n: int) -> bool:
    return len(words(response)) >= n


def check_max_words(response: str, n: int) -> bool:
    return 0 < len(words(response)) <= n


def check_sentences(response: str, relation: str, n: int) -> bool:
    return _compare(len(sentences(response)), relation, n)


def check_paragraphs(response: str, n: int) -> bool:
    """Exactly n paragraphs separated by the markdown divider ***."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response.strip())
    if any(not p.strip() for p in paragraphs):
        return False
    return len(paragraphs) == n


def check_bullets(response: str, n: int) -> bool:
    """Exactly n markdown bullets (lines starting with '* ' or '- ')."""
    bullets = re.findall(r"^\s*[*-][ \t]+\S.*$", response, flags=re.MULTILINE)
    return len(bullets) == n


def check_numbered_list(response: str, n: int) -> bool:
    """Exactly n numbered items (lines starting with '1.' or '1)')."""
    return len(re.findall(r"^\s*\d+[.)][ \t]+\S.*$", response, flags=re.MULTILINE)) == n


def check_json(response: str) -> bool:
    """The whole response is valid JSON (a ```json fence around it is tolerated, as in IFEval)."""
    text = _strip_code_fence(response)
    if not text:
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check_title(response: str) -> bool:
    return any(m.strip() for m in re.findall(r"<<([^\n]+?)>>", response))


def check_highlights(response: str, n: int) -> bool:
    """At least n highlighted sections: *text* or **text**, non-empty, on one line."""
    single = re.findall(r"(?<!\*)\*([^\n*]+)\*(?!\*)", response)
    double = re.findall(r"\*\*([^\n*]+)\*\*", response)
    return sum(1 for h in single + double if h.strip()) >= n


def check_sections(response: str, n: int, splitter: str = "SECTION") -> bool:
    """Exactly n sections, marked 'SECTION 1' .. 'SECTION n' in order, each with content."""
    markers = [int(m) for m in re.findall(rf"\b{re.escape(splitter)}\s?(\d+)", response)]
    if markers != list(range(1, n + 1)):
        return False
    bodies = re.split(rf"\b{re.escape(splitter)}\s?\d+", response)[1:]
    return all(words(b) for b in bodies)


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def check_constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_OPTIONS)


def check_postscript(response: str, marker: str = "P.S.") -> bool:
    """A line that starts with the marker (case-insensitive, 'P.S.' or 'P. S.') followed by text."""
    if marker.upper().replace(" ", "") == "P.S.":
        pattern = r"^\s*p\.\s?s\.\s*\S"
    else:
        pattern = r"^\s*" + re.escape(marker.lower()) + r"\s*\S"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


def check_placeholders(response: str, n: int) -> bool:
    return len([p for p in re.findall(r"\[([^\[\]\n]+)\]", response) if p.strip()]) >= n


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", re.IGNORECASE)


def check_keywords(response: str, keywords: list[str]) -> bool:
    return all(_word_pattern(k).search(response) for k in keywords)


def check_forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return bool(response.strip()) and not any(_word_pattern(w).search(response) for w in forbidden_words)


def check_keyword_frequency(response: str, keyword: str, relation: str, n: int) -> bool:
    return _compare(len(_word_pattern(keyword).findall(response)), relation, n)


def check_letter_frequency(response: str, letter: str, relation: str, n: int) -> bool:
    return _compare(response.lower().count(letter.lower()), relation, n)


def check_no_comma(response: str) -> bool:
    return bool(response.strip()) and "," not in response


def check_quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def check_end_phrase(response: str, end_phrase: str) -> bool:
    """The response ends with the phrase, nothing after it (case-insensitive, outer quotes ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def check_first_word(response: str, first_word: str) -> bool:
    found = words(response.strip().lstrip("\"'*#>-_ \t\n"))
    return bool(found) and found[0].lower() == first_word.lower()


def check_repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def check_two_responses(response: str) -> bool:
    """Two different non-empty responses separated by ******."""
    parts = response.split("******")
    if len(parts) != 2:
        return False
    first, second = (p.strip() for p in parts)
    return bool(first) and bool(second) and first != second


# -- the registry ------------------------------------------------------------------------------

FIRST_WORDS = ("Today", "Imagine", "Yes", "Once", "First", "Honestly", "Well", "Remember")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "That is all.",
               "Let me know if you have additional questions.", "Thank you for reading.")
LETTERS = "aeinorst"

def _relation_kwargs(rng: random.Random, low: int, high: int) -> dict:
    return {"relation": rng.choice(RELATIONS), "n": rng.randint(low, high)}


def _letter_kwargs(rng: random.Random) -> dict:
    relation = rng.choice(RELATIONS)
    n = rng.randint(5, 15) if relation == "at least" else rng.randint(25, 50)
    return {"letter": rng.choice(LETTERS), "relation": relation, "n": n}


def _unprompted(task: Task) -> list[str]:
    """The task's keywords that its request does not already contain."""
    return [k for k in task.keywords if not _word_pattern(k).search(task.text)] or list(task.keywords)


def _s(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# The built-in instructions, by category; `_builtin` lists them all in this order.

_JSON_CONFLICTS = frozenset({  # what a JSON-only answer cannot also do
    "startend:quotation", "detectable_format:title", "detectable_format:number_bullet_lists",
    "detectable_format:numbered_list", "length_constraints:number_paragraphs", "detectable_format:multiple_sections",
    "detectable_content:postscript", "detectable_format:number_highlighted_sections",
    "detectable_content:number_placeholders", "startend:end_checker", "startend:first_word",
    "combination:repeat_prompt", "punctuation:no_comma", "change_case:english_capital",
    "change_case:capital_word_frequency", "length_constraints:number_sentences", "combination:two_responses",
    "detectable_format:constrained_response",
})


def _case_instructions() -> list[Instruction]:
    """Upper and lower case."""
    return [
        Instruction(
            "change_case:english_lowercase",
            lambda: ("Your entire response should be in English and in all lowercase letters; "
                     "no capital letters are allowed."),
            check_lowercase,
            conflicts=frozenset({"change_case:english_capital", "change_case:capital_word_frequency",
                                 "detectable_format:multiple_sections", "combination:repeat_prompt",
                                 "detectable_format:constrained_response"})),
        Instruction(
            "change_case:english_capital",
            lambda: "Your entire response should be in English, and in all capital letters.",
            check_uppercase,
            conflicts=frozenset({"change_case:capital_word_frequency", "combination:repeat_prompt",
                                 "detectable_format:constrained_response", "detectable_format:json_format"})),
        Instruction(
            "change_case:capital_word_frequency",
            lambda relation, n: (f"In your response, words with all capital letters should appear "
                                 f"{relation} {_s(n, 'time')}."),
            check_capital_word_frequency,
            lambda rng, task: _relation_kwargs(rng, 2, 6)),
    ]


def _length_instructions() -> list[Instruction]:
    """Words, sentences, paragraphs."""
    return [
        Instruction(
            "length_constraints:min_words",
            lambda n: f"Answer with at least {n} words.",
            check_min_words,
            lambda rng, task: {"n": rng.choice([50, 80, 100, 150, 200])},
            conflicts=frozenset({"length_constraints:max_words", "detectable_format:constrained_response"})),
        Instruction(
            "length_constraints:max_words",
            lambda n: f"Answer with at most {n} words.",
            check_max_words,
            lambda rng, task: {"n": rng.choice([20, 30, 40, 50, 60])},
            conflicts=frozenset({"length_constraints:number_paragraphs", "detectable_format:multiple_sections",
                                 "combination:two_responses"})),
        Instruction(
            "length_constraints:number_sentences",
            lambda relation, n: f"Your response should contain {relation} {_s(n, 'sentence')}.",
            check_sentences,
            lambda rng, task: _relation_kwargs(rng, 2, 6),
            conflicts=frozenset({"length_constraints:max_words", "length_constraints:min_words",
                                 "detectable_format:number_bullet_lists", "detectable_format:numbered_list",
                                 "length_constraints:number_paragraphs", "detectable_format:multiple_sections",
                                 "combination:two_responses"})),
        Instruction(
            "length_constraints:number_paragraphs",
            lambda n: f"There should be {_s(n, 'paragraph')}. Paragraphs are separated with the markdown divider: ***",
            check_paragraphs,
            lambda rng, task: {"n": rng.randint(2, 4)},
            conflicts=frozenset({"detectable_format:multiple_sections", "combination:two_responses"})),
    ]


def _format_instructions() -> list[Instruction]:
    """Lists, JSON, titles, sections, highlights, fixed answers."""
    return [
        Instruction(
            "detectable_format:number_bullet_lists",
            lambda n: (f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as:\n"
                       "* This is point 1.\n* This is point 2."),
            check_bullets,
            lambda rng, task: {"n": rng.randint(2, 5)},
            conflicts=frozenset({"detectable_format:numbered_list", "combination:two_responses",
                                 "detectable_format:number_highlighted_sections"})),
        Instruction(
            "detectable_format:numbered_list",
            lambda n: f"Your answer must be a numbered list with exactly {n} items, written as 1. 2. 3. and so on.",
            check_numbered_list,
            lambda rng, task: {"n": rng.randint(3, 6)},
            conflicts=frozenset({"combination:two_responses"})),
        Instruction(
            "detectable_format:json_format",
            lambda: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
            check_json,
            conflicts=_JSON_CONFLICTS),
        Instruction(
            "detectable_format:title",
            lambda: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
            check_title,
            conflicts=frozenset({"combination:repeat_prompt", "startend:first_word"})),
        Instruction(
            "detectable_format:number_highlighted_sections",
            lambda n: f"Highlight at least {_s(n, 'section')} in your answer with markdown, i.e. *highlighted section*.",
            check_highlights,
            lambda rng, task: {"n": rng.randint(1, 3)},
            conflicts=frozenset({"length_constraints:number_paragraphs"})),
        Instruction(
            "detectable_format:multiple_sections",
            lambda n, splitter: (f"Your response must have {n} sections. Mark the beginning of each section with "
                                 f"{splitter} X, such as:\n{splitter} 1\n[content of section 1]\n{splitter} 2\n"
                                 f"[content of section 2]"),
            check_sections,
            lambda rng, task: {"n": rng.randint(2, 3), "splitter": "SECTION"},
            conflicts=frozenset({"combination:two_responses", "startend:first_word", "combination:repeat_prompt",
                                 "detectable_content:number_placeholders"})),
        Instruction(
            "detectable_format:constrained_response",
            lambda: "Answer with one of the following options: My answer is yes., My answer is no., My answer is maybe.",
            check_constrained_response,
            conflicts=frozenset(set(_ALL_IDS) - {"detectable_format:constrained_response"})),
    ]


def _content_instructions() -> list[Instruction]:
    """A postscript, placeholders."""
    return [
        Instruction(
            "detectable_content:postscript",
            lambda marker: f"At the end of your response, please explicitly add a postscript starting with {marker}",
            check_postscript,
            lambda rng, task: {"marker": "P.S."},
            conflicts=frozenset({"startend:end_checker", "startend:quotation", "combination:two_responses"})),
        Instruction(
            "detectable_content:number_placeholders",
            lambda n: (f"The response must contain at least {_s(n, 'placeholder')} represented by square brackets, "
                       "such as [address]."),
            check_placeholders,
            lambda rng, task: {"n": rng.randint(1, 3)}),
    ]


def _keywords_instructions() -> list[Instruction]:
    """Words and letters to use, avoid or repeat."""
    return [
        Instruction(
            "keywords:existence",
            lambda keywords: "Include the keywords " + ", ".join(repr(k) for k in keywords) + " in the response.",
            check_keywords,
            lambda rng, task: {"keywords": rng.sample(_unprompted(task), 2)},
            conflicts=frozenset({"keywords:forbidden_words", "keywords:frequency"})),
        Instruction(
            "keywords:forbidden_words",
            lambda forbidden_words: ("Do not include the words " + ", ".join(repr(w) for w in forbidden_words)
                                     + " in the response."),
            check_forbidden_words,
            lambda rng, task: {"forbidden_words": rng.sample(_unprompted(task), 2)},
            conflicts=frozenset({"keywords:frequency", "combination:repeat_prompt"})),
        Instruction(
            "keywords:frequency",
            lambda keyword, relation, n: f"In your response, the word {keyword!r} should appear {relation} {_s(n, 'time')}.",
            check_keyword_frequency,
            lambda rng, task: {"keyword": rng.choice(_unprompted(task)), **_relation_kwargs(rng, 2, 4)}),
        Instruction(
            "keywords:letter_frequency",
            lambda letter, relation, n: f"In your response, the letter {letter} should appear {relation} {_s(n, 'time')}.",
            check_letter_frequency,
            lambda rng, task: _letter_kwargs(rng),
            conflicts=frozenset({"length_constraints:min_words"})),
    ]


def _punctuation_instructions() -> list[Instruction]:
    """Commas."""
    return [
        Instruction(
            "punctuation:no_comma",
            lambda: "In your entire response, refrain from the use of any commas.",
            check_no_comma),
    ]


def _start_end_instructions() -> list[Instruction]:
    """How the response starts and ends."""
    return [
        Instruction(
            "startend:quotation",
            lambda: "Wrap your entire response with double quotation marks.",
            check_quotation,
            conflicts=frozenset({"startend:first_word", "combination:repeat_prompt", "combination:two_responses",
                                 "startend:end_checker"})),
        Instruction(
            "startend:end_checker",
            lambda end_phrase: (f"Finish your response with this exact phrase {end_phrase!r}. "
                                "No other words should follow this phrase."),
            check_end_phrase,
            lambda rng, task: {"end_phrase": rng.choice(END_PHRASES)},
            conflicts=frozenset({"combination:two_responses", "change_case:english_lowercase",
                                 "change_case:english_capital"})),
        Instruction(
            "startend:first_word",
            lambda first_word: f"The first word of your response should be the word {first_word!r}.",
            check_first_word,
            lambda rng, task: {"first_word": rng.choice(FIRST_WORDS)},
            conflicts=frozenset({"combination:repeat_prompt", "combination:two_responses",
                                 "detectable_format:numbered_list"})),
    ]


def _combination_instructions() -> list[Instruction]:
    """Repeating the request; two responses."""
    return [
        Instruction(
            "combination:repeat_prompt",
            lambda prompt_to_repeat: ("First repeat the request word for word without change, then give your answer. "
                                      f"The request to repeat is: {prompt_to_repeat} (Do not say anything before "
                                      "repeating it, and do not repeat these instructions.)"),
            check_repeat_prompt,
            lambda rng, task: {"prompt_to_repeat": task.text},
            conflicts=frozenset({"combination:two_responses", "punctuation:no_comma"})),
        Instruction(
            "combination:two_responses",
            lambda: ("Give two different responses. Responses and only responses should be separated by "
                     "6 asterisk symbols: ******."),
            check_two_responses),
    ]


def _builtin() -> list[Instruction]:
    return (_case_instructions() + _length_instructions() + _format_instructions() + _content_instructions()
            + _keywords_instructions() + _punctuation_instructions() + _start_end_instructions()
            + _combination_instructions())


_ALL_IDS = (
    "change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency",
    "length_constraints:min_words", "length_constraints:max_words", "length_constraints:number_sentences",
    "length_constraints:number_paragraphs", "detectable_format:number_bullet_lists", "detectable_format:numbered_list",
    "detectable_format:json_format", "detectable_format:title", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "detectable_format:constrained_response", "detectable_content:postscript",
    "detectable_content:number_placeholders", "keywords:existence", "keywords:forbidden_words", "keywords:frequency",
    "keywords:letter_frequency", "punctuation:no_comma", "startend:quotation", "startend:end_checker",
    "startend:first_word", "combination:repeat_prompt", "combination:two_responses",
)

for _instruction in _builtin():
    register(_instruction)
assert tuple(INSTRUCTIONS) == _ALL_IDS, "keep _ALL_IDS in the registry's order"
BUILTIN_IDS = _ALL_IDS


# -- scoring -----------------------------------------------------------------------------------

def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: as is, first/last/both lines removed, each also without '*'."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    bases = [response, remove_first, remove_last, remove_both]
    return bases + [b.replace("*", "") for b in bases]


def get_instruction(instruction_id: str) -> Instruction:
    if instruction_id not in INSTRUCTIONS:
        raise EvalError(f"unknown instruction id '{instruction_id}'; known: {', '.join(INSTRUCTIONS)}")
    return INSTRUCTIONS[instruction_id]


def check_instruction(instruction_id: str, response: str, kwargs: dict | None = None) -> dict:
    """{'strict': bool, 'loose': bool} for one instruction on one response."""
    check = get_instruction(instruction_id).check
    kwargs = kwargs or {}
    strict = bool(response.strip()) and check(response, **kwargs)
    loose = strict or any(v.strip() and check(v, **kwargs) for v in loose_variants(response))
    return {"strict": bool(strict), "loose": bool(loose)}


def check_row(row: dict, response: str) -> dict:
    """Per instruction strict/loose results for one suite row and its response."""
    results = [check_instruction(i, response, k) for i, k in zip(row["instruction_ids"], row["kwargs"])]
    return {"strict": [r["strict"] for r in results], "loose": [r["loose"] for r in results]}


def score(rows: list[dict], responses: list[str]) -> dict:
    """Prompt- and instruction-level accuracy, strict and loose, overall and per instruction type."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} suite rows but {len(responses)} responses")
    checks = [check_row(row, response) for row, response in zip(rows, responses)]
    per_type: dict[str, dict] = {}
    for row, result in zip(rows, checks):
        for instruction_id, strict, loose in zip(row["instruction_ids"], result["strict"], result["loose"]):
            entry = per_type.setdefault(instruction_id, {"count": 0, "strict": 0, "loose": 0})
            entry["count"] += 1
            entry["strict"] += strict
            entry["loose"] += loose
    n_prompts = len(rows)
    n_instructions = sum(len(r["instruction_ids"]) for r in rows)

    def share(a: int, b: int) -> float:
        return round(a / b, 4) if b else 0.0

    return {
        "prompts": n_prompts,
        "instructions": n_instructions,
        "prompt_strict": share(sum(all(c["strict"]) for c in checks), n_prompts),
        "prompt_loose": share(sum(all(c["loose"]) for c in checks), n_prompts),
        "instruction_strict": share(sum(sum(c["strict"]) for c in checks), n_instructions),
        "instruction_loose": share(sum(sum(c["loose"]) for c in checks), n_instructions),
        "per_instruction": {
            k: {"count": v["count"], "strict": share(v["strict"], v["count"]), "loose": share(v["loose"], v["count"])}
            for k, v in sorted(per_type.items())
        },
        "checks": checks,
    }
