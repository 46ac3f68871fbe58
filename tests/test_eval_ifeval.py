"""Verifiable instruction following: every checker on hand-written responses, strict and loose,
the scoring, and the seeded suite (the shipped JSONL is the generator's output)."""

import json

import pytest

from sftlab.eval.errors import EvalError
from sftlab.eval.ifeval import INSTRUCTIONS, check_instruction, conflicting, loose_variants, score
from sftlab.eval.suite import SUITE_PATH, generate_suite, load_suite, write_suite

# id -> (kwargs, a response that follows it, one that does not)
CASES = {
    "change_case:english_lowercase": ({}, "the sky is blue today.", "The sky is blue today."),
    "change_case:english_capital": ({}, "THE SKY IS BLUE, 100%.", "THE SKY IS Blue."),
    "change_case:capital_word_frequency": ({"relation": "at least", "n": 2}, "This is VERY IMPORTANT news.",
                                           "This is VERY important news."),
    "length_constraints:min_words": ({"n": 5}, "one two three four five", "one two three four"),
    "length_constraints:max_words": ({"n": 4}, "one two three four.", "one two three four five."),
    "length_constraints:number_sentences": ({"relation": "less than", "n": 3}, "It rains. It pours.",
                                            "It rains. It pours! Is it over?"),
    "length_constraints:number_paragraphs": ({"n": 2}, "First part.\n***\nSecond part.",
                                             "First part.\n***\nSecond part.\n***\nThird."),
    "detectable_format:number_bullet_lists": ({"n": 2}, "Points:\n* one\n* two", "Points:\n* one\n- two\n* three\nDone."),
    "detectable_format:numbered_list": ({"n": 3}, "1. a\n2. b\n3) c", "1. a\n2. b"),
    "detectable_format:json_format": ({}, '```json\n{"colour": "blue"}\n```', "colour: blue"),
    "detectable_format:title": ({}, "<<Autumn Song>>\nLeaves fall.", "Autumn Song\nLeaves fall."),
    "detectable_format:number_highlighted_sections": ({"n": 2}, "A *first* and **second** point.", "A *first* point."),
    "detectable_format:multiple_sections": ({"n": 2, "splitter": "SECTION"}, "SECTION 1\nIntro.\nSECTION 2\nMore.",
                                            "SECTION 1\nIntro.\nSECTION 3\nMore."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes, definitely."),
    "detectable_content:postscript": ({"marker": "P.S."}, "Hello there.\n\nP.S. See you soon.", "Hello there. See you soon."),
    "detectable_content:number_placeholders": ({"n": 2}, "Send it to [name] at [address].", "Send it to [name]."),
    "keywords:existence": ({"keywords": ["storm", "lamp"]}, "The Storm put out the lamp.", "The storm raged all night."),
    "keywords:forbidden_words": ({"forbidden_words": ["wheel", "gear"]}, "Pedals turn the chain.",
                                 "The Gear turns the back wheel."),
    "keywords:frequency": ({"keyword": "leaves", "relation": "at least", "n": 2}, "Leaves fall; leaves fly.",
                           "Leaves fall; the tree is bare."),
    "keywords:letter_frequency": ({"letter": "e", "relation": "less than", "n": 3}, "A dog ran.", "The tree was green."),
    "punctuation:no_comma": ({}, "Red and blue and green.", "Red, blue and green."),
    "startend:quotation": ({}, '"The whole answer."', 'The whole answer."'),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "Rain comes from clouds. Any other questions?",
                             "Any other questions? Rain comes from clouds."),
    "startend:first_word": ({"first_word": "Today"}, "**Today** we bake bread.", "We bake bread today."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Explain how rain forms."},
                                  "Explain how rain forms. Water vapour cools into droplets.",
                                  "Rain forms when water vapour cools. Explain how rain forms."),
    "combination:two_responses": ({}, "Blue is calm.\n******\nRed is loud.", "Blue is calm.\n******\nBlue is calm."),
}


def test_every_instruction_type_has_a_hand_written_case():
    assert len(INSTRUCTIONS) >= 20
    assert set(CASES) == set(INSTRUCTIONS)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_checker_accepts_the_passing_and_rejects_the_failing_response(instruction_id):
    kwargs, passing, failing = CASES[instruction_id]
    assert check_instruction(instruction_id, passing, kwargs) == {"strict": True, "loose": True}
    assert check_instruction(instruction_id, failing, kwargs) == {"strict": False, "loose": False}


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_an_empty_response_follows_nothing(instruction_id):
    kwargs = CASES[instruction_id][0]
    if instruction_id in ("length_constraints:number_sentences", "keywords:letter_frequency",
                          "change_case:capital_word_frequency"):
        kwargs = {**kwargs, "relation": "at least", "n": 1}
    assert check_instruction(instruction_id, "", kwargs) == {"strict": False, "loose": False}


