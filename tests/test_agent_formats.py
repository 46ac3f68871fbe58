"""Agent and reasoning rows -> Conversation: every field an OpenAI fine-tuning file or a
function-calling set carries is kept (tool calls, tool results, reasoning, weights, tools) or
refused with its location and a reason."""

import json

import pytest

from sftlab.data.formats import (
    Conversation, FormatOptions, Message, ToolCall, conversation_kinds, from_openai, from_sharegpt,
)
from sftlab.data.readers import DataError, RawRow

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _openai(messages, **top):
    return from_openai(RawRow({"messages": messages, **top}, "agent.jsonl:7"), FormatOptions())


def _call(name="get_weather", arguments='{"city": "Paris"}', call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_an_openai_tool_row_keeps_calls_results_and_tools_with_arguments_as_objects():
    conversation = _openai([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "assistant", "content": "18 C in Paris."},
    ], tools=[WEATHER])
    assert conversation.tools == (WEATHER,)
    assert conversation.messages[1] == Message("assistant", "", True, (ToolCall("get_weather", {"city": "Paris"}, "call_1"),))
    assert conversation.messages[2] == Message("tool", "18 C", tool_call_id="call_1")
    # the template receives the arguments as an object: a string would be JSON-encoded twice
    assert conversation.messages[1].tool_calls[0].template_dict()["function"]["arguments"] == {"city": "Paris"}
    assert conversation_kinds(conversation) == {"tools", "tool_calls", "tool_results"}


def test_parallel_calls_reasoning_aliases_and_weights():
    conversation = _openai([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Both.", "reasoning": "Two cities: two calls.",
         "tool_calls": [_call(), _call(arguments={"city": "Rome"}, call_id="call_2")], "weight": 0},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21 C"},
        {"role": "assistant", "content": "18 C and 21 C.", "thinking": "\nRead both results.\n", "weight": 1},
    ])
    calls = conversation.messages[2].tool_calls
    assert [c.arguments for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert conversation.messages[2].reasoning == "Two cities: two calls." and not conversation.messages[2].trained
    assert conversation.messages[5].reasoning == "Read both results." and conversation.messages[5].trained
    assert {"parallel_tool_calls", "reasoning", "untrained_turns"} <= conversation_kinds(conversation)


def test_legacy_function_call_functions_and_function_role():
    conversation = _openai([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
        {"role": "function", "name": "get_weather", "content": "{\"temp\": 4}"},
        {"role": "assistant", "content": "4 C."},
    ], functions=[WEATHER["function"]])
    assert conversation.tools == (WEATHER,)
    assert conversation.messages[1].tool_calls == (ToolCall("get_weather", {"city": "Oslo"}),)
    assert conversation.messages[2] == Message("tool", "{\"temp\": 4}", name="get_weather")


def test_think_blocks_and_hermes_tool_calls_in_the_content_are_parsed():
    conversation = _openai([
        {"role": "user", "content": "2 ** 10?"},
        {"role": "assistant", "content": "<think>\nUse the tool.\n</think>\n\nLet me compute.\n<tool_call>\n"
                                         '{"name": "calc", "arguments": {"x": "2 ** 10"}}\n</tool_call>'},
        {"role": "tool", "content": "<tool_response>\n1024\n</tool_response>"},
        {"role": "assistant", "content": [{"type": "text", "text": "1024."}]},
    ])
    turn = conversation.messages[1]
    assert (turn.content, turn.reasoning, turn.tool_calls) == ("Let me compute.", "Use the tool.",
                                                               (ToolCall("calc", {"x": "2 ** 10"}),))
    assert conversation.messages[2].content == "1024"  # the <tool_response> wrapper is the template's to write
    assert conversation.messages[3].content == "1024."


def test_sharegpt_function_calling_sets_with_a_tools_string():
    row = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "Weather in Lima?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})},
        {"from": "observation", "value": "22 C"},
        {"from": "gpt", "value": "22 C in Lima."},
    ]}
    conversation = from_sharegpt(RawRow(row, "fc.json[0]"), FormatOptions())
    assert conversation.tools == (WEATHER,)
    assert [m.role for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1].tool_calls == (ToolCall("get_weather", {"city": "Lima"}),)


