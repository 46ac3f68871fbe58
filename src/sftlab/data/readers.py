"""Files -> raw rows, each with its provenance, streamed (a file is never loaded whole).

    | file                       | provenance      | how it is read                          |
    |----------------------------|-----------------|-----------------------------------------|
    | .jsonl (.gz / .zst)        | path:line       | line by line                            |
    | .json  (.gz / .zst)        | path[index]     | incremental decoder over a JSON list    |
    | .csv   (.gz / .zst)        | path:line       | csv.DictReader                          |
    | .parquet                   | path[index]     | pyarrow, batch by batch                 |
    | hf:owner/name (or a folder | name[split][i]  | `datasets.load_dataset(..., streaming)` |
    |  saved with datasets)      |                 |                                         |

Errors name the file, the line or index and what was expected. A bad row is a RawRow with
an `error` (so `on_error: skip` can count it and go on); a file cut off in the middle of a
record ends with such a row whose reason is `truncated_file`, after every complete record.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sftlab.errors import SftlabError


class DataError(SftlabError, ValueError):
    """Bad input data; the message names file, line/index, field and what to do.

    `reason` is a short name under which `on_error: skip` counts the dropped row.
    """

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RawRow:
    data: Any
    source: str  # "path:line" or "path[index]"
    error: DataError | None = None  # set when the record itself could not be read


HF_PREFIX = "hf:"
READ_CHUNK = 1 << 20
MAX_RECORD_CHARS = 64 << 20  # a record longer than this in a JSON list is reported as invalid


def file_kind(path: str | Path) -> tuple[str, str | None]:
    """('.json' | '.jsonl' | '.csv' | '.parquet' | '', '.gz' | '.zst' | None) of a data file name."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _open_binary(path: Path, compression: str | None):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def read_rows(path: str | Path, split: str = "train") -> Iterator[RawRow]:
    """Yield the rows of a data file (or a Hugging Face dataset id `hf:owner/name`), streamed.

    A file that cannot be read at all (missing, empty, wrong type) raises DataError; a bad
    record is yielded as a RawRow with `.error` set.
    """
    text = str(path)
    if text.startswith(HF_PREFIX):
        yield from _read_hf(text[len(HF_PREFIX) :], split)
        return
    path = Path(path)
    if path.is_dir():
        yield from _read_hf(str(path), split)
        return
    if not path.is_file():
        raise DataError(f"{path}: data file not found", "file_not_found")
    kind, compression = file_kind(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json_list, ".csv": _read_csv, ".parquet": _read_parquet}
    if kind not in readers:
        raise DataError(
            f"{path}: unsupported file type '{''.join(path.suffixes)}'; use .json, .jsonl, .csv or .parquet "
            "(optionally .gz or .zst compressed), or hf:owner/name for a Hugging Face dataset",
            "unsupported_file",
        )
    if kind == ".parquet" and compression:
        raise DataError(f"{path}: parquet files are compressed inside; do not gzip/zstd them", "unsupported_file")
    yield from readers[kind](path, compression)


def json_lines(path: str | Path, error: type[Exception] = DataError) -> Iterator[tuple[str, Any]]:
    """("path:line", value) for each non-blank line of a small JSONL file (seed tasks, an eval
    suite, a corpus); the first bad line raises `error` naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield where, value


def _read_jsonl(path: Path, compression: str | None) -> Iterator[RawRow]:
    seen_any = False
    offset = 0
    with _open_binary(path, compression) as handle:
        for line_number, raw_line in enumerate(io.BufferedReader(handle) if compression else handle, start=1):
            where = f"{path}:{line_number}"
            start, offset = offset, offset + len(raw_line)
            if not raw_line.strip():
                continue
            seen_any = True
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(None, where, DataError(f"{where}: invalid UTF-8 at byte {exc.start} of the line", "invalid_utf8"))
                continue
            try:
                yield RawRow(json.loads(line), where)
            except json.JSONDecodeError as exc:
                if not raw_line.endswith(b"\n") and _is_cut_off(line):
                    yield RawRow(None, where, DataError(
                        f"{where}: the file is truncated in the middle of a record (byte offset {start}); "
                        "every complete record before it was read", "truncated_file"))
                else:
                    yield RawRow(None, where, DataError(
                        f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); "
                        "each line of a .jsonl file must be one complete JSON object", "invalid_json"))
    if not seen_any:
        raise DataError(f"{path}: the file holds no rows", "empty_file")


def _is_cut_off(text: str) -> bool:
    """A JSON text that fails only because it ends too early (not because it is wrong)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated string")
    return False


