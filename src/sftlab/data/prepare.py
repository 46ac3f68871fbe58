"""read -> format -> template -> tokenize + mask, with a data report that counts every row.

No row disappears silently: each one is kept, or dropped under a named reason that the report
counts (with its file:line). With `on_error: raise` a malformed row stops the run with its
location; with `skip` it is dropped and counted.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.config import DataSource, RunConfig
from sftlab.data.formats import FORMATS, Conversation
from sftlab.data.readers import DataError, read_rows
from sftlab.data.templates import get_template
from sftlab.data.tokenize import Dropped, Example, tokenize_rendered

TOKENIZE_BATCH = 512  # the fast tokenizer is much quicker on batches than on single texts


def load_conversations(source: DataSource, on_error: str = "raise") -> tuple[list[Conversation], list[Dropped], int]:
    """(conversations, dropped rows, rows read) for one data file."""
    to_conversation = FORMATS[source.format]
    conversations, dropped, rows_read = [], [], 0
    for row in read_rows(source.path):
        rows_read += 1
        try:
            conversations.append(to_conversation(row))
        except DataError as exc:
            if on_error == "raise":
                raise DataError(f"{exc}\n(set `on_error: skip` to drop such rows and count them instead)", exc.reason) from None
            dropped.append(Dropped(row.source, exc.reason, str(exc)))
    return conversations, dropped, rows_read


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


@dataclass
class SourceReport:
    path: str
    split: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    boundary_merged: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list = field(default_factory=list)
    trained_lengths: list = field(default_factory=list)

    def add(self, results: list[Example | Dropped]) -> None:
        for item in results:
            if isinstance(item, Dropped):
                self.dropped[item.reason] += 1
                continue
            self.rows_kept += 1
            self.truncated += item.truncated
            self.boundary_merged += item.boundary_merged
            self.tokens += len(item)
            self.trained_tokens += item.trained_token_count
            self.lengths.append(len(item))
            self.trained_lengths.append(item.trained_token_count)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "split": self.split,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "rows_truncated": self.truncated,
            "rows_truncated_lost_eos": self.truncated,  # truncation cuts from the end, so EOS goes first
            "rows_prompt_response_token_merged": self.boundary_merged,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_share": round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0,
            "length_percentiles": _percentiles(self.lengths),
            "trained_length_percentiles": _percentiles(self.trained_lengths),
        }


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    dropped: list[Dropped]
    report: dict
    conversations: dict = field(default_factory=dict)  # source -> Conversation, for inspect

    def save_report(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=2))
        return path


def _tokenize_source(conversations, template, tokenizer, max_length, report, dropped):
    examples: list[Example] = []
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        chunk = conversations[start : start + TOKENIZE_BATCH]
        rendered = [template.render(c) for c in chunk]
        results = tokenize_rendered(tokenizer, rendered, [c.source for c in chunk], max_length)
        report.add(results)
        examples += [r for r in results if isinstance(r, Example)]
        dropped += [r for r in results if isinstance(r, Dropped)]
    return examples


def prepare_data(config: RunConfig, tokenizer) -> PreparedData:
    """Prepare the run's training and validation examples and the data report."""
    template = get_template(config.template, tokenizer)
    reports: list[SourceReport] = []
    dropped: list[Dropped] = []
    conversations_by_source: dict[str, Conversation] = {}
    splits: dict[str, list[Example]] = {"train": [], "val": []}
    sources = [("train", s) for s in config.data] + [("val", s) for s in config.eval_data]
    for split, source in sources:
        conversations, bad_rows, rows_read = load_conversations(source, config.on_error)
        report = SourceReport(path=str(source.path), split=split, rows_read=rows_read)
        for row in bad_rows:
            report.dropped[row.reason] += 1
        dropped += bad_rows
        conversations_by_source.update((c.source, c) for c in conversations)
        splits[split] += _tokenize_source(conversations, template, tokenizer, config.max_length, report, dropped)
        reports.append(report)
    train, val = splits["train"], splits["val"]
    if not config.eval_data and config.val_fraction > 0 and train:
        # a stable split: the same seed and data give the same held-out rows
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        n_val = max(1, round(len(train) * config.val_fraction))
        held = set(order[:n_val])
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    if not train:
        raise DataError("no training rows are left after preparation; see the data report for the reasons", "empty")
    total = SourceReport(path="(all)", split="all")
    for r in reports:
        total.rows_read += r.rows_read
        total.dropped.update(r.dropped)
    total.add(train + val)
    report = {
        "template": config.template,
        "max_length": config.max_length,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "sources": [r.as_dict() for r in reports],
        "total": total.as_dict(),
        "split": {"train_rows": len(train), "val_rows": len(val),
                  "train_trained_tokens": sum(e.trained_token_count for e in train)},
        "dropped_rows": [{"source": d.source, "reason": d.reason, "detail": d.detail} for d in dropped[:1000]],
    }
    return PreparedData(train, val, dropped, report, conversations_by_source)
