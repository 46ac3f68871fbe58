"""`sftlab filter`: which rows survive each rule, the removal log, output file types, and the CLI.

The fixture rows and why each is kept or removed: tests/fixtures/quality/README.md.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.data.readers import DataError, read_rows
from sftlab.quality.filtering import FilterRules, filter_rows, load_rules

FIXTURES = Path(__file__).parent / "fixtures" / "quality"
ROWS = FIXTURES / "rows.jsonl"
EVAL = FIXTURES / "eval_items.jsonl"
DOLLY = FIXTURES / "dolly.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _raw(path: Path) -> list:
    return [r.data for r in read_rows(path)]


def test_filter_keeps_exactly_the_expected_rows_and_logs_each_removal(tmp_path):
    rules = FilterRules(dedup=["exact", "near"], drop_contaminated=True, against=[str(EVAL)], builtin_suite=False,
                        min_response_words=2, blacklist=["picture"])
    summary = filter_rows([ROWS], tmp_path / "clean.jsonl", rules)
    originals = _lines(ROWS)
    assert _lines(tmp_path / "clean.jsonl") == [originals[i] for i in (0, 2, 4, 5, 6, 8, 9)]
    log = _lines(tmp_path / "clean.removed.jsonl")
    by_line = {int(x["source"].rsplit(":", 1)[1]) - 1: x for x in log}
    assert {i: x["rule"] for i, x in by_line.items()} == {
        1: "exact_duplicate", 3: "near_duplicate", 7: "contaminated", 10: "length", 11: "blacklist", 12: "malformed"}
    assert by_line[1]["evidence"]["kept"] == f"{ROWS}:1"
    near = by_line[3]["evidence"]
    assert near["kept"] == near["matched"] == f"{ROWS}:3" and near["jaccard"] == round(45 / 53, 4)
    assert by_line[7]["evidence"]["item"] == f"{EVAL}:1 id=story-1" and by_line[7]["evidence"]["ngram"].startswith("a lighthouse")
    assert by_line[10]["evidence"] == {"field": "response", "words": 1, "min": 2}
    assert by_line[11]["evidence"] == {"word": "picture", "field": "instruction"}
    assert by_line[12]["evidence"]["reason"] == "empty_response"
    assert all(x["row"] == originals[i] for i, x in by_line.items())  # the original object, for review
    assert summary["kept"] == 7 and summary["removed"] == 6 and summary["rows_read"] == 13
    assert json.loads((tmp_path / "clean.summary.json").read_text())["removed_by_rule"]["near_duplicate"] == 1


def test_instruction_dedup_keeps_the_first_of_each_rouge_cluster(tmp_path):
    summary = filter_rows([ROWS], tmp_path / "clean.jsonl", FilterRules(dedup=["instruction"]))
    log = _lines(tmp_path / "clean.removed.jsonl")
    removed = sorted(int(x["source"].rsplit(":", 1)[1]) - 1 for x in log if x["rule"] == "similar_instruction")
    assert removed == [1, 3, 4, 6]
    evidence = next(x["evidence"] for x in log if x["source"].endswith(":5"))
    assert evidence["kept"] == evidence["matched"] == f"{ROWS}:3" and evidence["rouge_l"] == 1.0
    assert summary["kept"] == 8  # 13 - 4 similar - 1 malformed


def test_category_cap_is_a_seeded_sample_per_value(tmp_path):
    def kept(seed, name):
        filter_rows([DOLLY], tmp_path / name, FilterRules(cap={"category": 2}, seed=seed))
        return [r["instruction"] for r in _lines(tmp_path / name)]

    first, again = kept(0, "a.jsonl"), kept(0, "b.jsonl")
    assert first == again  # deterministic under a seed
    rows = _lines(DOLLY)
    assert len(first) == 4 and sum(r["category"] == "open_qa" and r["instruction"] in first for r in rows) == 2
    assert all(r["instruction"] in first for r in rows if r["category"] == "brainstorming")  # 2 <= cap: untouched
    assert first == [r["instruction"] for r in rows if r["instruction"] in first]  # file order kept
    log = _lines(tmp_path / "a.removed.jsonl")
    assert [x["rule"] for x in log] == ["category_cap"] * 2
    assert log[0]["evidence"] == {"key": "category", "value": "open_qa", "cap": 2, "group_size": 4, "seed": 0}
    assert len({tuple(kept(s, f"s{s}.jsonl")) for s in range(6)}) > 1  # the seed matters


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".jsonl.gz", ".json.zst"])
def test_output_keeps_the_input_file_type(tmp_path, suffix):
    from sftlab.quality.filtering import write_rows
    from sftlab.data.readers import file_kind

    rows = [r for r in _lines(ROWS) if r["output"]]  # readable rows only
    source = write_rows(tmp_path / f"in{suffix}", rows, *file_kind(f"in{suffix}"), columns=list(rows[0]))
    out = tmp_path / "out" / f"clean{suffix}"
    filter_rows([source], out, FilterRules(dedup=["exact"]))
    expected = [r for i, r in enumerate(rows) if i != 1]
    assert _raw(out) == expected  # the original objects, same order
    if suffix.endswith(".gz"):
        assert gzip.open(out).read(1) == b"{"
    if suffix == ".json":
        assert isinstance(json.loads(out.read_text()), list)


def test_output_naming_and_errors(tmp_path):
    with pytest.raises(DataError, match=r"keeps the input's file type; name it \*\.jsonl"):
        filter_rows([ROWS], tmp_path / "clean.json", FilterRules())
    with pytest.raises(DataError, match="would overwrite the input"):
        filter_rows([ROWS], ROWS, FilterRules())
    # several inputs: one file per input in the folder, named like the input
    summary = filter_rows([ROWS, DOLLY], tmp_path / "out", FilterRules(dedup=["exact"]))
    assert [Path(x["output"]).name for x in summary["inputs"]] == ["rows.jsonl", "dolly.jsonl"]
    assert (tmp_path / "out" / "removed.jsonl").is_file() and (tmp_path / "out" / "summary.json").is_file()
    assert [x["kept"] for x in summary["inputs"]] == [11, 6]
    # two inputs with the same name: prefixed with their position
    (tmp_path / "other").mkdir()
    copy = tmp_path / "other" / "rows.jsonl"
    copy.write_text(ROWS.read_text())
    summary = filter_rows([ROWS, copy], tmp_path / "out2", FilterRules())
    assert [Path(x["output"]).name for x in summary["inputs"]] == ["0-rows.jsonl", "1-rows.jsonl"]


def test_python_api_is_exported_from_the_package():
    import sftlab.quality as quality
    from sftlab.quality.analysis import analyze

    assert quality.analyze is analyze and quality.filter_rows is filter_rows and quality.FilterRules is FilterRules


def test_rules_file_and_overrides(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("dedup: [exact, near]\nmin_response_words: 3\ncap: {category: 1}\nblacklist: picture, draw\n")
    rules = load_rules(path, min_response_words=5)
    assert rules.dedup == ["exact", "near"] and rules.min_response_words == 5 and rules.cap == {"category": 1}
    assert rules.blacklist == ["picture", "draw"]
    path.write_text("dedupe: [exact]\n")
    with pytest.raises(DataError, match="unknown rule"):
        load_rules(path)
    with pytest.raises(DataError, match="ifd_top needs ifd_model"):
        load_rules(None, ifd_top=0.1)


def test_ifd_top_keeps_the_highest_scores(tmp_path, tiny_model_dir):
    from sftlab.quality.ifd import compute_ifd
    from sftlab.quality.rows import load_dataset

    rows = load_dataset([DOLLY]).rows
    scores = compute_ifd([r.conversation for r in rows], str(tiny_model_dir))
    filter_rows([DOLLY], tmp_path / "top.jsonl", FilterRules(ifd_top=0.34, ifd_model=str(tiny_model_dir)))
    ranked = sorted((s.ifd, r.index) for r, s in zip(rows, scores) if s.ifd <= 1)
    expected = sorted(i for _, i in sorted(ranked, key=lambda x: (-x[0], x[1]))[:2])  # round(0.34 x 6) = 2
    assert 0 < len(expected) < len(ranked)  # the ranking decides something
    assert _lines(tmp_path / "top.jsonl") == [_lines(DOLLY)[i] for i in expected]
    log = _lines(tmp_path / "top.removed.jsonl")
    assert sorted(x["rule"] for x in log) == sorted(
        "ifd_above_1" if s.ifd > 1 else "ifd_below_top" for r, s in zip(rows, scores) if r.index not in expected)


# -- the CLI -----------------------------------------------------------------------------------

def _sftlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sftlab", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_quality_and_filter(tmp_path):
    report = tmp_path / "report" / "quality.html"
    proc = _sftlab("quality", ROWS, "--report", report, "--against", EVAL, "--no-builtin-suite", "--no-diversity")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "near duplicates" in proc.stdout and "contaminated rows" in proc.stdout
    result = json.loads(report.with_suffix(".json").read_text())
    assert result["exact_duplicates"]["clusters"] == 1 and result["contamination"]["rows"] == 1
    assert report.read_text().startswith("<!doctype html>")

    out = tmp_path / "clean.jsonl"
    proc = _sftlab("filter", ROWS, "-o", out, "--dedup", "exact,near", "--drop-contaminated", "--against", EVAL,
                   "--no-builtin-suite", "--min-response-words", "2", "--blacklist", "picture")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_lines(out)) == 7 and len(_lines(tmp_path / "clean.removed.jsonl")) == 6
    assert "exact_duplicate: 1" in proc.stdout

    proc = _sftlab("filter", ROWS, "-o", tmp_path / "x.jsonl", "--dedup", "fuzzy")
    assert proc.returncode == 1 and "error:" in proc.stdout and "unknown kind(s) fuzzy" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
