"""The demo's instruction-following rows (examples/data/if_demo.json): every row satisfies its
constraints by the eval's own checkers, the file is what its builder makes, and nothing in it
overlaps the eval suite (no 13-gram, no shared task, no constraint sentence of the suite)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from sftlab.eval.ifeval import check_instruction
from sftlab.quality.contamination import build_index, eval_tokens, find_contamination

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "if_demo.json"
SUITE = ROOT / "src" / "sftlab" / "eval" / "data" / "ifeval_suite.jsonl"


def _rows() -> list[dict]:
    return json.loads(DATA.read_text())


def _suite() -> list[dict]:
    return [json.loads(line) for line in SUITE.read_text().splitlines()]


def test_every_row_satisfies_its_constraints_by_the_eval_checkers():
    rows = _rows()
    assert len(rows) >= 200
    kinds = {c["id"] for r in rows for c in r["constraints"]}
    assert len(kinds) >= 20
    for row in rows:
        for c in row["constraints"]:
            assert check_instruction(c["id"], row["output"], c["kwargs"])["strict"], (row, c)


def test_a_checker_rejects_a_broken_row():
    row = next(r for r in _rows() if r["constraints"][0]["id"] == "change_case:english_lowercase")
    assert not check_instruction("change_case:english_lowercase", row["output"].upper(), {})["strict"]


def test_the_file_is_what_the_builder_makes():
    spec = importlib.util.spec_from_file_location("make_if_demo", ROOT / "examples" / "data" / "make_if_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == _rows()


def test_no_overlap_with_the_eval_suite():
    rows = _rows()
    texts = [[r["instruction"], r["input"], r["output"]] for r in rows]
    assert find_contamination(texts, build_index()) == {}  # the 13-gram check of `sftlab quality --against`
    tasks = {eval_tokens(r["task"]) and " ".join(eval_tokens(r["task"])) for r in _suite()}
    assert not tasks & {" ".join(eval_tokens(r["instruction"].split("?")[0] + "?")) for r in rows}
    # the constraint wording is this file's own: no sentence of a suite prompt appears in a demo instruction
    suite_sentences = {s.strip() for r in _suite() for s in re.split(r"(?<=[.!?])\s+", r["prompt"])
                       if len(s.split()) >= 5}
    for row in rows:
        assert not [s for s in suite_sentences if s in row["instruction"]], row["instruction"]
