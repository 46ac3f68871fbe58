"""Tool calling on held-out agent rows (`sftlab eval RUN --tool-calls FILE`).

Each row (OpenAI fine-tuning format, with its `tools`) is scored on its last assistant turn,
given the conversation before it: the model answers greedily, in the run's template with the
row's tools offered, and its reply is read back with the run's tool parser.

    | measure              | over                   | counts a row when                                      |
    |----------------------|------------------------|--------------------------------------------------------|
    | tool_call_accuracy   | every row              | it calls exactly the expected functions with the       |
    |                      |                        | expected arguments, or answers without a call when the |
    |                      |                        | row expects none                                       |
    | function_accuracy    | rows that expect calls | the functions called are the expected ones             |
    | arguments_accuracy   | rows that expect calls | and every call's arguments equal the expected ones as  |
    |                      |                        | JSON values ("5" is not 5)                              |
    | valid_call_rate      | replies that start a   | the call parses (JSON, a function name, an object of   |
    |                      | call                   | arguments)                                             |
    | no_call_accuracy     | rows that expect none  | the reply has no call                                  |

Parallel calls are compared as a multiset of (function, arguments).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sftlab.eval.errors import EvalError


def load_rows(path: str | Path) -> list:
    """The held-out agent conversations; each must end with an assistant turn (what is scored)."""
    from sftlab.config import DataSource
    from sftlab.data.prepare import load_conversations
    from sftlab.data.readers import DataError

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--tool-calls {path}: no such file (a .jsonl of OpenAI-format rows with tools)")
    try:
        conversations = load_conversations(DataSource(path=str(path)), "raise").conversations
    except DataError as exc:
        raise EvalError(f"--tool-calls: {exc}") from None
    if not conversations:
        raise EvalError(f"--tool-calls {path}: no rows")
    return conversations


def _canonical(call) -> tuple[str, str]:
    return call.name, json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)


def score(expected, reply, attempted: bool) -> dict:
    """One row: the expected last turn (a Message) against the parsed reply."""
    want, made = list(expected.tool_calls), list(reply.tool_calls)
    row = {"expects_call": bool(want), "called": bool(made), "attempted": attempted, "valid": bool(made) or not attempted,
           "expected": [{"name": c.name, "arguments": c.arguments} for c in want],
           "calls": [{"name": c.name, "arguments": c.arguments} for c in made], "content": reply.content}
    if not want:
        row["correct"] = not made
        return row
    row["function_correct"] = sorted(c.name for c in made) == sorted(c.name for c in want)
    row["arguments_correct"] = row["function_correct"] and Counter(map(_canonical, made)) == Counter(map(_canonical, want))
    row["correct"] = row["arguments_correct"]
    return row


def _share(rows: list[dict], key: str) -> float | None:
    return round(sum(bool(r[key]) for r in rows) / len(rows), 4) if rows else None


def summarize(rows: list[dict]) -> dict:
    calling = [r for r in rows if r["expects_call"]]
    plain = [r for r in rows if not r["expects_call"]]
    attempted = [r for r in rows if r["attempted"] or r["called"]]
    return {"rows": len(rows), "call_rows": len(calling), "no_call_rows": len(plain),
            "tool_call_accuracy": _share(rows, "correct"), "function_accuracy": _share(calling, "function_correct"),
            "arguments_accuracy": _share(calling, "arguments_correct"), "valid_call_rate": _share(attempted, "valid"),
            "no_call_accuracy": _share(plain, "correct")}


def evaluate(generator, conversations: list, parser_name: str, max_new_tokens: int, batch_size: int) -> dict:
    """A generator's tool calling on the rows: the summary and each row's reply and verdict."""
    from sftlab.infer.tools import parse_reply, parser_for

    parser = parser_for(parser_name)
    template = generator.template()
    prompts = [template.render_prompt(c) for c in conversations]
    texts = generator.complete(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               keep=parser.special_markers)
    rows = []
    for conversation, text in zip(conversations, texts):
        names = {t["function"]["name"] for t in conversation.tools} or None
        reply = parse_reply(text, parser, names)
        attempted = parser.call_start(text, final=True) < len(text) if parser_name != "none" else False
        rows.append({"source": conversation.source, "reply": text, **score(conversation.messages[-1], reply, attempted)})
    return {**summarize(rows), "responses": rows}
