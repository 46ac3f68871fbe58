"""A tuned agent everywhere it goes: `sftlab serve` answers the openai client's tool-calling requests
with parsed tool_calls (streamed and not), `sftlab chat --tools` runs the call/result loop, `sftlab
eval --tool-calls` scores calls, and the exported chat template renders agent rows to the training
token ids.

The model is a tiny random Llama on SmolLM2's tokenizer that memorized one tool-calling row on the
built-in chatml template (150 steps), so it really writes `<tool_call>{...}</tool_call>` when asked
about the weather in Paris: the parsing is tested on generated text, not on strings of the test."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from sftlab.config import load_config
from sftlab.data.formats import FormatOptions, from_openai
from sftlab.data.readers import RawRow
from sftlab.infer.engine import InferenceModel
from sftlab.infer.server import create_app, serve_in_background
from sftlab.infer.tools import parse_reply, parser_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROW = {"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]}]}


@pytest.fixture(scope="module")
def agent_run(tokenizer, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.train.loop import train

    root = tmp_path_factory.mktemp("agent-run")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "row.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    train(load_config(overrides=[f"model={root / 'model'}", f"data={data}", "template=chatml", "max_steps=150",
                                 "batch_size=1", "learning_rate=3e-3", "warmup_ratio=0", "max_length=512",
                                 f"output_dir={root / 'run'}", "logging_steps=50"]))
    return root / "run"


@pytest.fixture(scope="module")
def server(agent_run):
    inference = InferenceModel.load(str(agent_run), max_batch_size=4, batch_window_ms=10)
    with serve_in_background(create_app(inference=inference, model_name="agent", api_key="")) as srv:
        yield srv
    inference.engine.close()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_a_parsed_tool_call(client):
    response = client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # arguments as a JSON string


def test_streamed_tool_calls_and_no_call_text_in_the_content(client):
    stream = client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40,
                                            stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "<tool_call>" not in content and content.strip() == ""  # what became a call was held back
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_tool_choice_none_offers_no_tools_and_parses_nothing(client, server):
    body = {"model": "agent", "messages": ASK, "tools": [WEATHER], "tool_choice": "none"}
    rendered = httpx.post(server.url + "/sftlab/render", json=body).json()["prompt"]
    assert "<tools>" not in rendered
    with_tools = httpx.post(server.url + "/sftlab/render", json={**body, "tool_choice": "auto"}).json()["prompt"]
    assert "<tools>" in with_tools and '"name": "get_weather"' in with_tools
    response = client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER], tool_choice="none",
                                              temperature=0, max_tokens=20)
    assert response.choices[0].message.tool_calls is None and response.choices[0].finish_reason != "tool_calls"


def test_a_required_call_that_does_not_parse_comes_back_as_content(client):
    response = client.chat.completions.create(model="agent", messages=[{"role": "user", "content": "Hello there."}],
                                              tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=8)
    message = response.choices[0].message  # the forced <tool_call> opening, continued with whatever: no 500
    assert message.tool_calls is None and message.content.startswith("<tool_call>")


def test_the_call_and_its_result_render_as_training_rendered_them(client, server, agent_run, tokenizer):
    first = client.chat.completions.create(model="agent", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    rendered = httpx.post(server.url + "/sftlab/render", json={"model": "agent", "messages": history,
                                                               "tools": [WEATHER]}).json()["prompt"]
    from sftlab.data.templates import get_template

    conversation = from_openai(RawRow({"tools": [WEATHER], "messages": [*history, {"role": "assistant",
                                                                                   "content": "It is 18 C."}]},
                                      "t"), FormatOptions())
    assert rendered == get_template("chatml", tokenizer).render_prompt(conversation)
    assert '<tool_response>\n18 C and sunny\n</tool_response>' in rendered
    second = client.chat.completions.create(model="agent", messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_chat_template_kwargs_on_a_builtin_template_is_a_400(server):
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "agent", "messages": ASK, "chat_template_kwargs": {"enable_thinking": False}})
    assert response.status_code == 400 and "reads none" in response.json()["error"]["message"]


def test_chat_with_tools_shows_the_call_and_continues_with_the_result(agent_run, tmp_path):
    from sftlab.infer.chat import ChatSession, run_chat

    session = ChatSession.load(str(agent_run), max_new_tokens=40, tools=(WEATHER,))
    out = io.StringIO()
    run_chat(session, io.StringIO("Weather in Paris?\n18 C and sunny\n/save " + str(tmp_path / "c.json") + "\n"), out)
    session.inference.engine.close()
    text = out.getvalue()
    assert '[tool call] get_weather({"city": "Paris"})' in text and "tool get_weather> 18 C and sunny" in text
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(saved[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert saved[2]["content"] == "18 C and sunny" and saved[2]["tool_call_id"] == saved[1]["tool_calls"][0]["id"]


def test_eval_tool_calls_scores_function_and_arguments(agent_run, tmp_path):
    from sftlab.eval import toolcalls
    from sftlab.infer.generate import Generator

    rows = [ROW, {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Oslo?"}, {
        "role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                                 "arguments": '{"city": "Oslo"}'}}]}]},
            {"tools": [WEATHER], "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = toolcalls.evaluate(Generator.load(str(agent_run)), toolcalls.load_rows(path), "hermes", 40, 4)
    paris, oslo, hi = result["responses"]
    assert paris["correct"] and paris["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert oslo["function_correct"] and not oslo["arguments_correct"]  # it memorized Paris
    assert result["function_accuracy"] == 1.0 and result["arguments_accuracy"] == 0.5
    assert result["rows"] == 3 and result["call_rows"] == 2 and result["no_call_rows"] == 1
    assert result["tool_call_accuracy"] == round((1 + int(hi["correct"])) / 3, 4)


def test_the_exported_chat_template_renders_agent_rows_to_the_training_ids(agent_run, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from sftlab.data.prepare import prepare_data
    from sftlab.export import export

    export(agent_run, tmp_path / "export")
    exported = AutoTokenizer.from_pretrained(tmp_path / "export")
    data_file = ROOT / "examples" / "data" / "agent_demo.jsonl"
    config = load_config(overrides=[f"model={agent_run / 'final'}", f"data={data_file}", "template=chatml",
                                    "max_length=1024", "cache=false", f"output_dir={tmp_path / 'prep'}"])
    stored = {e.source: e for e in prepare_data(config).train}
    from test_agent_templates import _hf_messages  # the row as transformers' convention has it, written by the test

    for number, line in enumerate(data_file.read_text().splitlines(), 1):
        row = json.loads(line)
        ids = exported.apply_chat_template(_hf_messages(row), tools=row.get("tools"), tokenize=True, return_dict=False)
        assert list(ids) == list(stored[f"{data_file}:{number}"].input_ids), number
    parsed = parse_reply('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
                         '{"name": "b", "arguments": {}}\n</tool_call>', parser_for("hermes"), parallel=False)
    assert [c.name for c in parsed.tool_calls] == ["a"]  # parallel_tool_calls: false keeps the first
