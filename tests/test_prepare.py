"""prepare: the supervision audit, duplicates, mixing, splits and the cache."""

import json
from pathlib import Path

import pytest

from sftlab.config import load_config
from sftlab.data.prepare import prepare_data
from conftest import write_json, write_jsonl

FORMATS = Path(__file__).parent / "fixtures" / "formats"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_HOME", str(tmp_path / "home"))


def _rows(n, tag="r"):
    return [{"instruction": f"Say {tag}{i}.", "input": "", "output": f"{tag}{i} said."} for i in range(n)]


def test_audit_counts_turns_roles_and_drops_for_a_messy_chat_file(tokenizer, tmp_path):
    config = load_config(overrides=[f"data={FORMATS / 'sharegpt.json'}", "template=chatml", "on_error=skip",
                                    f"output_dir={tmp_path}"])
    report = prepare_data(config, tokenizer).report
    source = report["sources"][0]
    assert (source["format"], source["rows_read"], source["rows_kept"]) == ("sharegpt", 10, 3)
    assert source["dropped_by_reason"] == {
        "empty_conversation": 1, "leading_assistant": 1, "consecutive_roles": 1, "unknown_role": 1,
        "empty_response": 1, "non_string_content": 1, "ends_without_response": 1}
    assert source["duplicate_rows"] == 1
    assert source["turns_percentiles"]["max"] == 4
    assert source["role_counts"] == {"system": 1, "user": 4, "assistant": 4}
    assert report["total"]["rows_read"] == sum(s["rows_read"] for s in report["sources"])


def test_duplicates_are_dropped_on_request_and_counted(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", _rows(3) + _rows(2))
    data = prepare_data(load_config(overrides=[f"data={path}", "drop_duplicates=true"]), tokenizer)
    assert len(data.train) == 3
    assert data.report["total"]["dropped_by_reason"] == {"duplicate": 2}
    assert [d.source for d in data.dropped] == [f"{path}[3]", f"{path}[4]"]


def test_truncation_that_cuts_a_response_is_audited(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "Go.", "input": "", "output": "word " * 100}])
    report = prepare_data(load_config(overrides=[f"data={path}", "max_length=40"]), tokenizer).report
    assert report["total"]["rows_truncated"] == 1 and report["total"]["rows_truncated_lost_end_token"] == 1


def test_mixing_weights_and_caps(tokenizer, tmp_path):
    a = write_json(tmp_path / "a.json", _rows(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", _rows(10, "b"))
    config = load_config(overrides=[f"data=[{{path: {a}, weight: 2}}, {{path: {b}, max_rows: 3}}]"])
    data = prepare_data(config, tokenizer)
    sources = [e.source for e in data.train]
    assert sum(s.startswith(str(a)) for s in sources) == 20  # every row twice
    assert sum(s.startswith(str(b)) for s in sources) == 3
    assert [s["rows_used"] for s in data.report["sources"]] == [20, 3]
    again = prepare_data(config, tokenizer, use_cache=False)
    assert [e.source for e in again.train] == sources  # stable under the seed


def test_validation_split_is_stable_and_disjoint(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", _rows(20))
    config = load_config(overrides=[f"data={path}", "val_fraction=0.25"])
    first = prepare_data(config, tokenizer, use_cache=False)
    second = prepare_data(config, tokenizer, use_cache=False)
    assert len(first.val) == 5 and len(first.train) == 15
    assert [e.source for e in first.val] == [e.source for e in second.val]
    assert not {e.source for e in first.val} & {e.source for e in first.train}


def test_cache_is_hit_on_a_second_run_and_missed_after_a_data_change(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", _rows(6))
    config = load_config(overrides=[f"data={path}"])
    first = prepare_data(config, tokenizer)
    second = prepare_data(config, tokenizer)
    assert (first.report["cache"], second.report["cache"]) == ("miss", "hit")
    assert [list(e.input_ids) for e in second.train] == [list(e.input_ids) for e in first.train]
    assert [list(e.labels) for e in second.train] == [list(e.labels) for e in first.train]
    assert [e.source for e in second.train] == [e.source for e in first.train]
    write_json(path, _rows(7))
    assert prepare_data(config, tokenizer).report["cache"] == "miss"
    assert prepare_data(load_config(overrides=[f"data={path}", "max_length=64"]), tokenizer).report["cache"] == "miss"
    assert prepare_data(load_config(overrides=[f"data={path}", "template=chatml"]), tokenizer).report["cache"] == "miss"


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_streaming_reader_keeps_memory_bounded_on_a_200mb_file(tmp_path, suffix):
    import subprocess
    import sys

    path = tmp_path / f"big.{suffix}"
    row = json.dumps({"instruction": "Summarise the passage.", "input": "lorem ipsum " * 80, "output": "A summary. " * 8})
    n = 200 * 1024 * 1024 // (len(row) + 1) + 1
    with path.open("w") as handle:
        if suffix == "jsonl":
            handle.writelines(row + "\n" for _ in range(n))
        else:
            handle.write("[\n" + ",\n".join(row for _ in range(n)) + "\n]")
    assert path.stat().st_size >= 200 * 1024 * 1024
    # VmHWM is the peak RSS of this address space (ru_maxrss would carry over pytest's peak through exec)
    script = (
        "import sys\n"
        "from sftlab.data.readers import read_rows\n"
        "count = sum(1 for _ in read_rows(sys.argv[1]))\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(count, int(hwm.split()[1]) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True).stdout
    count, peak_mb = map(int, out.split())
    assert count > 100_000
    assert peak_mb < 120, f"reading a 200 MB file peaked at {peak_mb} MB"
