"""Every data shape -> Conversation; messy rows raise with their location or are counted by reason."""

import gzip
import json
from pathlib import Path

import pytest

from sftlab.config import DataSource
from sftlab.data.formats import FormatOptions, Message
from sftlab.data.prepare import load_conversations
from sftlab.data.readers import DataError

FORMATS = Path(__file__).parent / "fixtures" / "formats"


def _load(name, on_error="skip", fmt="auto", **options):
    return load_conversations(DataSource(path=str(FORMATS / name), format=fmt), on_error, FormatOptions(**options))


def _roles(conversation):
    return [(m.role, m.content, m.trained) for m in conversation.messages]


def test_dolly_context_is_the_input_and_category_is_kept():
    conversations, dropped, read, fmt = _load("dolly.jsonl")
    assert (fmt, read) == ("dolly", 3)
    assert _roles(conversations[0]) == [
        ("user", "When was the bridge opened?", False),
        ("input", "The Golden Gate Bridge opened in 1937 [3].", False),
        ("assistant", "It opened in 1937.", True),
    ]
    assert conversations[0].metadata == {"category": "closed_qa"}
    assert [m.role for m in conversations[1].messages] == ["user", "assistant"]  # empty context: no input turn
    assert [(d.source.rsplit("/", 1)[1], d.reason) for d in dropped] == [("dolly.jsonl:3", "missing_response")]


def test_openorca_system_prompt_is_part_of_the_prompt():
    conversations, dropped, _, fmt = _load("openorca.jsonl")
    assert fmt == "openorca"
    assert _roles(conversations[0]) == [
        ("system", "You are a careful assistant.", False), ("user", "Is 7 prime?", False), ("assistant", "Yes, 7 is prime.", True),
    ]
    assert [m.role for m in conversations[1].messages] == ["user", "assistant"]
    assert conversations[0].metadata == {"id": "niv.1"}
    assert [d.reason for d in dropped] == ["non_string_question"]


def test_sharegpt_roles_aliases_and_every_messy_case_counted():
    conversations, dropped, read, fmt = _load("sharegpt.json")
    assert (fmt, read) == ("sharegpt", 10)
    assert _roles(conversations[0]) == [
        ("system", "Be brief.", False), ("user", "Hi!", False), ("assistant", "Hello.", True),
        ("user", "What is 2+2?", False), ("assistant", "4.", True),
    ]
    assert _roles(conversations[1]) == [("user", "Name a colour.", False), ("assistant", "Blue.", True)]
    assert [(d.source.rsplit("[", 1)[1], d.reason) for d in dropped] == [
        ("2]", "empty_conversation"), ("3]", "leading_assistant"), ("4]", "consecutive_roles"),
        ("5]", "unknown_role"), ("6]", "empty_response"), ("7]", "non_string_content"), ("8]", "ends_without_response"),
    ]
    assert len(conversations) == 3  # rows 0, 1 and the duplicate row 9 (duplicates are handled by prepare)


def test_sharegpt_raise_names_file_record_and_problem():
    with pytest.raises(DataError, match=r"sharegpt\.json\[2\]: field 'conversations' is an empty conversation"):
        _load("sharegpt.json", on_error="raise")


def test_opt_in_repairs_fix_leading_assistant_consecutive_roles_and_trailing_user():
    conversations, dropped, _, _ = _load(
        "sharegpt.json", drop_leading_assistant=True, merge_consecutive_roles=True, drop_trailing_user=True)
    by_source = {c.source.rsplit("[", 1)[1]: c for c in conversations}
    assert _roles(by_source["3]"]) == [("user", "Odd.", False), ("assistant", "Yes.", True)]
    assert _roles(by_source["4]"]) == [("user", "One.\n\nTwo.", False), ("assistant", "Three.", True)]
    assert [d.reason for d in dropped] == ["empty_conversation", "unknown_role", "empty_response", "non_string_content",
                                          "empty_conversation"]


def test_openai_messages_with_content_parts_and_a_misplaced_system():
    conversations, dropped, _, fmt = _load("openai.jsonl")
    assert fmt == "openai"
    assert _roles(conversations[0])[0] == ("system", "You are terse.", False)
    assert conversations[1].messages[0] == Message("user", "Part one, part two.")
    assert [d.reason for d in dropped] == ["misplaced_system"]


def test_prompt_completion_from_csv():
    conversations, dropped, _, fmt = _load("prompt_completion.csv")
    assert (fmt, dropped) == ("prompt_completion", [])
    assert _roles(conversations[0]) == [("user", 'Translate "hello" to French.', False), ("assistant", "Bonjour.", True)]
    assert conversations[1].source.endswith("prompt_completion.csv:3")


def test_plain_text_is_one_trained_message():
    conversations, _, _, fmt = _load("text.jsonl")
    assert fmt == "text"
    assert conversations[0].messages == (Message("text", "The quick brown fox jumps over the lazy dog.", True),)


def test_field_map_reads_renamed_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "Why?", "a": "Because."}) + "\n")
    conversations, _, _, fmt = load_conversations(
        DataSource(path=str(path), fields={"instruction": "q", "output": "a"}), "raise",
        FormatOptions(fields={"instruction": "q", "output": "a"}))
    assert fmt == "alpaca" and _roles(conversations[0])[-1] == ("assistant", "Because.", True)


def test_a_file_cut_mid_record_keeps_every_complete_record_with_skip():
    conversations, dropped, _, _ = _load("truncated.jsonl")
    assert [c.messages[-1].content for c in conversations] == ["B", "D"]
    assert [d.reason for d in dropped] == ["truncated_file"]
    assert "truncated.jsonl:3" in dropped[0].detail and "byte offset 72" in dropped[0].detail
    with pytest.raises(DataError, match=r"truncated\.jsonl:3: the file is truncated in the middle of a record"):
        _load("truncated.jsonl", on_error="raise")


def test_invalid_utf8_is_a_counted_row_error():
    conversations, dropped, _, _ = _load("invalid_utf8.jsonl")
    assert len(conversations) == 2 and [d.reason for d in dropped] == ["invalid_utf8"]
    with pytest.raises(DataError, match=r"invalid_utf8\.jsonl:2: invalid UTF-8"):
        _load("invalid_utf8.jsonl", on_error="raise")


def test_unknown_shape_asks_for_format_and_fields(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match="cannot tell the data format.*set `format:`"):
        load_conversations(DataSource(path=str(path)), "raise")


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "json.gz", "parquet", "csv.gz"])
def test_compressed_and_columnar_files_read_the_same_rows(tmp_path, kind):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(50)]
    path = tmp_path / f"data.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        if kind.startswith("jsonl"):
            payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        elif kind.startswith("json"):
            payload = json.dumps(rows).encode()
        else:
            payload = ("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in rows)).encode()
        if kind.endswith(".gz"):
            path.write_bytes(gzip.compress(payload))
        else:
            import zstandard

            path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    conversations, dropped, read, fmt = load_conversations(DataSource(path=str(path)), "raise")
    assert (read, fmt, dropped) == (50, "alpaca", [])
    assert [c.messages[-1].content for c in conversations] == [r["output"] for r in rows]


def test_a_saved_hugging_face_dataset_folder_reads_like_a_hub_id(tmp_path):
    import datasets

    rows = [{"instruction": "Say a.", "output": "a"}, {"instruction": "Say b.", "output": "b"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "ds" / "train.parquet"))
    conversations, _, read, fmt = load_conversations(DataSource(path=str(tmp_path / "ds"), split="train"), "raise")
    assert (read, fmt) == (2, "alpaca") and conversations[1].messages[-1].content == "b"
