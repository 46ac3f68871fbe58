"""Data files -> QualityRows: each readable conversation with its instruction and response text.

    instruction = the text of every user turn and its input (Alpaca's `input`, Dolly's
                  `context`), in order, joined by a blank line; "" for the `text` format
    response    = the text of every assistant turn, joined by a blank line (the whole text
                  for the `text` format)

Rows keep their provenance (`source`, "file:line" or "file[index]") and their position in
file order across all inputs (`index`), which decides "the first" of a duplicate cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftlab.data.formats import Conversation


@dataclass
class QualityRow:
    index: int  # position in file order over all inputs
    file: int  # which input file
    source: str
    instruction: str
    response: str
    conversation: Conversation
    metadata: dict = field(default_factory=dict)
    raw: Any = None  # the original row object (filled for `filter`)

    @property
    def texts(self) -> list[str]:
        """Every message's text (system prompt included)."""
        return [m.content for m in self.conversation.messages]


@dataclass
class FileInfo:
    path: str
    format: str
    rows_read: int
    rows_ok: int
    dropped: list  # sftlab.data.tokenize.Dropped: source, reason, detail
    raw: dict = field(default_factory=dict)  # source -> original row object (keep_raw only)
    columns: list = field(default_factory=list)  # the first raw row's keys (for CSV headers)


@dataclass
class Dataset:
    rows: list[QualityRow]
    files: list[FileInfo]

    @property
    def dropped(self) -> list:
        return [d for f in self.files for d in f.dropped]


def split_conversation(conversation: Conversation) -> tuple[str, str]:
    """(instruction, response) of a conversation, as defined in the module docstring."""
    messages = conversation.messages
    if len(messages) == 1 and messages[0].role == "text":
        return "", messages[0].content
    instruction = "\n\n".join(m.content for m in messages if m.role in ("user", "input"))
    response = "\n\n".join(m.content for m in messages if m.role == "assistant")
    return instruction, response


def load_dataset(paths, format: str = "auto", fields: dict | None = None, keep_raw: bool = False) -> Dataset:
    """Read every file with sftlab's readers and formats (`on_error="skip"`: bad rows are counted).

    With keep_raw, each row also carries its original object (read again with `read_rows` and
    matched by provenance), which `filter` writes back unchanged.
    """
    from sftlab.config import DataSource
    from sftlab.data.prepare import load_conversations
    from sftlab.data.readers import read_rows

    from sftlab.data.formats import FORMATS
    from sftlab.data.readers import DataError

    if format != "auto" and format not in FORMATS:
        raise DataError(f"format '{format}': use auto or one of {', '.join(FORMATS)}", "bad_format")
    rows: list[QualityRow] = []
    files: list[FileInfo] = []
    for file_index, path in enumerate(paths):
        source = DataSource(path=str(path), format=format, fields=dict(fields or {}))
        conversations, dropped, rows_read, fmt = load_conversations(source, on_error="skip")
        raw = {r.source: r.data for r in read_rows(path) if r.error is None} if keep_raw else {}
        first = next(iter(raw.values()), None)
        columns = list(first) if isinstance(first, dict) else []
        for c in conversations:
            instruction, response = split_conversation(c)
            rows.append(QualityRow(len(rows), file_index, c.source, instruction, response, c, dict(c.metadata),
                                   raw.get(c.source)))
        files.append(FileInfo(str(path), fmt, rows_read, len(conversations), list(dropped), raw, columns))
    return Dataset(rows, files)
