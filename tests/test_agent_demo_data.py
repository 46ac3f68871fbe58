"""The agent demo data (examples/data/agent_*.jsonl, built by make_agent_demo.py): the files are what
the builder makes, every row reads as agent data, and the held-out rows test what training never
showed: tools that never appear in training, or argument values that never do."""

import importlib.util
import json
from pathlib import Path

from sftlab.config import DataSource
from sftlab.data.prepare import load_conversations

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def _builder():
    spec = importlib.util.spec_from_file_location("make_agent_demo", DATA / "make_agent_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_files_are_what_the_builder_makes():
    for name, text in _builder().build().items():
        assert (DATA / name).read_text() == text, name


def test_every_row_reads_and_the_held_out_rows_end_with_the_scored_turn():
    train = load_conversations(DataSource(path=str(DATA / "agent_train.jsonl")), "raise")
    held = load_conversations(DataSource(path=str(DATA / "agent_eval.jsonl")), "raise")
    assert (train.rows_read, len(train.dropped)) == (336, 0) and (held.rows_read, len(held.dropped)) == (57, 0)
    assert all(c.messages[-1].role == "assistant" for c in held.conversations)
    calls = [c for c in held.conversations if c.messages[-1].tool_calls]
    assert len(calls) == 45 and len(held.conversations) - len(calls) == 12  # 12 rows need no call
    for c in calls:
        assert {t["function"]["name"] for t in c.tools} >= {call.name for call in c.messages[-1].tool_calls}


def test_held_out_calls_use_unseen_tools_or_unseen_argument_values():
    train = load_conversations(DataSource(path=str(DATA / "agent_train.jsonl")), "raise").conversations
    held = load_conversations(DataSource(path=str(DATA / "agent_eval.jsonl")), "raise").conversations
    seen_tools = {call.name for c in train for m in c.messages for call in m.tool_calls}
    seen_values = {json.dumps(v) for c in train for m in c.messages for call in m.tool_calls
                   for v in call.arguments.values()}
    unseen_tool = unseen_values = 0
    for c in held:
        for call in c.messages[-1].tool_calls:
            if call.name not in seen_tools:
                unseen_tool += 1
            else:
                assert any(json.dumps(v) not in seen_values for v in call.arguments.values()), call
                unseen_values += 1
    assert (unseen_tool, unseen_values) == (21, 24)
    assert seen_tools == {"get_weather", "convert_currency", "get_time", "search_flights", "calculate", "create_reminder",
                          "order_pizza", "get_news", "send_message", "convert_units", "get_population", "play_music"}
