"""Show examples token by token with the trained tokens highlighted (terminal and HTML)."""

from __future__ import annotations

import html
from pathlib import Path

from rich.text import Text

from sftlab.data.tokenize import IGNORE_INDEX, Example


def token_pieces(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text of each token, is it trained) — decoded one token at a time."""
    return [(tokenizer.decode([tid]), label != IGNORE_INDEX)
            for tid, label in zip(example.input_ids, example.labels)]


KINDS = ("tools", "tool_calls", "parallel_tool_calls", "tool_results", "reasoning", "untrained_turns", "views")


def rows_of_kind(config, examples, kind: str, n: int) -> list[Example]:
    """Every sequence (the row and its views) of the first `n` training rows of a kind: a feature
    of the row (see sftlab.data.formats.conversation_kinds), or `views` (rows with a turn trained
    in a view of its own)."""
    from sftlab.data.formats import conversation_kinds
    from sftlab.data.prepare import load_conversations
    from sftlab.errors import SftlabError

    if kind not in KINDS:
        raise SftlabError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    sources = [example.source for example in examples]
    row_of = [source.split(" · ")[0] for source in sources]
    if kind == "views":
        wanted = {row for row, source in zip(row_of, sources) if row != source}
    else:
        wanted = set()
        for source in config.data:
            loaded = load_conversations(source, "skip")
            wanted |= {c.source for c in loaded.conversations if kind in conversation_kinds(c)}
    picked, out = [], []
    for index, row in enumerate(row_of):
        if row in wanted and (row in picked or len(picked) < n):
            if row not in picked:
                picked.append(row)
            out.append(examples[index])
    return out


def to_rich(example: Example, tokenizer) -> Text:
    text = Text()
    for piece, trained in token_pieces(example, tokenizer):
        text.append(piece, style="bold black on green" if trained else "dim")
    return text


def to_html(examples: list[Example], tokenizer, title: str = "sftlab inspect") -> str:
    rows = []
    for example in examples:
        spans = "".join(
            f'<span class="{"t" if trained else "p"}">{html.escape(piece)}</span>'
            for piece, trained in token_pieces(example, tokenizer)
        )
        rows.append(
            f"<section><h3>{html.escape(example.source)}</h3><p class=meta>{len(example)} tokens, "
            f"{example.trained_token_count} trained{', truncated' if example.truncated else ''}</p>"
            f"<pre>{spans}</pre></section>"
        )
    style = ("body{font-family:sans-serif;max-width:60rem;margin:auto}pre{white-space:pre-wrap;"
             "font-size:14px;line-height:1.6}.t{background:#b7f0b1;outline:1px solid #7ccf74}"
             ".p{color:#666}.meta{color:#444;font-size:13px}")
    legend = '<p><span class="t">trained tokens</span> · <span class="p">masked (label -100)</span></p>'
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
            f"<h1>{html.escape(title)}</h1>{legend}{''.join(rows)}")


def write_html(examples: list[Example], tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(examples, tokenizer), encoding="utf-8")
    return path
