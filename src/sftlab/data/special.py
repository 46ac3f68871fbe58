"""Text that spells a control token stays text.

A user message, an answer or a tool result may contain the characters of a control token
(`<|im_end|>`, `<|im_start|>system`): tokenized as written, they become the control token, so a
user can inject turns and roles, and a training answer that quotes `<|im_end|>` teaches the
model to stop mid-answer. sftlab tokenizes such text as ordinary text (`special_tokens_in_content:
text`, the default); `allow` keeps the old behaviour, `drop_row` drops such rows.

How: before a conversation is rendered, each occurrence of a control token in its strings is
wrapped in two private-use characters (MARK_OPEN, MARK_CLOSE); the template writes its own
control tokens unwrapped. Tokenizing splits the rendered text at the marks: wrapped pieces are
tokenized without the added-token matcher (as plain text), the rest as usual, and the marks
themselves give no token. Offsets stay those of the marked text, where the trained spans are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"  # Unicode private use: no template writes them
MARKED = re.compile(f"{MARK_OPEN}(.*?){MARK_CLOSE}", re.DOTALL)
MODES = ("text", "allow", "drop_row")


def control_tokens(tokenizer) -> list[str]:
    """Every added token of the tokenizer (special or not): what text must not turn into."""
    encoder = getattr(tokenizer, "added_tokens_encoder", None)
    if encoder is None:
        encoder = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    return sorted((t for t in encoder if t), key=len, reverse=True)


class SpecialText:
    """Finds and marks control-token text in strings (see the module docstring)."""

    def __init__(self, tokens: list[str]):
        self.tokens = tuple(tokens)
        self.first = frozenset(t[0] for t in self.tokens)
        self.pattern = re.compile("|".join(map(re.escape, self.tokens))) if self.tokens else None

    def found_in(self, text: str) -> bool:
        if self.pattern is None or not any(c in text for c in self.first):
            return False
        return self.pattern.search(text) is not None

    def mark(self, text: str) -> str:
        text = text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")  # a mark in the data cannot forge one
        if not self.found_in(text):
            return text
        return self.pattern.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, text)

    def mark_value(self, value):
        """Strings in JSON-like data (tool arguments, tool schemas) marked, recursively."""
        if isinstance(value, str):
            return self.mark(value)
        if isinstance(value, dict):
            return {k: self.mark_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mark_value(v) for v in value)
        return value

    def in_conversation(self, conversation) -> bool:
        """Whether any string the conversation carries spells a control token."""
        for m in conversation.messages:
            if self.found_in(m.content) or (m.reasoning and self.found_in(m.reasoning)):
                return True
            if m.tool_calls and self.found_in(repr([c.arguments for c in m.tool_calls])):
                return True
        return bool(conversation.tools) and self.found_in(repr(conversation.tools))

    def mark_messages(self, messages) -> list:
        out = []
        for m in messages:
            changed = {"content": self.mark(m.content)}
            if m.reasoning is not None:
                changed["reasoning"] = self.mark(m.reasoning)
            if m.tool_calls:
                changed["tool_calls"] = tuple(dataclasses.replace(c, arguments=self.mark_value(c.arguments))
                                              for c in m.tool_calls)
            out.append(dataclasses.replace(m, **changed))
        return out


def unmark(text: str) -> str:
    """The text as written (for showing a prompt)."""
    return text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")


@dataclass
class Encoding:
    """What tokenize.py needs of an encoding: ids, offsets (in the marked text) and which tokens
    the tokenizer's post-processor added (BOS)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]


def _plain_tokens(backend, text: str, start: int) -> tuple[list[int], list[tuple[int, int]]]:
    """`text` tokenized as plain text: the backend's normalizer, pre-tokenizer and model, without
    its added-token matcher; offsets shifted by `start`."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, (0, len(text)))]
    ids, offsets = [], []
    for split, (s, _) in splits:
        for token in backend.model.tokenize(split):
            ids.append(token.id)
            offsets.append((start + s + token.offsets[0], start + s + token.offsets[1]))
    return ids, offsets


def encode_marked(backend, text: str, add_special_tokens: bool = True) -> Encoding:
    """A marked text tokenized: marked pieces as plain text, the rest as usual (see the module
    docstring). A text without marks is the backend's own encoding. (Offsets are those of the
    marked text; a piece's own offsets assume the normalizer keeps lengths, as byte-level and
    most BPE tokenizers' do.)"""
    if MARK_OPEN not in text and MARK_CLOSE not in text:
        encoding = backend.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(encoding.ids, encoding.offsets, encoding.special_tokens_mask)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    special: list[int] = []
    position, first = 0, True

    def usual(start: int, end: int) -> None:
        nonlocal first
        piece = text[start:end].replace(MARK_OPEN, "").replace(MARK_CLOSE, "")  # a lone mark: no token
        if not piece and not (first and add_special_tokens):
            return
        encoding = backend.encode(piece, add_special_tokens=first and add_special_tokens)
        for token, (s, e), mask in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask):
            ids.append(token)
            offsets.append((start, start) if mask else (start + s, start + e))  # BOS: an empty span
            special.append(mask)
        first = False

    for match in MARKED.finditer(text):
        usual(position, match.start())
        plain_ids, plain_offsets = _plain_tokens(backend, match.group(1), match.start(1))
        ids += plain_ids
        offsets += plain_offsets
        special += [0] * len(plain_ids)
        position = match.end()
    usual(position, len(text))
    return Encoding(ids, offsets, special)