def test_a_text_turn_then_a_function_call_turn_become_one_assistant_turn():
    row = {"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "Checking."},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{}"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    conversation = from_sharegpt(RawRow(row, "fc.json[1]"), FormatOptions())
    assert conversation.messages[1] == Message("assistant", "Checking.", True, (ToolCall("get_weather", {}),))


@pytest.mark.parametrize("messages, reason, where", [
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call(arguments="{city: 1")]}],
     "invalid_tool_arguments", r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: the arguments is not valid JSON"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call(arguments="[1]")]}],
     "invalid_tool_arguments", r"must be a JSON object"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>never closed"}],
     "malformed_think", r"messages\[1\]: the content opens <think>"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": '<tool_call>{"name": </tool_call>'}],
     "malformed_tool_call", r"<tool_call> block 0"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}],
     "invalid_weight", r"messages\[1\]: 'weight' must be 0 .* or 1"),
    ([{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}],
     "invalid_weight", r"'weight: 1' on a user message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "audio": {"id": "a"}}],
     "unknown_message_field", r"messages\[1\]: field 'audio' is not one sftlab reads"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "y"}],
     "orphan_tool_result", r"turn 1 is a tool result, but the turn before it calls no tool"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call()]},
      {"role": "user", "content": "z"}, {"role": "assistant", "content": "y"}],
     "missing_tool_result", r"turn 1 calls 1 tool\(s\) but 0 result\(s\) follow it"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call(), _call(call_id="c2")]},
      {"role": "tool", "tool_call_id": "call_1", "content": "r"}, {"role": "assistant", "content": "y"}],
     "missing_tool_result", r"calls 2 tool\(s\) but 1 result\(s\) follow it"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call(), _call(call_id="c2")]},
      {"role": "tool", "tool_call_id": "call_1", "content": "r"}, {"role": "tool", "tool_call_id": "call_1", "content": "r"},
      {"role": "assistant", "content": "y"}],
     "unmatched_tool_result", r"a second result for tool_call_id 'call_1'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call()]},
      {"role": "tool", "tool_call_id": "call_9", "content": "r"}, {"role": "assistant", "content": "y"}],
     "unmatched_tool_result", r"tool_call_id 'call_9' answers none of the calls before it \(call_1\)"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
     "non_string_content", r"'content' is null and the message makes no tool call"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<think>a</think>y", "reasoning_content": "b"}],
     "malformed_reasoning", r"reasoning given twice"),
])
def test_malformed_agent_rows_are_located_errors_with_their_own_reason(messages, reason, where):
    with pytest.raises(DataError, match=where) as error:
        _openai(messages)
    assert error.value.reason == reason and "agent.jsonl:7" in str(error.value)


def test_a_malformed_tool_list_is_refused():
    with pytest.raises(DataError, match="tools\\[0\\] is not a function schema") as error:
        _openai([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tools=[{"type": "web"}])
    assert error.value.reason == "malformed_tools"


def test_messages_round_trip_through_their_plain_form():
    conversation = _openai([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [_call()]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
        {"role": "assistant", "content": "18 C.", "weight": 0},
    ], tools=[WEATHER])
    again = Conversation.from_json(json.loads(json.dumps(conversation.to_json())))
    assert again == conversation and again.tools == conversation.tools


def test_slimorca_weights_and_empty_values_of_unified_schemas_are_read():
    row = {"conversations": [{"from": "system", "value": "S", "weight": None},
                             {"from": "human", "value": "Q", "weight": 0.0, "tool_calls": [], "reasoning_content": ""},
                             {"from": "gpt", "value": "A", "weight": 1.0, "name": ""}]}
    conversation = from_sharegpt(RawRow(row, "slim:1"), FormatOptions())
    assert conversation.messages == (Message("system", "S"), Message("user", "Q"), Message("assistant", "A", True))


def test_a_tool_result_given_as_json_is_its_json_text():
    conversation = _openai([
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [_call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"temp": 1}, {"temp": 2}]},
        {"role": "assistant", "content": "y"}])
    assert conversation.messages[2].content == '[{"temp": 1}, {"temp": 2}]'


def test_r1_content_without_its_opening_tag_and_a_think_block_after_much_space():
    late = _openai([{"role": "user", "content": "x"}, {"role": "assistant", "content": " " * 100 + "<think>r</think>y"}])
    bare = _openai([{"role": "user", "content": "x"}, {"role": "assistant", "content": "Step 1.\n</think>\n\nDone."}])
    assert (late.messages[1].reasoning, late.messages[1].content) == ("r", "y")
    assert (bare.messages[1].reasoning, bare.messages[1].content) == ("Step 1.", "Done.")


def test_merging_keeps_turns_of_different_weights_apart():
    from sftlab.data.formats import from_openai

    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"},
                        {"role": "assistant", "content": "b", "weight": 0}]}
    with pytest.raises(DataError) as error:
        from_openai(RawRow(row, "m:1"), FormatOptions(merge_consecutive_roles=True))
    assert error.value.reason == "consecutive_roles"
