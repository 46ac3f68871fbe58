"""Files -> raw rows, each with its provenance (file:line for JSONL, file[index] for a JSON list).

Errors name the file, the line or index and what was expected, so a user can open the file
at the right place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Bad input data; the message names file, line/index, field and what to do.

    `reason` is a short name under which `on_error: skip` counts the dropped row.
    """

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RawRow:
    data: Any
    source: str  # "path:line" (JSONL) or "path[index]" (JSON list)


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield the rows of a .json (a list of objects) or .jsonl (one object per line) file.

    Invalid JSON always raises (a corrupt file is not a bad row): the error says where.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json_list(path)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use .json (a list of objects) or .jsonl")


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    seen_any = False
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_number}: invalid UTF-8 at byte {exc.start} of the line") from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{line_number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    "each line of a .jsonl file must be one complete JSON object"
                ) from None
            seen_any = True
            yield RawRow(data, f"{path}:{line_number}")
    if not seen_any:
        raise DataError(f"{path}: the file holds no rows")


def _read_json_list(path: Path) -> Iterator[RawRow]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a JSON list of objects")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of objects at the top level, found {type(data).__name__}; "
            "for one object per line use a .jsonl file"
        )
    if not data:
        raise DataError(f"{path}: the list holds no rows")
    for index, row in enumerate(data):
        yield RawRow(row, f"{path}[{index}]")
