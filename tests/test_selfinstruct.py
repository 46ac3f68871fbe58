"""Self-Instruct: prompts, parsing, filters, seed validation, and the resumable pipeline.

The pipeline tests drive it with a scripted backend: a deterministic class with the backend
interface whose answers depend only on each request (its prompt and seed). End-to-end runs
over real HTTP and with a real local model are in test_selfinstruct_e2e.py.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest

from sftlab.selfinstruct import filters as F
from sftlab.selfinstruct import prompts as P
from sftlab.selfinstruct.backends import Completion, Request
from sftlab.selfinstruct.parsing import (parse_alpaca, parse_classification, parse_input_first, parse_numbered_list,
                                         parse_output_first)
from sftlab.selfinstruct.pipeline import Settings, read_log, run_self_instruct
from sftlab.selfinstruct.seeds import Instance, SeedTask, SeedTaskError, SelfInstructError, load_seed_tasks

SEEDS = [SeedTask(f"t{i}", f"task{i}", f"Seed instruction number {i}:",
                  (Instance("" if i % 2 else f"input {i}", f"output {i}"),), i % 3 == 0) for i in range(1, 11)]


# ---------------------------------------------------------------------------------------------
# seed tasks


def test_builtin_seed_tasks_are_valid_diverse_and_about_a_quarter_classification():
    tasks = load_seed_tasks()
    assert len(tasks) >= 100
    share = sum(t.is_classification for t in tasks) / len(tasks)
    assert 0.2 <= share <= 0.3
    assert len({t.instruction for t in tasks}) == len(tasks)
    assert len({t.instruction.split()[0] for t in tasks}) >= 50  # many different opening verbs
    for task in tasks:  # the seeds pass the filters the generated instructions must pass
        assert F.instruction_reason(task.instruction) == (None, None) or len(task.instruction.split()) <= 3, task


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "x"}]}',
     "line 2?: field 'is_classification': missing"),
    ('{"id": "a", "name": "n", "instruction": 5, "instances": [], "is_classification": false}',
     "field 'instruction': expected a string, got int"),
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [], "is_classification": false}',
     "field 'instances': empty"),
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [{"input": ""}], "is_classification": false}',
     "field 'instances[0].output': missing"),
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [{"input": 1, "output": "x"}], '
     '"is_classification": false}', "field 'instances[0].input': expected a string, got int"),
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "x"}], '
     '"is_classification": "no"}', "field 'is_classification': expected true or false, got str"),
    ('{"id": "a", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "x"}], '
     '"is_classification": false', "invalid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"id": "t1", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "x"}], '
     '"is_classification": false}', "field 'id': duplicate id 't1' (first on line 1)"),
])
def test_seed_file_errors_name_the_line_and_field(tmp_path, line, message):
    good = json.dumps({"id": "t1", "name": "n", "instruction": "Do it.", "instances": [{"input": "", "output": "x"}],
                       "is_classification": False})
    path = tmp_path / "seeds.jsonl"
    path.write_text(good + "\n\n" + line + "\n")  # the bad row is on line 3
    with pytest.raises(SeedTaskError) as err:
        load_seed_tasks(path)
    text = str(err.value)
    assert f"{path}:3:" in text
    assert message.replace("line 2?: ", "") in text


def test_seed_file_minimum_and_missing_file(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "name": "n", "instruction": "Do it now please.",
                                        "instances": [{"input": "", "output": "x"}], "is_classification": False}) + "\n"
                            for i in range(3)))
    assert len(load_seed_tasks(path, minimum=3)) == 3
    with pytest.raises(SeedTaskError, match="3 seed task\\(s\\); this mode needs at least 8"):
        load_seed_tasks(path, minimum=8)
    with pytest.raises(SeedTaskError, match="no such seed-task file"):
        load_seed_tasks(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# prompts


def test_self_instruct_prompt_exact_text_for_a_fixed_seed():
    seed_instructions = [t.instruction for t in SEEDS]
    chosen = P.sample_self_instruct(random.Random(0), seed_instructions, ["Machine one.", "Machine two.", "Machine three."])
    assert P.self_instruct_prompt(chosen) == (
        "Come up with a series of tasks:\n"
        "1. Seed instruction number 1\n"
        "2. Machine two.\n"
        "3. Seed instruction number 5\n"
        "4. Seed instruction number 7\n"
        "5. Seed instruction number 3\n"
        "6. Machine three.\n"
        "7. Seed instruction number 8\n"
        "8. Seed instruction number 4\n"
        "9.")
    # while the machine pool is short, seeds fill the 8 places; whitespace is normalised
    chosen = P.sample_self_instruct(random.Random(0), seed_instructions, ["Machine  one\n  instruction."])
    assert len(chosen) == 8 and sum(c.startswith("Machine") for c in chosen) == 1
    assert "\n2. Machine one instruction.\n" in P.self_instruct_prompt(chosen)
    assert P.self_instruct_stop(8) == ["\n\n", "\n16", "16.", "16 ."]


def test_alpaca_prompt_exact_text_for_a_fixed_seed():
    prompt = P.alpaca_prompt(P.sample_alpaca(random.Random(0), SEEDS))
    assert prompt.startswith("Write a set of 20 varied tasks")
    assert prompt.endswith(
        "List of 20 tasks:\n"
        "###\n1. Instruction: Seed instruction number 7\n1. Input:\n<noinput>\n1. Output:\noutput 7\n"
        "###\n2. Instruction: Seed instruction number 10\n2. Input:\ninput 10\n2. Output:\noutput 10\n"
        "###\n3. Instruction: Seed instruction number 1\n3. Input:\n<noinput>\n3. Output:\noutput 1\n"
        "###\n4. Instruction:")


def test_classification_and_instance_prompts_exact_text():
    assert P.classification_prompt("Is this spam?", P.classification_demos(SEEDS, 0, per_label=2)) == (
        "Decide whether each task is a classification task: a task whose answer is one label from a small, fixed "
        "set of possible labels.\n\n"
        "Task: Seed instruction number 5\nIs it classification? No\n\n"
        "Task: Seed instruction number 9\nIs it classification? Yes\n\n"
        "Task: Seed instruction number 7\nIs it classification? No\n\n"
        "Task: Seed instruction number 6\nIs it classification? Yes\n\n"
        "Task: Is this spam?\nIs it classification?")
    output_first = P.instance_prompt("Label it.", True, P.instance_demos(SEEDS, 0, True, count=2))
    assert output_first.endswith(
        "cover different labels. When a task needs no input, write only the label.\n\n"
        "Task: Seed instruction number 9\nClass label: output 9\n\n"
        "Task: Seed instruction number 6\nClass label: output 6\nInput: input 6\n\n"
        "Task: Label it.\n")
    input_first = P.instance_prompt("Write it.", False, P.instance_demos(SEEDS, 0, False, count=2))
    assert input_first.endswith(
        "When a task needs no input, write the output directly.\n\n"
        "Task: Seed instruction number 2\nExample 1\nInput: input 2\nOutput: output 2\n\n"
        "Task: Seed instruction number 8\nExample 1\nInput: input 8\nOutput: output 8\n\n"
        "Task: Write it.\n")


# ---------------------------------------------------------------------------------------------
# parsing


def test_numbered_list_continuation():
    text = " Name three rivers in Africa.\n10. Write a limerick   about a cat.\n11 . Explain why ice floats.\n\n"
    items = parse_numbered_list(text, 9, "stop")
    assert [i.instruction for i in items] == ["Name three rivers in Africa.", "Write a limerick about a cat.",
                                              "Explain why ice floats."]
    assert not any(i.cut_off for i in items)


def test_numbered_list_cut_off_last_item_and_decimals_inside_items():
    text = " Convert 3.5 kilometres to miles.\n10. Summarize the plot of a famous\n11. Give the"
    items = parse_numbered_list(text, 9, "length")
    assert [i.instruction for i in items] == ["Convert 3.5 kilometres to miles.", "Summarize the plot of a famous",
                                              "Give the"]
    assert [i.cut_off for i in items] == [False, False, True]


def test_numbered_list_from_a_chat_reply_restating_the_number():
    reply = "Sure! Here are more tasks:\n9. Name a planet with rings.\n10. Rewrite the sentence in French."
    assert [i.instruction for i in parse_numbered_list(reply, 9, "stop")] == [
        "Name a planet with rings.", "Rewrite the sentence in French."]
    assert [i.instruction for i in parse_numbered_list("9. Only one task here.", 9, "stop")] == ["Only one task here."]
    assert parse_numbered_list("", 9, "stop") == [] and parse_numbered_list("\n\n", 9, "length") == []


def test_alpaca_blocks():
    text = (" Name the largest ocean.\n4. Input:\n<noinput>\n4. Output:\nThe Pacific Ocean.\n###\n"
            "5. Instruction: Sort the words alphabetically.\n5. Input:\npear, apple, fig\n5. Output:\napple, fig, pear\n###\n"
            "6. Instruction: A block with no output\n6. Input:\nx\n###\n"
            "7. Instruction: Translate to Spanish.\n7. Input:\nGood night\n7. Output:\nBuenas")
    items = parse_alpaca(text, 4, "length")
    assert [(i.instruction, i.input, i.output) for i in items[:2]] == [
        ("Name the largest ocean.", "", "The Pacific Ocean."), ("Sort the words alphabetically.", "pear, apple, fig",
                                                                "apple, fig, pear")]
    assert items[2].malformed and items[2].instruction == "A block with no output"
    assert items[3].cut_off and not items[0].cut_off
    # a chat reply that starts the block itself
    assert parse_alpaca("###\n4. Instruction: Say hi.\n4. Input:\n<noinput>\n4. Output:\nHi!", 4, "stop")[0].output == "Hi!"


def test_classification_answers():
    assert parse_classification(" Yes") is True and parse_classification("yes, it is") is True
    assert parse_classification(" No") is False and parse_classification("Maybe") is None


def test_instance_parsing_input_first_and_output_first():
    text = ("Example 1\nInput: 2, 9, 4\nOutput: 2, 4, 9\nExample 2\nInput: 7, 1\nOutput: 1, 7\nInput: 5, 3\n"
            "Example 3\nOutput: 3, 5, 8")
    items = parse_input_first(text, "stop")
    assert [(i.input, i.output) for i in items] == [("2, 9, 4", "2, 4, 9"), ("7, 1", "1, 7"), ("", "3, 5, 8")]
    assert [(i.input, i.output) for i in parse_input_first("Just the answer.", "stop")] == [("", "Just the answer.")]
    assert parse_input_first("Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOut", "length")[-1].cut_off
    clf = "Class label: Positive\nInput: I loved it.\nClass label: Negative\nInput: Never again.\nClass label: Neu"
    items = parse_output_first(clf, "length")
    assert [(i.input, i.output) for i in items] == [("I loved it.", "Positive"), ("Never again.", "Negative"), ("", "Neu")]
    assert [i.cut_off for i in items] == [False, False, True]
    assert parse_output_first("no labels at all", "stop")[0].malformed


# ---------------------------------------------------------------------------------------------
# filters: one passing and one failing case each


@pytest.mark.parametrize("text,reason", [
    ("Name three rivers in Africa.", None),
    ("Name three rivers.", F.TOO_SHORT),
    ("Describe " + "a very long thing " * 40, F.TOO_LONG),
    ("List " + "word " * 149, None),  # exactly 150 words passes
    ("Describe the image below in detail.", F.BLACKLISTED),
    ("Plot the data as a line chart.", F.BLACKLISTED),
    ("Go to the website and sign up.", F.BLACKLISTED),
    ("Compose some Music for a wedding party.", F.BLACKLISTED),
    ("Explain the mapping between keys and values.", None),  # whole words only: "mapping" is not "map"
    ("Describe a graphical user interface for a clock.", None),
    ("Write a program that prints the primes below 100.", F.WRITE_A_PROGRAM),
    ("Write a poem that mentions the primes below 100.", None),
    ('"Quote" this sentence back to me please.', F.STARTS_WITH_PUNCTUATION),
    ("¿Cuál es la capital de Francia? Answer in English.", F.STARTS_WITH_NON_ASCII),
    ("Éxplain the rules of chess to a beginner.", F.STARTS_WITH_NON_ASCII),
])
def test_instruction_filters(text, reason):
    assert F.instruction_reason(text)[0] == reason


def test_blacklist_is_the_papers_plus_alpacas():
    assert set(F.BLACKLIST) == {"image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
                                "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"}
    assert F.blacklisted_word("Draw a FLOWCHART of the process") == "draw"
    assert F.blacklisted_word("Describe a drawing") is None


@pytest.mark.parametrize("input_text,output,reason", [
    ("2, 9, 4", "2, 4, 9", None),
    ("2, 9, 4", "   ", F.EMPTY_OUTPUT),
    ("same", "same", F.INPUT_EQUALS_OUTPUT),
    ("Sentence:", "Positive", F.ENDS_WITH_COLON),
    ("I loved it.", "The answer is:", F.ENDS_WITH_COLON),
    ("", "An answer without input.", None),
])
def test_single_instance_filters(input_text, output, reason):
    assert F.instance_reason(input_text, output) == reason


def _items(pairs):
    from sftlab.selfinstruct.parsing import Item

    return [Item(input=i, output=o) for i, o in pairs]


def test_task_level_instance_filters():
    # conflicting outputs for one input: the whole task goes, as in the paper
    reasons = F.filter_instances(_items([("a", "1"), ("b", "2"), ("a", "3"), ("c", "")]))
    assert reasons == [F.CONFLICTING_OUTPUTS, F.CONFLICTING_OUTPUTS, F.CONFLICTING_OUTPUTS, F.EMPTY_OUTPUT]
    # the same input with the same output is a duplicate, not a conflict; at most 5 kept
    pairs = [("a", "1"), ("a", "1")] + [(f"x{i}", f"y{i}") for i in range(6)]
    reasons = F.filter_instances(_items(pairs))
    assert reasons == [None, F.DUPLICATE_INSTANCE, None, None, None, None, F.OVER_INSTANCE_LIMIT,
                       F.OVER_INSTANCE_LIMIT]
    # empty inputs never conflict (tasks without input have many outputs)
    assert F.filter_instances(_items([("", "one"), ("", "two")])) == [None, None]


# ---------------------------------------------------------------------------------------------
# the pipeline, with a scripted backend

VERBS = "Summarize Explain Classify Translate Rewrite List Compare Describe Suggest Identify Generate Outline".split()
NOUNS = "poem recipe email essay argument story headline riddle budget schedule letter review joke plan".split()
TOPICS = "gardening taxes volcanoes chess friendship rainfall bicycles jazz robots oceans pottery deserts".split()
ODD = ["Draw a picture of a cat.", "Write a program to sort numbers quickly.", "Hi there.", "- Bullet point task here.",
       "Ünïcode first letter task here."]


class Scripted:
    """Deterministic answers from each request's prompt and seed; KeyboardInterrupt after `interrupt_after` calls."""

    def __init__(self, interrupt_after: int | None = None):
        self.calls, self.interrupt_after = 0, interrupt_after
        self.requests: list[Request] = []

    def describe(self) -> str:
        return "scripted"

    def complete(self, requests):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        self.requests += requests
        return [self.answer(r) for r in requests]

    def answer(self, r: Request) -> Completion:
        rng = random.Random(f"{r.seed}:{zlib.crc32(r.prompt.encode())}")  # the whole request decides the answer
        if rng.random() < 0.05:
            return Completion("", None, error="503 overloaded")
        if r.prompt.endswith(P.CLASSIFICATION_QUESTION):
            return Completion(rng.choice([" Yes", " No", " Perhaps"]), "stop")
        if r.prompt.startswith(P.OUTPUT_FIRST_HEADER):
            labels = rng.sample(["Positive", "Negative", "Neutral"], rng.randint(1, 3))
            return Completion("".join(f"Class label: {lb}\nInput: text {rng.randint(0, 3)}\n" for lb in labels), "stop")
        if r.prompt.startswith(P.INPUT_FIRST_HEADER):
            pairs: list[tuple[str, str]] = []
            for k in range(rng.randint(1, 8)):
                roll = rng.random()
                if pairs and roll < 0.05:
                    pairs.append((pairs[0][0], pairs[0][1] + " or not"))  # contradicts an earlier example
                elif pairs and roll < 0.25:
                    pairs.append(pairs[-1])  # repeats one
                else:
                    pairs.append((f"in {k}", f"out {k}"))
            return Completion("".join(f"Example {k}\nInput: {i}\nOutput: {o}\n" for k, (i, o) in enumerate(pairs, 1)),
                              rng.choice(["stop", "stop", "length"]))
        if r.prompt.startswith("Write a set of"):
            blocks = [f"{rng.choice(VERBS)} a {rng.choice(NOUNS)} about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."
                      for _ in range(5)]
            text = "".join(f"{'' if k == 0 else f'###{chr(10)}{4 + k}. Instruction:'} {b}\n{4 + k}. Input:\n"
                           f"{rng.choice(['<noinput>', 'some input'])}\n{4 + k}. Output:\n{rng.choice(['An answer.', ''])}\n"
                           for k, b in enumerate(blocks))
            return Completion(text, rng.choice(["stop", "length"]))
        first = int(r.prompt.rsplit("\n", 1)[1].rstrip("."))
        items = [rng.choice(ODD) if rng.random() < 0.25 else
                 f"{rng.choice(VERBS)} a {rng.choice(NOUNS)} about {rng.choice(TOPICS)} for {rng.choice(TOPICS)} fans."
                 for _ in range(rng.randint(2, 7))]
        text = " " + items[0] + "".join(f"\n{first + k}. {item}" for k, item in enumerate(items[1:], 1))
        return Completion(text, rng.choice(["stop", "stop", "length"]))


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stable(records: list[dict]) -> list[dict]:
    """Records without wall-clock fields, for comparing runs."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("time", "started")}
        out.append(r)
    return out


def _check_accounting(output: Path, log: Path, result) -> None:
    records = _log(log)
    rows = json.loads(output.read_text())
    instructions = [r for r in records if r["type"] == "instruction"]
    instances = [r for r in records if r["type"] == "instance"]
    assert all(r["fate"] in ("kept", "dropped") for r in instructions + instances)
    assert all((r["fate"] == "kept") == (r["reason"] is None) for r in instructions + instances)
    counts = result.summary
    assert counts["instructions"]["candidates"] == len(instructions)
    assert counts["instructions"]["kept"] + counts["instructions"]["dropped"] == len(instructions)
    assert sum(counts["instructions"]["dropped_by_reason"].values()) == counts["instructions"]["dropped"]
    assert counts["instances"]["candidates"] == len(instances)
    assert sum(counts["instances"]["dropped_by_reason"].values()) == counts["instances"]["dropped"]
    kept = [r["instruction"] for r in instructions if r["fate"] == "kept"]
    assert len(kept) == len(set(kept)) == counts["instructions"]["kept"]  # no duplicate instruction
    assert counts["rows"] == len(rows)
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert len({json.dumps(row, sort_keys=True) for row in rows}) == len(rows)  # no duplicate row
    # every similarity drop names the pool instruction it resembles, above the threshold
    for r in instructions:
        if r["reason"] == F.SIMILAR:
            assert r["rouge_l"] > 0.7 and r["most_similar"]
        if r["fate"] == "kept":
            assert r["rouge_l"] <= 0.7
    # the log's request counts match the round records
    assert counts["rounds"] == max(r["round"] for r in records if r["type"] == "round_end")


def test_pipeline_counts_add_up_and_every_filter_fires(tmp_path):
    backend = Scripted()
    result = run_self_instruct(backend, tmp_path / "gen.json", Settings(num=60, seed=3), seed_tasks=None)
    assert result.stopped == "done"
    _check_accounting(tmp_path / "gen.json", tmp_path / "gen.log.jsonl", result)
    summary = result.summary
    assert summary["instructions"]["kept"] == 60
    reasons = summary["instructions"]["dropped_by_reason"]
    for reason in (F.CUT_OFF, F.TOO_SHORT, F.BLACKLISTED, F.WRITE_A_PROGRAM, F.STARTS_WITH_PUNCTUATION,
                   F.STARTS_WITH_NON_ASCII, F.SIMILAR):
        assert reasons.get(reason, 0) > 0, reason
    assert set(summary["classification"]) >= {"yes", "no", "unparsed"}
    assert sum(summary["classification"].values()) == 60
    inst = summary["instances"]["dropped_by_reason"]
    for reason in (F.CONFLICTING_OUTPUTS, F.DUPLICATE_INSTANCE, F.OVER_INSTANCE_LIMIT, F.CUT_OFF):
        assert inst.get(reason, 0) > 0, reason
    assert summary["failed_requests"]["instructions"] > 0  # 503s are logged and the run went on
    records = _log(tmp_path / "gen.log.jsonl")
    assert any(r["type"] == "request_error" and r["error"] == "503 overloaded" for r in records)
    # classification tasks got output-first prompts, the others input-first
    clf = {r["instruction"]: r["is_classification"] for r in records if r["type"] == "instruction" and r["fate"] == "kept"}
    for request in backend.requests:
        if request.prompt.startswith((P.OUTPUT_FIRST_HEADER, P.INPUT_FIRST_HEADER)):
            instruction = request.prompt.rsplit("Task: ", 1)[1].strip()
            assert clf[instruction] == request.prompt.startswith(P.OUTPUT_FIRST_HEADER)
    # the paper's sampling settings on instruction generation
    generation = [r for r in backend.requests if r.prompt.startswith(P.SELF_INSTRUCT_HEADER)]
    assert {(r.temperature, r.top_p, r.presence_penalty, r.max_tokens) for r in generation} == {(0.7, 0.5, 2.0, 1024)}
    # the machine pool feeds later prompts: 2 machine-generated instructions once there are some
    kept_text = set(clf)
    late = generation[-1].prompt.splitlines()[1:-1]
    assert sum(line.split(". ", 1)[1] in kept_text for line in late) == 2


def test_alpaca_mode(tmp_path):
    backend = Scripted()
    result = run_self_instruct(backend, tmp_path / "a.json", Settings(mode="alpaca", num=25, seed=1))
    _check_accounting(tmp_path / "a.json", tmp_path / "a.log.jsonl", result)
    rows = json.loads((tmp_path / "a.json").read_text())
    assert len(rows) == result.summary["instructions"]["kept"] == 25
    assert all(row["output"] == "An answer." for row in rows) and {row["input"] for row in rows} == {"", "some input"}
    assert result.summary["instructions"]["dropped_by_reason"][F.EMPTY_OUTPUT] > 0
    assert all(r.prompt.count("Instruction:") == 4 for r in backend.requests)  # 3 examples + the open 4th
    assert result.summary["requests"] == {"instructions": result.summary["rounds"] * 5}  # no extra stages


def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path):
    settings = Settings(num=30, seed=7, prompts_per_round=3)
    full = run_self_instruct(Scripted(), tmp_path / "full.json", settings)
    reference_rows = json.loads((tmp_path / "full.json").read_text())
    reference_log = _stable(_log(tmp_path / "full.log.jsonl")[1:])
    calls = Scripted()
    run_self_instruct(calls, tmp_path / "count.json", settings)
    assert calls.calls >= 6 and full.summary["rounds"] >= 2

    for k in range(1, calls.calls):  # interrupt at every backend call in turn
        out = tmp_path / f"run{k}.json"
        with pytest.raises(KeyboardInterrupt):
            run_self_instruct(Scripted(interrupt_after=k), out, settings)
        partial = json.loads(out.read_text())  # valid JSON: the committed rounds only
        assert partial == reference_rows[:len(partial)]
        resumed = run_self_instruct(Scripted(), out, settings)
        assert json.loads(out.read_text()) == reference_rows  # nothing lost, nothing twice
        assert _stable(_log(tmp_path / f"run{k}.log.jsonl")[1:]) == reference_log
        assert resumed.summary["instructions"] == full.summary["instructions"]
        _check_accounting(out, tmp_path / f"run{k}.log.jsonl", resumed)


def test_resume_discards_a_half_written_round(tmp_path):
    settings = Settings(num=12, seed=2, max_rounds=1)
    first = run_self_instruct(Scripted(), tmp_path / "g.json", settings)
    log = tmp_path / "g.log.jsonl"
    committed = log.read_text()
    with open(log, "a") as f:  # a killed writer: records of round 2 without its round_end, and a cut line
        f.write(json.dumps({"type": "instruction", "round": 2, "instruction": "Ghost", "fate": "kept",
                            "reason": None}) + "\n" + '{"type": "instruction", "rou')
    state, discarded = read_log(log, json.loads(committed.splitlines()[0]))
    assert discarded == 2 and "Ghost" not in state.machine
    assert log.read_text() == committed  # cut back to the last committed round
    again = run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=12, seed=2, max_rounds=2))
    assert again.resumed_rounds == 1 and again.summary["rounds"] == 2
    assert again.summary["instructions"]["candidates"] > first.summary["instructions"]["candidates"]
    _check_accounting(tmp_path / "g.json", log, again)


def test_refuses_to_mix_runs_or_clobber_files(tmp_path):
    run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=5, seed=0))
    with pytest.raises(SelfInstructError, match="written with mode 'self-instruct'"):
        run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=5, mode="alpaca"))
    with pytest.raises(SelfInstructError, match="written with seed_tasks"):
        run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=5), seed_tasks=SEEDS)
    other = tmp_path / "mine.json"
    other.write_text("[]")
    with pytest.raises(SelfInstructError, match="exists but has no log"):
        run_self_instruct(Scripted(), other, Settings(num=5))
    result = run_self_instruct(Scripted(), other, Settings(num=5), overwrite=True)
    assert result.summary["instructions"]["kept"] == 5
    # a finished run asked for more continues; asked for the same, it does nothing
    more = run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=9, seed=0))
    assert more.summary["instructions"]["kept"] == 9 and more.resumed_rounds >= 1
    backend = Scripted()
    run_self_instruct(backend, tmp_path / "g.json", Settings(num=9, seed=0))
    assert backend.calls == 0


def test_a_backend_that_always_fails_stops_the_run_keeping_progress(tmp_path):
    class Down:
        def describe(self):
            return "down"

        def complete(self, requests):
            return [Completion("", None, error="APIConnectionError: Connection error.") for _ in requests]

    with pytest.raises(SelfInstructError, match="every request failed in 3 rounds in a row"):
        run_self_instruct(Down(), tmp_path / "g.json", Settings(num=5))
    records = _log(tmp_path / "g.log.jsonl")
    assert sum(r["type"] == "round_end" for r in records) == 3
    assert json.loads((tmp_path / "g.json").read_text()) == []
    # and the same command continues once the server is back
    result = run_self_instruct(Scripted(), tmp_path / "g.json", Settings(num=5))
    assert result.resumed_rounds == 3 and result.summary["instructions"]["kept"] == 5


def test_patience_and_max_rounds_stop_a_run_that_keeps_nothing(tmp_path):
    class Garbage:
        def describe(self):
            return "garbage"

        def complete(self, requests):
            return [Completion(" zzz", "length") for _ in requests]

    result = run_self_instruct(Garbage(), tmp_path / "g.json", Settings(num=5, patience=4))
    assert result.stopped == "patience" and result.summary["rounds"] == 4
    assert result.summary["instructions"]["dropped_by_reason"] == {F.CUT_OFF: 20}
    result = run_self_instruct(Garbage(), tmp_path / "h.json", Settings(num=5, max_rounds=2))
    assert result.stopped == "max_rounds" and result.summary["rounds"] == 2


def test_cli_errors_are_one_red_line(tmp_path):
    from typer.testing import CliRunner

    from sftlab.cli import app

    runner = CliRunner()
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"id": "a"}\n')
    result = runner.invoke(app, ["self-instruct", "--local", "x", "--seed-tasks", str(bad), "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "error:" in out and "Traceback" not in out
    result = runner.invoke(app, ["self-instruct", "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 1 and "give exactly one backend" in result.output
    result = runner.invoke(app, ["self-instruct", "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--mode", "x",
                                 "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 1 and "--mode x" in result.output
