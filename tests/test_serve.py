"""`sftlab serve`: a real uvicorn server on 127.0.0.1, driven by the official openai client.

The model is a tiny random Llama on SmolLM2's real tokenizer, saved as a run directory
(final/ + sftlab.json), with weights large enough that greedy answers differ from prompt to
prompt (so equalities between stream / batch / alone are not trivially true).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import get_template
from sftlab.infer.engine import InferenceModel
from sftlab.infer.server import create_app, serve_in_background

MODEL = "tiny-run"
KEY = "sk-test-secret"


def make_run_dir(tokenizer, folder: Path) -> Path:
    """A run directory as `sftlab train` leaves it: final/ holds the model, tokenizer and sftlab.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    final = folder / "final"
    LlamaForCausalLM(config).save_pretrained(final)
    tokenizer.save_pretrained(final)
    (final / "sftlab.json").write_text(json.dumps({"template": "alpaca", "base_model": "tiny", "method": "full",
                                                  "precision": "fp32"}))  # batched = alone holds exactly in fp32
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a shared CPU they cost a lot; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory) -> Path:
    return make_run_dir(tokenizer, tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def inference(run_dir):
    # a wide batching window so that concurrent test requests reliably meet in one batch
    model = InferenceModel.load(str(run_dir), max_batch_size=8, batch_window_ms=100)
    yield model
    model.engine.close()


@pytest.fixture(scope="module")
def server(inference):
    with serve_in_background(create_app(inference=inference, model_name=MODEL, api_key="")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def chat(client, content, **kwargs):
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def stats(server) -> dict:
    return httpx.get(server.url + "/sftlab/stats").json()


# ---------------------------------------------------------------------------------------------


def test_models_and_a_plain_chat_completion(client, tokenizer):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 512 and models.data[0].template == "alpaca"
    response = chat(client, "Name three primary colours.")
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"  # a random model does not emit EOS within 12 tokens
    assert response.usage.completion_tokens == 12
    prompt = get_template("alpaca", tokenizer).render_prompt(
        Conversation((Message("user", "Name three primary colours."),)))
    assert response.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_the_chat_prompt_is_the_run_templates_render_prompt(client, server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Translate to French."},
                {"role": "user", "content": [{"type": "text", "text": "Good morning"}]}]
    expected = get_template("alpaca", tokenizer).render_prompt(
        Conversation(tuple(Message(m["role"], m["content"] if isinstance(m["content"], str) else "Good morning")
                           for m in messages)))
    rendered = httpx.post(server.url + "/sftlab/render", json={"messages": messages}).json()
    assert rendered["prompt"] == expected and rendered["template"] == "alpaca"
    # and that text is what the model is given: the chat answer equals a raw completion of it
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    raw = client.completions.create(model=MODEL, prompt=expected, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == raw.choices[0].text
    assert answer.usage.prompt_tokens == raw.usage.prompt_tokens == rendered["prompt_tokens"]


def test_streaming_equals_the_non_streamed_greedy_answer(client, server):
    plain = chat(client, "Write a haiku about rain.", max_tokens=20).choices[0].message.content
    chunks = list(chat(client, "Write a haiku about rain.", max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 3 and "".join(content) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text

    # the wire format itself: `data: {...}` events, then `data: [DONE]`
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": MODEL, "stream": True, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_n_choices_and_seeded_sampling(client):
    greedy = chat(client, "Hello", n=2, max_tokens=8)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 16

    def sample():
        return [c.message.content for c in chat(client, "Hello", n=2, max_tokens=8, temperature=1.0, top_p=0.9,
                                                seed=1234).choices]

    first = sample()
    assert first == sample()  # a seed makes sampling reproducible
    assert first[0] != first[1]  # and the n choices still differ
    streamed = chat(client, "Hello", n=2, max_tokens=8, stream=True)
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            by_index[c.index] += c.delta.content or ""
    assert by_index == {0: greedy.choices[0].message.content, 1: greedy.choices[1].message.content}


def test_stop_sequences_are_cut_and_finish_with_stop(client):
    full = chat(client, "Tell me a story.", max_tokens=20).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]  # a piece from the middle of the greedy answer
    expected = full[: full.index(stop)]
    for kwargs in ({"stop": stop}, {"stop": ["@@never@@", stop]}):
        response = chat(client, "Tell me a story.", max_tokens=20, **kwargs)
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.completion_tokens < 20
    streamed = list(chat(client, "Tell me a story.", max_tokens=20, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    raw = client.completions.create(model=MODEL, prompt="Tell me a story.", max_tokens=20, temperature=0)
    cut = raw.choices[0].text[3:8]
    stopped = client.completions.create(model=MODEL, prompt="Tell me a story.", max_tokens=20, temperature=0, stop=cut)
    assert stopped.choices[0].text == raw.choices[0].text[: raw.choices[0].text.index(cut)]


def test_the_eos_token_ends_a_response_with_finish_reason_stop(client, tokenizer):
    response = chat(client, "Hi", logit_bias={str(tokenizer.eos_token_id): 100})
    assert response.choices[0].message.content == ""
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens == 1


def test_concurrent_requests_share_batches_and_answer_as_alone(client, server):
    prompts = ["Name a colour.", "Translate 'cat' to German.", "What is 2 + 2?", "Write a limerick.",
               "List three fruits.", "Describe the sea in a long and winding sentence, please."]
    settings = [{"temperature": 0}] * 5 + [{"temperature": 0.9, "seed": 7}]  # sampling rows share the batch too
    alone = [chat(client, p, max_tokens=16, **s).choices[0].message.content for p, s in zip(prompts, settings)]
    before = stats(server)
    answers: list[str | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        barrier.wait()
        answers[i] = chat(client, prompts[i], max_tokens=16, **settings[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = stats(server)
    assert answers == alone
    assert len(set(alone)) == len(alone)
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)
    assert after["max_batch_rows"] >= 2


def test_a_request_joins_a_batch_that_is_already_decoding(client, server):
    short_alone = chat(client, "What is 2 + 2?", max_tokens=8).choices[0].message.content
    before = stats(server)
    finished: dict[str, float] = {}
    stream = chat(client, "Tell me everything you know.", max_tokens=200, stream=True)
    next(stream), next(stream)  # the long request is decoding
    short = []
    thread = threading.Thread(target=lambda: (short.append(chat(client, "What is 2 + 2?", max_tokens=8)),
                                              finished.setdefault("short", time.monotonic())))
    thread.start()
    long_text = "".join(c.choices[0].delta.content or "" for c in stream)
    finished["long"] = time.monotonic()
    thread.join(60)
    after = stats(server)
    assert short[0].choices[0].message.content == short_alone  # joining changes nothing in the answer
    assert finished["short"] < finished["long"] and long_text  # it did not wait for the long one
    assert after["joined_rows"] - before["joined_rows"] == 1 and after["batches"] - before["batches"] == 1


def test_a_client_that_hangs_up_frees_its_batch_row(server):
    before = stats(server)["cancelled"]
    body = {"model": MODEL, "stream": True, "max_tokens": 480, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        events = (line for line in response.iter_lines() if line)
        for _ in range(3):  # the role chunk and two tokens: decoding is under way; now hang up
            next(events)
    deadline = time.monotonic() + 20
    while stats(server)["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned request kept generating"
        time.sleep(0.05)


def _error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_openai_style_errors(client, server):
    url = server.url + "/v1/chat/completions"
    hi = [{"role": "user", "content": "Hi"}]
    _error(httpx.post(url, content=b'{"model": "tiny-run", "messages": [', headers={"content-type": "application/json"}),
           400, "invalid_json")
    _error(httpx.post(url, json=[1, 2]), 400)
    _error(httpx.post(url, json={"model": MODEL}), 400, param="messages")
    _error(httpx.post(url, json={"model": MODEL, "messages": hi, "temperature": "hot"}), 400, param="temperature")
    _error(httpx.post(url, json={"model": MODEL, "messages": hi, "top_p": 1.5}), 400, param="top_p")
    _error(httpx.post(url, json={"model": MODEL, "messages": hi, "max_tokens": 0}), 400, param="max_tokens")
    _error(httpx.post(url, json={"model": MODEL, "messages": hi, "n": 0}), 400, param="n")
    _error(httpx.post(url, json={"model": MODEL, "messages": hi, "stop": [1]}), 400, param="stop")
    _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), 400)
    _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400)
    _error(httpx.get(server.url + "/v1/nothing-here"), 404)
    _error(httpx.get(url), 405)

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=600)
    assert too_many.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[{"not": "a prompt"}])  # type: ignore[arg-type]
    # the server is still fine afterwards
    assert chat(client, "Hi", max_tokens=2).choices[0].finish_reason == "length"


def test_an_api_key_is_required_when_set(inference, monkeypatch):
    with serve_in_background(create_app(inference=inference, model_name=MODEL, api_key=KEY)) as srv:
        url = srv.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        _error(httpx.post(url, json=body), 401, "invalid_api_key")
        _error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        good = OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0)
        assert good.chat.completions.create(**body).choices[0].message.content is not None
    monkeypatch.setenv("SFTLAB_API_KEY", "from-env")
    with serve_in_background(create_app(inference=inference, model_name=MODEL)) as srv:
        _error(httpx.get(srv.url + "/v1/models"), 401)
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


JINJA = (  # transformers renders with trim_blocks, so the newlines are expressions
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('this template has no system role') }}{% endif %}"
    "{{ '### ' + m['role'] + ':\\n' + m['content'] }}{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}"
    "{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


def test_a_chat_template_run_multi_turn_its_end_token_and_its_errors(inference, tokenizer, tmp_path):
    """A custom Jinja template: the whole history is rendered, its end token (not EOS) stops
    generation, and its own raise_exception becomes a 400."""
    path = tmp_path / "turns.jinja"
    path.write_text(JINJA)
    custom = InferenceModel.from_model(inference.model, inference.tokenizer, str(path), source="custom")
    end_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_id != tokenizer.eos_token_id and end_id in custom.engine.stop_token_ids
    turns = [("user", "A"), ("assistant", "B"), ("user", "C")]
    with serve_in_background(create_app(inference=custom, model_name="custom", api_key="")) as srv:
        messages = [{"role": r, "content": c} for r, c in turns]
        rendered = httpx.post(srv.url + "/sftlab/render", json={"messages": messages}).json()["prompt"]
        template = get_template(str(path), tokenizer)
        assert rendered == template.render_prompt(
            Conversation(tuple(Message(r, c) for r, c in turns) + (Message("assistant", ""),)))
        assert rendered == "### user:\nA\n\n### assistant:\nB<|endoftext|>\n\n### user:\nC\n\n### assistant:\n"
        client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        stopped = client.chat.completions.create(model="custom", messages=messages, max_tokens=5, temperature=0,
                                                 logit_bias={str(end_id): 100})
        assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
        error = _error(httpx.post(srv.url + "/v1/chat/completions", json={
            "model": "custom", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}),
            400, param="messages")
        assert "no system role" in error["message"]
    custom.engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_sftlab_serve_command(run_dir, client):
    port = _free_port()
    env = {**os.environ, "SFTLAB_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "sftlab", "serve", str(run_dir), "--port", str(port), "--model-name", "cli-model",
         "--log-level", "warning", "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "sftlab serve did not come up"
            time.sleep(0.2)
        cli = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = cli.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=8, temperature=0)
        # the same run, the same answer as the in-process server
        assert answer.choices[0].message.content == chat(client, "Hello", max_tokens=8).choices[0].message.content
        # a long generation still streaming does not keep the server from stopping
        streaming = cli.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "Go on."}],
                                                stream=True, temperature=0)
        next(streaming)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving cli-model" in output and "Traceback" not in output


