"""`sftlab chat`: a multi-turn terminal chat with streamed tokens, in the run's own template.

Each turn renders the whole conversation so far with the template's render_prompt (the prompt
the run trained with) and decodes on the same batched engine as `sftlab serve`. Commands:
/reset, /system TEXT, /save FILE (OpenAI messages JSON), /help, /exit. Lines are read from
stdin when it is not a terminal, so a conversation can be piped in.

With tools (`--tools tools.json`, an OpenAI `tools` list) the model is offered them; a reply that
calls tools shows each call, asks for its result (the next line typed or piped), and the model
continues with the results. Reasoning (<think>) is shown apart from the answer unless
--hide-reasoning.

    from sftlab.infer.chat import ChatSession
    session = ChatSession.load("runs/demo", system="Answer briefly.")
    for delta in session.send("Name three primary colours."):
        print(delta, end="", flush=True)
    session.save("conversation.json")
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from sftlab.data.formats import Message
from sftlab.errors import SftlabError
from sftlab.infer.engine import Done, Failed, InferenceModel, SamplingParams, TextStream, Token, template_errors
from sftlab.infer.tools import Reply, ReplyStream, parser_for

MAX_TOOL_ROUNDS = 8  # replies that call tools in a row before the chat stops asking for results

COMMANDS = (
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt (no TEXT: remove it)"),
    ("/save FILE", "save the conversation as OpenAI messages JSON"),
    ("/help", "show these commands"),
    ("/exit", "quit (also /quit, Ctrl-D)"),
)


class ChatError(SftlabError, ValueError):
    """A turn that cannot be generated (the template rejects it, or it overflows the context)."""


@dataclass
class ChatSession:
    inference: InferenceModel
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    history: list[Message] = field(default_factory=list)  # user, assistant and tool turns
    tools: tuple = ()  # the functions offered (OpenAI tool schemas)
    show_reasoning: bool = True
    last_finish_reason: str | None = None
    last_reply: Reply | None = None

    @classmethod
    def load(cls, model_or_run: str, template: str | None = None, **kwargs) -> "ChatSession":
        return cls(InferenceModel.load(model_or_run, template, max_batch_size=1, batch_window_ms=0), **kwargs)

    def messages(self) -> list[dict]:
        """The conversation as OpenAI chat messages (system first, when set)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for m in self.history:
            item: dict = {"role": m.role, "content": m.content}
            if m.reasoning is not None:
                item["reasoning_content"] = m.reasoning
            if m.tool_calls:
                item["tool_calls"] = [c.openai_dict() for c in m.tool_calls]
            if m.tool_call_id:
                item["tool_call_id"] = m.tool_call_id
            if m.name:
                item["name"] = m.name
            out.append(item)
        return out

    def _turns(self, user_text: str | None) -> list[Message]:
        turns = ([Message("system", self.system)] if self.system else []) + list(self.history)
        return turns + ([Message("user", user_text)] if user_text is not None else [])

    def prompt(self, user_text: str | None = None) -> str:
        """The exact prompt text the model is given for the next reply."""
        return self.inference.chat_prompt(self._turns(user_text), self.tools)

    def add_tool_result(self, call, content: str) -> None:
        """A tool's result for one of the last reply's calls; the next `send(None)` continues."""
        self.history.append(Message("tool", content, tool_call_id=call.id, name=call.name))

    def reset(self) -> None:
        self.history.clear()

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n")
        return path

    def send(self, user_text: str | None) -> Iterator[str]:
        """Yield the reply's text as it is generated; the turn joins the history when it ends
        (user_text None: the model continues after tool results). Reasoning and tool calls are
        in `last_reply` when it ends."""
        for kind, delta in self.send_events(user_text):
            if kind == "content":
                yield delta

    def send_events(self, user_text: str | None) -> Iterator[tuple[str, str]]:
        """(kind, delta) as the reply is generated, kind "reasoning" or "content".

        Closing the iterator early (e.g. Ctrl-C) stops generation and keeps the partial reply.
        """
        try:
            prompt = self.prompt(user_text)
        except template_errors() as exc:
            raise ChatError(f"the {self.inference.template_name} template cannot format this conversation: {exc}") from None
        ids = self.inference.encode(prompt)
        room = self.inference.context - len(ids)
        if room <= 0:
            raise ChatError(f"the conversation is {len(ids)} tokens, over the model's context of "
                            f"{self.inference.context}; /reset to start again")
        params = SamplingParams(max_tokens=min(self.max_new_tokens, room), temperature=self.temperature,
                                top_p=self.top_p, seed=self.seed)
        parser = parser_for(self.inference.tool_parser if self.tools else "none")
        stream = TextStream(self.inference.tokenizer, self.inference.stop_strings, parser.special_markers)
        reader = ReplyStream(parser, {t["function"]["name"] for t in self.tools} or None)
        if user_text is not None:
            self.history.append(Message("user", user_text))
        started, failed = False, False
        self.last_finish_reason = self.last_reply = None
        events = self.inference.engine.stream(ids, params)
        try:
            for event in events:
                if isinstance(event, Token):
                    delta = stream.push(event.id)
                elif isinstance(event, Done):
                    delta = stream.finish()
                    self.last_finish_reason = "length" if event.reason == "length" else "stop"
                elif isinstance(event, Failed):
                    failed = True
                    raise ChatError(event.message)
                if not started:  # the reply starts at its first visible character
                    delta = delta.lstrip()
                    started = bool(delta)
                for kind, text in reader.push(delta) if delta else []:
                    yield kind, text
                if stream.stopped:
                    self.last_finish_reason = "stop"
                    break
            last, self.last_reply = reader.finish()
            for kind, text in last:
                yield kind, text
        finally:
            events.close()
            if failed:  # the failed turn is not part of the conversation
                if user_text is not None:
                    self.history.pop()
            else:
                reply = self.last_reply or reader.finish()[1]  # an interrupted reply keeps what it said
                self.last_reply = reply
                self.history.append(Message("assistant", reply.content.rstrip(), True, tuple(reply.tool_calls),
                                            reply.reasoning))