_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json_list(path: Path, compression: str | None) -> Iterator[RawRow]:
    """Stream the objects of a top-level JSON list with an incremental decoder.

    The buffer is read by position and compacted only when refilled, so each byte is decoded
    once and memory stays at about one read chunk plus one record.
    """
    decoder = json.JSONDecoder()
    with _open_binary(path, compression) as binary:
        handle = io.TextIOWrapper(binary, encoding="utf-8")
        state = {"buf": "", "pos": 0, "eof": False, "consumed": 0}

        def fill() -> bool:
            if state["eof"]:
                return False
            try:
                chunk = handle.read(READ_CHUNK)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: invalid UTF-8 near character {state['consumed']}: {exc.reason}", "invalid_utf8") from None
            state["consumed"] += state["pos"]
            state["buf"], state["pos"] = state["buf"][state["pos"]:] + chunk, 0
            state["eof"] = not chunk
            return bool(chunk)

        line = 1

        def skip_space() -> None:
            nonlocal line
            while True:
                end = _SPACE.match(state["buf"], state["pos"]).end()
                line += state["buf"].count("\n", state["pos"], end)
                state["pos"] = end
                if end < len(state["buf"]) or not fill():
                    return

        skip_space()
        buf, pos = state["buf"], state["pos"]
        if pos >= len(buf):
            raise DataError(f"{path}: the file is empty; expected a JSON list of objects", "empty_file")
        if buf[pos] != "[":
            found = "an object" if buf[pos] == "{" else repr(buf[pos:pos + 20])
            raise DataError(f"{path}: expected a JSON list of objects at the top level, found {found}; "
                            "for one object per line use a .jsonl file", "not_a_list")
        state["pos"] += 1
        index, expect_item = 0, True
        while True:
            skip_space()
            buf, pos = state["buf"], state["pos"]
            if pos >= len(buf):
                yield RawRow(None, f"{path}[{index}]", DataError(
                    f"{path}:{line}: the file is truncated: the JSON list is not closed; "
                    f"the {index} complete records before it were read", "truncated_file"))
                return
            if buf[pos] == "]":
                if index == 0:
                    raise DataError(f"{path}: the list holds no rows", "empty_file")
                return
            if buf[pos] == "," and not expect_item:
                state["pos"] += 1
                expect_item = True
                continue
            while True:
                buf, pos = state["buf"], state["pos"]
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and fill():  # a number may continue in the next chunk
                        continue
                    break
                except json.JSONDecodeError as exc:
                    if len(buf) - pos < MAX_RECORD_CHARS and fill():
                        continue  # the record may continue in the next chunk
                    where = f"{path}:{line + buf.count(chr(10), pos, exc.pos)}"
                    if state["eof"] and _is_cut_off(buf[pos:]):
                        yield RawRow(None, f"{path}[{index}]", DataError(
                            f"{where}: the file is truncated in the middle of record {index}; "
                            f"the {index} complete records before it were read", "truncated_file"))
                        return
                    # a syntax error inside the list: the next record cannot be found reliably
                    raise DataError(f"{where}: invalid JSON ({exc.msg}) in record {index}", "invalid_json") from None
            line += buf.count("\n", pos, end)
            state["pos"] = end
            yield RawRow(value, f"{path}[{index}]")
            index += 1
            expect_item = False


def _read_csv(path: Path, compression: str | None) -> Iterator[RawRow]:
    with _open_binary(path, compression) as binary:
        handle = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        reader = csv.DictReader(handle)
        seen_any = False
        try:
            for row in reader:
                seen_any = True
                where = f"{path}:{reader.line_num}"
                if None in row:
                    yield RawRow(None, where, DataError(f"{where}: more values than header columns", "malformed_csv"))
                    continue
                yield RawRow(dict(row), where)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: invalid UTF-8 (byte {exc.start} of a read block)", "invalid_utf8") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})", "malformed_csv") from None
    if not seen_any:
        raise DataError(f"{path}: the file holds no rows (a header line and at least one row are needed)", "empty_file")


def _read_parquet(path: Path, compression: str | None) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({exc})", "unreadable_file") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RawRow(row, f"{path}[{index}]")
            index += 1
    if index == 0:
        raise DataError(f"{path}: the file holds no rows", "empty_file")


def _read_hf(name: str, split: str) -> Iterator[RawRow]:
    """A Hugging Face dataset (hub id when the network allows, or a local dataset folder)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: reading Hugging Face datasets needs `pip install datasets`", "missing_dependency") from None
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # offline, unknown id, unknown split...
        raise DataError(f"hf:{name}[{split}]: could not load the dataset ({type(exc).__name__}: {exc})", "unreadable_file") from None
    for index, row in enumerate(dataset):
        yield RawRow(dict(row), f"{name}[{split}][{index}]")
