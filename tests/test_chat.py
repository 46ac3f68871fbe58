"""`sftlab chat`: a conversation piped into the real command, and the ChatSession behind it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import get_template
from sftlab.infer.chat import ChatError, ChatSession
from sftlab.infer.engine import InferenceModel, SamplingParams, TextStream, Token
from test_serve import make_run_dir, one_torch_thread  # noqa: F401  (an autouse fixture)


@pytest.fixture(scope="module")
def run_dir(tokenizer, tmp_path_factory):
    return make_run_dir(tokenizer, tmp_path_factory.mktemp("chat-run"))


@pytest.fixture(scope="module")
def inference(run_dir):
    model = InferenceModel.load(str(run_dir), max_batch_size=1, batch_window_ms=0)
    yield model
    model.engine.close()


def greedy_reply(inference, messages: list[tuple[str, str]], max_tokens: int) -> str:
    """What the model answers to this conversation, rendered independently with the template's API."""
    template = get_template("alpaca", inference.tokenizer)
    prompt = template.render_prompt(Conversation(tuple(Message(r, c) for r, c in messages) + (Message("assistant", ""),)))
    stream = TextStream(inference.tokenizer)
    for event in inference.engine.stream(inference.encode(prompt), SamplingParams(max_tokens=max_tokens)):
        if isinstance(event, Token):
            stream.push(event.id)
    return (stream.text + stream.finish()).strip()


@pytest.mark.slow
def test_a_piped_conversation_with_commands(run_dir, inference, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "sub" / "second.json"
    lines = ["/system Answer briefly.", "Name a colour.", "And another one?", f"/save {first}", "/reset",
             "/system", "/bogus", "What is 2 + 2?", f"/save {second}", "/exit", "never read"]
    result = subprocess.run(
        [sys.executable, "-m", "sftlab", "chat", str(run_dir), "--max-new-tokens", "6", "--threads", "1"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    saved = json.loads(first.read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == "Answer briefly."
    assert [saved[1]["content"], saved[3]["content"]] == ["Name a colour.", "And another one?"]
    # each reply is the model's answer to the whole conversation so far, in the run's template
    turns = [("system", "Answer briefly."), ("user", "Name a colour.")]
    assert saved[2]["content"] == greedy_reply(inference, turns, 6) != ""
    turns += [("assistant", saved[2]["content"]), ("user", "And another one?")]
    assert saved[4]["content"] == greedy_reply(inference, turns, 6) != ""

    # /reset forgot the turns, `/system` without text removed the system prompt
    after = json.loads(second.read_text())
    assert [(m["role"], m["content"]) for m in after][:1] == [("user", "What is 2 + 2?")]
    assert len(after) == 2 and after[1]["content"] == greedy_reply(inference, [("user", "What is 2 + 2?")], 6)

    out = result.stdout
    for reply in (saved[2]["content"], saved[4]["content"], after[1]["content"]):
        assert f"assistant> {reply}" in out  # streamed to the terminal as it was generated
    assert "(conversation reset)" in out and "unknown command /bogus" in out
    assert "never read" not in out  # /exit stopped reading


def test_the_session_streams_renders_and_refuses_what_does_not_fit(inference):
    session = ChatSession(inference, system="Be kind.", max_new_tokens=8)
    assert session.prompt("Hi") == get_template("alpaca", inference.tokenizer).render_prompt(
        Conversation((Message("system", "Be kind."), Message("user", "Hi"))))
    deltas = list(session.send("Hi"))
    assert len(deltas) > 1 and "".join(deltas).rstrip() == session.history[-1].content
    assert session.last_finish_reason == "length"
    assert session.messages() == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": session.history[-1].content}]
    with pytest.raises(ChatError, match="context"):
        list(session.send("word " * 600))
    assert len(session.messages()) == 3  # the turn that did not fit is not kept
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be kind."}]