def _print(out: TextIO, text: str = "", end: str = "\n") -> None:
    out.write(text + end)
    out.flush()


def run_chat(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """The read-reply loop; returns the number of replies. Reads lines from stdin when it is not a TTY."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty() and out.isatty()
    inference = session.inference
    _print(out, f"sftlab chat · {inference.source} · template {inference.template_name} · "
                f"context {inference.context} tokens · /help for commands")
    if session.system:
        _print(out, f"(system prompt: {session.system})")
    replies = 0
    while True:
        try:
            if interactive:
                try:
                    import readline  # noqa: F401  (line editing and history for input())
                except ImportError:
                    pass
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                line = line.rstrip("\r\n")
                _print(out, f"you> {line}")
        except (EOFError, KeyboardInterrupt):
            _print(out)
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                _print(out, "(conversation reset)")
            elif command == "/system":
                session.system = argument or None
                _print(out, f"(system prompt set: {argument})" if argument else "(system prompt removed)")
            elif command == "/save":
                if not argument:
                    _print(out, "(usage: /save FILE)")
                    continue
                try:
                    path = session.save(argument)
                except OSError as exc:
                    _print(out, f"(could not save: {exc})")
                    continue
                _print(out, f"(saved {len(session.messages())} messages to {path})")
            elif command == "/help":
                for name, meaning in COMMANDS:
                    _print(out, f"  {name:<14} {meaning}")
            else:
                _print(out, f"(unknown command {command}; /help lists the commands)")
            continue
        if text.startswith("//"):  # a message that starts with "/"
            text = text[1:]
        message: str | None = text
        for _ in range(MAX_TOOL_ROUNDS):  # a reply, then as long as it calls tools: their results and the next
            replies += 1
            if not _show_reply(session, message, out):
                break
            calls = session.last_reply.tool_calls if session.last_reply else []
            if not calls:
                break
            for call in calls:
                result = _read_line(f"tool {call.name}> ", stdin, out, interactive)
                if result is None:
                    return replies
                session.add_tool_result(call, result)
            message = None  # the model continues with the results
    return replies


def _read_line(prompt: str, stdin: TextIO, out: TextIO, interactive: bool) -> str | None:
    try:
        if interactive:
            return input(prompt)
        line = stdin.readline()
        if not line:
            return None
        _print(out, prompt + line.rstrip("\r\n"))
        return line.rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        return None


def _show_reply(session: ChatSession, message: str | None, out: TextIO) -> bool:
    """Stream one reply to `out` (reasoning apart, calls listed); False when it failed."""
    _print(out, "assistant> ", end="")
    events = session.send_events(message)
    kind_shown = None
    try:
        for kind, delta in events:
            if kind == "reasoning" and not session.show_reasoning:
                continue
            if kind != kind_shown:
                out.write("[reasoning] " if kind == "reasoning" else ("\n" if kind_shown else ""))
                kind_shown = kind
            out.write(delta)
            out.flush()
    except ChatError as exc:
        _print(out, f"(error: {exc})")
        return False
    except KeyboardInterrupt:
        events.close()
        _print(out, " [interrupted]")
        return False
    suffix = " [max tokens]" if session.last_finish_reason == "length" else ""
    _print(out, suffix)
    for call in (session.last_reply.tool_calls if session.last_reply else []):
        _print(out, f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})  id {call.id}")
    return True