def test_a_missing_model_is_one_red_line(tmp_path):
    from typer.testing import CliRunner

    from sftlab.cli import app

    for command in ("serve", "chat"):
        result = CliRunner().invoke(app, [command, str(tmp_path / "nope")], input="hi\n")
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error:") and "not an existing folder" in result.output
        assert "Traceback" not in result.output


# -- security and isolation: one request never fails another (docs/serve-chat.md#security) ---------

def test_degenerate_but_legal_sampling_joins_a_batch_and_fails_no_one(client, server):
    prompts = ["Name a colour.", "What is 2 + 2?", "List three fruits."]
    alone = [chat(client, p, max_tokens=12).choices[0].message.content for p in prompts]
    greedy = chat(client, "Write a limerick.", max_tokens=12).choices[0].message.content
    answers: dict[str, str] = {}
    barrier = threading.Barrier(len(prompts) + 2)

    def ask(name: str, prompt: str, **settings) -> None:
        barrier.wait()
        stream = chat(client, prompt, max_tokens=12, stream=True, **settings)
        answers[name] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(f"good{i}", p)) for i, p in enumerate(prompts)]
    threads += [threading.Thread(target=ask, args=("top_p0", "Write a limerick."), kwargs={"temperature": 1, "top_p": 0}),
                threading.Thread(target=ask, args=("seed", "Hi"), kwargs={"temperature": 1, "seed": 2**70})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [answers[f"good{i}"] for i in range(len(prompts))] == alone  # every co-batched stream completed, unchanged
    assert answers["top_p0"] == greedy  # top_p 0 keeps only the most likely token: greedy, as OpenAI's does
    again = chat(client, "Hi", max_tokens=12, stream=False, temperature=1, seed=2**70).choices[0].message.content
    assert answers["seed"] == again and answers["seed"]  # a huge seed is reduced deterministically


def test_a_row_whose_sampling_fails_ends_alone(inference, tokenizer):
    """Below the HTTP checks: a row with a NaN temperature reaches the engine; it fails, the rows
    decoding beside it finish with the answers they give alone."""
    from sftlab.infer.engine import Failed, SamplingParams

    engine = inference.engine
    prompts = [inference.encode(inference.chat_prompt([("user", p)])) for p in ("Hi", "Name a colour.", "Bye")]
    alone = [d.text for d in engine.generate_all(prompts, [SamplingParams(max_tokens=8)] * 3, tokenizer)]
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=float("nan")),
              SamplingParams(max_tokens=8)]
    done = engine.generate_all(prompts, params, tokenizer)
    assert [done[0].text, done[2].text] == [alone[0], alone[2]]
    assert done[1].finish_reason == "error" and "sampling failed" in done[1].error
    assert isinstance(Failed("x"), Failed)


