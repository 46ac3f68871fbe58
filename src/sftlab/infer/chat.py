"""`sftlab chat`: a multi-turn terminal chat with streamed tokens, in the run's own template.

Each turn renders the whole conversation so far with the template's render_prompt (the prompt
the run trained with) and decodes on the same batched engine as `sftlab serve`. Commands:
/reset, /system TEXT, /save FILE (OpenAI messages JSON), /help, /exit. Lines are read from
stdin when it is not a terminal, so a conversation can be piped in.

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

from sftlab.errors import SftlabError
from sftlab.infer.engine import Done, Failed, InferenceModel, SamplingParams, TextStream, Token, template_errors

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
    history: list[tuple[str, str]] = field(default_factory=list)  # user / assistant turns
    last_finish_reason: str | None = None

    @classmethod
    def load(cls, model_or_run: str, template: str | None = None, **kwargs) -> "ChatSession":
        return cls(InferenceModel.load(model_or_run, template, max_batch_size=1, batch_window_ms=0), **kwargs)

    def messages(self) -> list[dict]:
        """The conversation as OpenAI chat messages (system first, when set)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": role, "content": content} for role, content in self.history]

    def prompt(self, user_text: str | None = None) -> str:
        """The exact prompt text the model is given for the next reply."""
        turns = [(m["role"], m["content"]) for m in self.messages()]
        if user_text is not None:
            turns.append(("user", user_text))
        return self.inference.chat_prompt(turns)

    def reset(self) -> None:
        self.history.clear()

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n")
        return path

    def send(self, user_text: str) -> Iterator[str]:
        """Yield the reply's text as it is generated; the turn joins the history when it ends.

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
        stream = TextStream(self.inference.tokenizer, self.inference.stop_strings)
        self.history.append(("user", user_text))
        reply, started, failed = "", False, False
        self.last_finish_reason = None
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
                if delta:
                    reply += delta
                    yield delta
                if stream.stopped:
                    self.last_finish_reason = "stop"
                    break
        finally:
            events.close()
            if failed:  # the failed turn is not part of the conversation
                self.history.pop()
            else:
                self.history.append(("assistant", reply.rstrip()))


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
        _print(out, "assistant> ", end="")
        replies += 1
        deltas = session.send(text)
        try:
            for delta in deltas:
                out.write(delta)
                out.flush()
        except ChatError as exc:
            _print(out, f"(error: {exc})")
            continue
        except KeyboardInterrupt:
            deltas.close()
            _print(out, " [interrupted]")
            continue
        suffix = " [max tokens]" if session.last_finish_reason == "length" else ""
        _print(out, suffix)
    return replies