# (id, kwargs, response, strict, loose): loose also tries first/last line removed and '*' removed
LOOSE_CASES = [
    ("change_case:english_lowercase", {}, "Sure! Here it is:\nthe sky is blue.", False, True),
    ("change_case:english_lowercase", {}, "The sky is blue.\nIt is Nice.", False, False),
    ("startend:quotation", {}, 'Here you go:\n"The whole answer."', False, True),
    ("startend:quotation", {}, '"The whole answer."\nHope this helps!', False, True),
    ("startend:end_checker", {"end_phrase": "That is all."}, "Rain falls. That is all.\n(Generated by a model)", False, True),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}\nanything else?', False, True),
    ("detectable_format:json_format", {}, 'Here it is.\nJSON:\n{"a": 1}\nanything else?', False, False),
    ("punctuation:no_comma", {}, "Sure, here goes:\nRed and blue.", False, True),
    ("startend:first_word", {"first_word": "Today"}, "Answer:\nToday we bake.", False, True),
    ("keywords:forbidden_words", {"forbidden_words": ["wheel"]}, "No wheel here\nReally not.", False, True),
    ("keywords:forbidden_words", {"forbidden_words": ["wheel"]}, "Well.\nNo wheel here\nReally not.", False, False),
    # markdown '*' removed: the bold markers no longer split the phrase
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Rain. **Any other questions?**", False, True),
    ("detectable_format:number_highlighted_sections", {"n": 1}, "A *key* point", True, True),
]


@pytest.mark.parametrize("instruction_id,kwargs,response,strict,loose", LOOSE_CASES)
def test_strict_and_loose(instruction_id, kwargs, response, strict, loose):
    assert check_instruction(instruction_id, response, kwargs) == {"strict": strict, "loose": loose}


def test_loose_variants_are_ifevals_eight():
    variants = loose_variants("first *a*\nmiddle\nlast")
    assert variants == ["first *a*\nmiddle\nlast", "middle\nlast", "first *a*\nmiddle", "middle",
                        "first a\nmiddle\nlast", "middle\nlast", "first a\nmiddle", "middle"]


def test_score_counts_prompts_and_instructions_strict_and_loose():
    rows = [
        {"id": "a", "prompt": "p", "instruction_ids": ["punctuation:no_comma", "change_case:english_lowercase"],
         "kwargs": [{}, {}]},
        {"id": "b", "prompt": "p", "instruction_ids": ["punctuation:no_comma"], "kwargs": [{}]},
        {"id": "c", "prompt": "p", "instruction_ids": ["startend:quotation"], "kwargs": [{}]},
    ]
    responses = ["all lowercase no commas", "Has, a comma", 'Intro line\n"quoted"']
    result = score(rows, responses)
    assert result["prompts"] == 3 and result["instructions"] == 4
    assert result["prompt_strict"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["prompt_loose"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["instruction_strict"] == pytest.approx(2 / 4)
    assert result["instruction_loose"] == pytest.approx(3 / 4)
    assert result["per_instruction"]["punctuation:no_comma"] == {"count": 2, "strict": 0.5, "loose": 0.5}
    assert result["per_instruction"]["startend:quotation"] == {"count": 1, "strict": 0.0, "loose": 1.0}
    assert result["checks"][0] == {"strict": [True, True], "loose": [True, True]}


def test_suite_generation_is_deterministic_under_a_seed():
    a, b, c = generate_suite(seed=7, n=220), generate_suite(seed=7, n=220), generate_suite(seed=8, n=220)
    assert a == b and a != c
    assert len(a) == 220 and len({r["id"] for r in a}) == 220


def test_shipped_suite_equals_the_generators_output(tmp_path):
    shipped = [json.loads(line) for line in SUITE_PATH.read_text().splitlines()]
    assert shipped == generate_suite()
    assert SUITE_PATH.read_text() == write_suite(tmp_path / "again.jsonl").read_text()


def test_suite_rows_are_valid_combinations_covering_every_type():
    rows = load_suite()
    assert len(rows) >= 200
    assert {i for r in rows for i in r["instruction_ids"]} == set(INSTRUCTIONS)
    for row in rows:
        assert set(row) >= {"id", "prompt", "instruction_ids", "kwargs"}
        assert len(row["instruction_ids"]) == len(row["kwargs"]) >= 1
        ids = row["instruction_ids"]
        assert not any(conflicting(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]), row["id"]
        assert row["prompt"].startswith(row["task"])
        for instruction_id, kwargs in zip(ids, row["kwargs"]):  # kwargs fit the checker
            check_instruction(instruction_id, "Some response text.", kwargs)
    # the default --limit of 60 prompts still covers every type
    assert {i for r in rows[:60] for i in r["instruction_ids"]} == set(INSTRUCTIONS)


def test_a_bad_suite_row_names_its_line(tmp_path):
    bad = tmp_path / "suite.jsonl"
    bad.write_text('{"id": "x", "prompt": "p", "instruction_ids": ["punctuation:no_comma"], "kwargs": [{}]}\n'
                   '{"id": "y", "prompt": "p", "instruction_ids": ["no_such:thing"], "kwargs": [{}]}\n')
    with pytest.raises(EvalError, match=r"suite.jsonl:2: unknown instruction id 'no_such:thing'"):
        load_suite(bad)