def test_request_limits_are_clear_4xx_errors(inference):
    app = create_app(inference=inference, model_name=MODEL, api_key="", max_request_mb=0.05, max_json_depth=16,
                     read_timeout_s=1.0, max_prompt_tokens=50)
    with serve_in_background(app) as srv:
        url = srv.url + "/v1/chat/completions"
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 60_000}]}
        assert "over this server's limit of 0.05 MB" in _error(httpx.post(url, json=big), 413, "request_too_large")["message"]
        deep = '{"model": "tiny-run", "messages": ' + "[" * 40 + "]" * 40 + "}"
        assert "nests deeper than 16" in _error(httpx.post(url, content=deep, headers={"content-type": "application/json"}),
                                                400, "invalid_json")["message"]
        surrogate = '{"model": "tiny-run", "messages": [{"role": "user", "content": "\\ud800"}]}'
        assert "lone surrogate" in _error(httpx.post(url, content=surrogate, headers={"content-type": "application/json"}),
                                          400, "invalid_json")["message"]
        long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 80}]}
        assert "--max-prompt-tokens" in _error(httpx.post(url, json=long), 400, "context_length_exceeded")["message"]
        # a body that trickles in: refused after the read timeout, the server answers others meanwhile
        with socket.create_connection((srv.host, srv.port)) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\"")
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            slow.settimeout(10)
            assert b"408" in slow.recv(4096).split(b"\r\n")[0]
        # a connection that never sends a request head is closed after the read timeout
        with socket.create_connection((srv.host, srv.port)) as idle:
            idle.settimeout(10)
            started = time.monotonic()
            assert idle.recv(100) == b"" and time.monotonic() - started < 5


