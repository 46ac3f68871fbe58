"""Bad data: errors name the file, the line or index, and the field; `skip` counts by reason."""

import pytest

from sftlab.config import DataSource
from sftlab.data.prepare import load_conversations
from sftlab.data.readers import DataError
from conftest import write_json, write_jsonl

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def _load(path, on_error="raise"):
    return load_conversations(DataSource(path=str(path)), on_error)


def test_missing_output_names_file_index_and_field(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, {"instruction": "No answer here."}])
    with pytest.raises(DataError, match=r"d\.json\[1\]: missing field 'output'"):
        _load(path)


def test_wrong_type_names_the_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"instruction": "x", "output": 42}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'output' must be a string, found int"):
        _load(path)


def test_invalid_json_at_line_n(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        _load(path)


def test_invalid_json_in_a_json_list_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        _load(path)


def test_empty_file(tmp_path):
    (tmp_path / "e.json").write_text("")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.json: the file is empty"):
        _load(tmp_path / "e.json")
    with pytest.raises(DataError, match=r"e\.jsonl: the file holds no rows"):
        _load(tmp_path / "e.jsonl")


def test_top_level_object_instead_of_list(tmp_path):
    path = write_json(tmp_path / "d.json", GOOD)
    with pytest.raises(DataError, match="expected a JSON list"):
        _load(path)


def test_empty_output_is_an_error_not_a_silent_drop(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "x", "input": "", "output": "  "}])
    with pytest.raises(DataError, match=r"d\.json\[0\]: field 'output' is empty"):
        _load(path)


def test_skip_counts_each_bad_row_under_its_reason(tmp_path):
    rows = [GOOD, {"instruction": "x"}, {"instruction": "x", "output": ["a"]}, {"instruction": "x", "output": ""}, "text", GOOD]
    conversations, dropped, rows_read, _ = _load(write_json(tmp_path / "d.json", rows), on_error="skip")
    assert rows_read == 6 and len(conversations) == 2
    assert [(d.source.split("[")[1], d.reason) for d in dropped] == [
        ("1]", "missing_output"), ("2]", "non_string_output"), ("3]", "empty_response"), ("4]", "not_an_object"),
    ]


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        _load(tmp_path / "d.txt")