def test_a_keyless_server_refuses_other_origins_and_rebinding_unless_let_in(inference):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with serve_in_background(create_app(inference=inference, model_name=MODEL, api_key="")) as srv:
        url = srv.url + "/v1/chat/completions"
        before = httpx.get(srv.url + "/sftlab/stats").json()["requests"]
        simple = httpx.post(url, content=json.dumps(body), headers={"content-type": "text/plain",
                                                                    "origin": "http://attacker.example"})
        assert "another origin" in _error(simple, 403, "cross_origin")["message"]
        assert "application/json" in _error(httpx.post(url, content=json.dumps(body),
                                                       headers={"content-type": "text/plain"}), 403)["message"]
        rebound = httpx.get(srv.url + "/v1/models", headers={"host": f"rebind.attacker.example:{srv.port}"})
        assert "not a name this server answers to" in _error(rebound, 403, "host_not_allowed")["message"]
        assert httpx.get(srv.url + "/sftlab/stats").json()["requests"] == before  # nothing was generated
        assert httpx.post(url, json=body, headers={"origin": f"http://localhost:{srv.port}"}).status_code == 200
    app = create_app(inference=inference, model_name=MODEL, api_key="", cors_origins=["http://localhost:3000"])
    with serve_in_background(app) as srv:
        url = srv.url + "/v1/chat/completions"
        let_in = httpx.post(url, json=body, headers={"origin": "http://localhost:3000"})
        assert let_in.status_code == 200 and let_in.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = httpx.options(url, headers={"origin": "http://localhost:3000", "access-control-request-method": "POST",
                                                "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200
        _error(httpx.post(url, json=body, headers={"origin": "http://attacker.example"}), 403, "cross_origin")


def test_a_large_prompt_is_tokenized_off_the_event_loop(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum dolor " * 300_000}]}
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "response", httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)))
    thread.start()
    time.sleep(0.3)
    slowest = 0.0
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    thread.join()
    _error(result["response"], 400, "context_length_exceeded")
    assert slowest < 1.0  # /health kept answering while the 5 MB prompt was rendered and tokenized
