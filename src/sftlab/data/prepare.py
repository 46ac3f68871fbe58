"""read -> format -> template -> tokenize + mask -> cache, with a data report that counts every row.

No row disappears silently: each one is kept, or dropped under a named reason that the report
counts (with its file:line). With `on_error: raise` a malformed row stops the run with its
location; with `skip` it is dropped and counted. Tokenized data is cached under
$SFTLAB_HOME/cache/data, keyed by the content of the inputs, the tokenizer, the template,
max_length and every option that changes the result, so a second run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sftlab.config import DataSource, RunConfig
from sftlab.data.formats import FORMATS, Conversation, FormatOptions, Message, detect_format
from sftlab.data.readers import DataError, read_rows
from sftlab.data.templates import check_consistency, get_template, template_fingerprint
from sftlab.data.tokenize import Dropped, Example, tokenize_rendered

TOKENIZE_BATCH = 256  # the fast tokenizer is much quicker on batches than on single texts
CONSISTENCY_SAMPLE = 8  # rows per source whose inference prompts are checked token by token
CACHE_FORMAT = 4  # bump when the cached layout or the preparation logic changes


def _format_options(config: RunConfig, source: DataSource) -> FormatOptions:
    return FormatOptions(
        fields=dict(source.fields), drop_leading_assistant=config.drop_leading_assistant,
        merge_consecutive_roles=config.merge_consecutive_roles, drop_trailing_user=config.drop_trailing_user,
    )


class Loaded(NamedTuple):
    conversations: list[Conversation]
    dropped: list[Dropped]
    rows_read: int
    format: str  # as given, or as detected from the first readable row


def load_conversations(source: DataSource, on_error: str = "raise", options: FormatOptions | None = None) -> Loaded:
    """The conversations of one data source (streamed row by row), its dropped rows and counts."""
    options = options or FormatOptions(fields=dict(source.fields))
    fmt = None if source.format == "auto" else source.format
    conversations, dropped, rows_read = [], [], 0
    for row in read_rows(source.path, source.split):
        rows_read += 1
        try:
            if row.error is not None:
                raise row.error
            if fmt is None:
                fmt = detect_format(row, options)
            conversations.append(FORMATS[fmt](row, options))
        except DataError as exc:
            if on_error == "raise":
                hint = "(set `on_error: skip` to drop such rows and count them instead)"
                raise DataError(f"{exc}\n{hint}", exc.reason) from None
            dropped.append(Dropped(row.source, exc.reason, str(exc)))
    return Loaded(conversations, dropped, rows_read, fmt or "unknown")


def _percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    ordered = np.sort(np.asarray(values))
    pick = lambda q: int(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))])
    return {"min": int(ordered[0]), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": int(ordered[-1])}


@dataclass
class SourceReport:
    path: str
    split: str
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    rows_used: int = 0  # after weight / max_rows sampling (repeats counted)
    dropped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    truncated: int = 0
    lost_end_token: int = 0
    boundary_merged: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list = field(default_factory=list)
    prompt_lengths: list = field(default_factory=list)
    trained_lengths: list = field(default_factory=list)
    turns: list = field(default_factory=list)
    roles: Counter = field(default_factory=Counter)

    def add_conversations(self, conversations: list[Conversation]) -> None:
        for c in conversations:
            self.turns.append(sum(m.role in ("user", "assistant") for m in c.messages))
            self.roles.update(m.role for m in c.messages)

    def add(self, results: list[Example | Dropped]) -> None:
        for item in results:
            if isinstance(item, Dropped):
                self.dropped[item.reason] += 1
                continue
            self.rows_kept += 1
            self.truncated += item.truncated
            self.lost_end_token += item.lost_end_token
            self.boundary_merged += item.boundary_merged
            trained = item.trained_token_count
            self.tokens += len(item)
            self.trained_tokens += trained
            self.lengths.append(len(item))
            self.trained_lengths.append(trained)
            self.prompt_lengths.append(len(item) - trained)

    def as_dict(self) -> dict:
        return {
            "path": self.path, "split": self.split, "format": self.format,
            "rows_read": self.rows_read, "rows_kept": self.rows_kept, "rows_used": self.rows_used,
            "rows_dropped": sum(self.dropped.values()), "dropped_by_reason": dict(self.dropped),
            "duplicate_rows": self.duplicates,
            "rows_truncated": self.truncated, "rows_truncated_lost_end_token": self.lost_end_token,
            "rows_zero_trained_tokens": self.dropped.get("no_trained_tokens", 0) + self.dropped.get("response_truncated_away", 0),
            "rows_prompt_response_token_merged": self.boundary_merged,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "trained_share": round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0,
            "length_percentiles": _percentiles(self.lengths),
            "prompt_length_percentiles": _percentiles(self.prompt_lengths),
            "trained_length_percentiles": _percentiles(self.trained_lengths),
            "turns_percentiles": _percentiles(self.turns),
            "role_counts": dict(self.roles),
        }


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    dropped: list[Dropped]
    report: dict
    samples: list[Conversation] = field(default_factory=list)  # rows for the train/inference check

    def save_report(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=2))
        return path


def _sample(items: list, weight: float, max_rows: int | None, rng: random.Random) -> list:
    """Apply a row cap, then a weight (<1 subsamples, >1 repeats whole copies plus a sample)."""
    items = list(items)
    if max_rows is not None and len(items) > max_rows:
        items = rng.sample(items, max_rows)
    if weight == 1.0:
        return items
    whole, fraction = int(weight), weight - int(weight)
    return items * whole + rng.sample(items, round(len(items) * fraction))


def _conversation_key(c: Conversation) -> str:
    return hashlib.sha1(json.dumps([(m.role, m.content) for m in c.messages]).encode()).hexdigest()


def _tokenize(conversations, template, tokenizer, config, report, dropped) -> list[Example]:
    examples: list[Example] = []
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        chunk = conversations[start : start + TOKENIZE_BATCH]
        rendered = [template.render(c, config.train_on) for c in chunk]
        results = tokenize_rendered(tokenizer, rendered, [c.source for c in chunk], config.max_length)
        report.add(results)
        examples += [r for r in results if isinstance(r, Example)]
        dropped += [r for r in results if isinstance(r, Dropped)]
    return examples


# -- cache -------------------------------------------------------------------------------------

def _file_digest(path: str) -> str:
    if path.startswith("hf:") or Path(path).is_dir():
        return f"dataset:{path}"  # remote/streamed datasets are keyed by name
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(config: RunConfig, tokenizer, template) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "sources": [[s.model_dump(), _file_digest(s.path)] for s in config.data],
        "eval": [[s.model_dump(), _file_digest(s.path)] for s in config.eval_data],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": template_fingerprint(template),
        "options": config.model_dump(include={
            "max_length", "train_on", "on_error", "drop_leading_assistant", "merge_consecutive_roles",
            "drop_trailing_user", "drop_duplicates", "val_fraction", "seed",
        }),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_dir(key: str, root: Path | None = None) -> Path:
    from sftlab.models.registry import sftlab_home

    return (root or sftlab_home() / "cache" / "data") / key


def _pack(examples: list[Example]) -> dict:
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    return {
        "ids": np.concatenate([e.input_ids for e in examples]) if examples else np.zeros(0, np.int32),
        "labels": np.concatenate([e.labels for e in examples]) if examples else np.zeros(0, np.int32),
        "lengths": lengths,
        "flags": np.array([[e.truncated, e.boundary_merged, e.lost_end_token] for e in examples], dtype=bool).reshape(-1, 3),
    }


def _unpack(arrays, prefix: str, sources: list[str]) -> list[Example]:
    ids, labels, lengths, flags = (arrays[f"{prefix}_{k}"] for k in ("ids", "labels", "lengths", "flags"))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [Example(ids[s:e], labels[s:e], src, bool(f[0]), bool(f[1]), bool(f[2]))
            for s, e, src, f in zip(starts, ends, sources, flags)]


def _save_cache(folder: Path, data: PreparedData) -> None:
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    # a folder of this writer's own: two processes preparing the same data never mix their files
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    arrays = {f"{split}_{k}": v for split, examples in (("train", data.train), ("val", data.val))
              for k, v in _pack(examples).items()}
    np.savez(tmp / "examples.npz", **arrays)
    meta = {"report": data.report, "train_sources": [e.source for e in data.train],
            "val_sources": [e.source for e in data.val],
            "dropped": [[d.source, d.reason, d.detail] for d in data.dropped],
            "samples": [[c.source, [[m.role, m.content, m.trained] for m in c.messages]] for c in data.samples]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        if _load_cache(folder) is not None:  # another process wrote the same entry meanwhile: keep it
            shutil.rmtree(tmp)
            return
        shutil.rmtree(folder, ignore_errors=True)  # an unreadable entry: replaced
    try:
        tmp.rename(folder)  # a killed prepare never leaves a cache entry that looks complete
    except OSError:  # another process renamed the same entry into place first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(folder: Path) -> PreparedData | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "examples.npz") as arrays:
            train = _unpack(arrays, "train", meta["train_sources"])
            val = _unpack(arrays, "val", meta["val_sources"])
    except (OSError, ValueError, KeyError):
        return None
    samples = [Conversation(tuple(Message(*m) for m in messages), source) for source, messages in meta["samples"]]
    return PreparedData(train, val, [Dropped(*d) for d in meta["dropped"]], meta["report"], samples)


# -- the stage ---------------------------------------------------------------------------------

def prepare_data(config: RunConfig, tokenizer, use_cache: bool | None = None, cache_root: Path | None = None) -> PreparedData:
    """Prepare the run's training and validation examples and the data report.

    The report's `cache` field says whether the result came from the cache ("hit") or was
    computed ("miss"); `cache_key` identifies the entry. `cache_root` replaces the shared cache
    folder (a distributed run with `cache: false` hands its data to the other ranks there).
    """
    template = get_template(config.template, tokenizer)
    use_cache = config.cache if use_cache is None else use_cache
    key = cache_key(config, tokenizer, template) if use_cache else None
    if key is not None:
        cached = _load_cache(_cache_dir(key, cache_root))
        if cached is not None:
            cached.report["cache"] = "hit"
            return cached

    reports: list[SourceReport] = []
    dropped: list[Dropped] = []
    splits: dict[str, list[Example]] = {"train": [], "val": []}
    seen: set[str] = set()
    samples: list[Conversation] = []
    rng = random.Random(config.seed)
    sources = [("train", s) for s in config.data] + [("val", s) for s in config.eval_data]
    for split, source in sources:
        options = _format_options(config, source)
        conversations, bad_rows, rows_read, fmt = load_conversations(source, config.on_error, options)
        report = SourceReport(path=str(source.path), split=split, rows_read=rows_read, format=fmt)
        for row in bad_rows:
            report.dropped[row.reason] += 1
        dropped += bad_rows
        # exact duplicates: always counted, dropped on request
        unique = []
        for c in conversations:
            k = _conversation_key(c)
            if k in seen:
                report.duplicates += 1
                if config.drop_duplicates:
                    report.dropped["duplicate"] += 1
                    dropped.append(Dropped(c.source, "duplicate", "an identical conversation came earlier"))
                    continue
            seen.add(k)
            unique.append(c)
        for c in unique[:CONSISTENCY_SAMPLE]:
            if config.train_on != "all" and any(m.role == "assistant" for m in c.messages):
                check_consistency(template, tokenizer, c, config.train_on)
                samples.append(c)
        report.add_conversations(unique)
        examples = _tokenize(unique, template, tokenizer, config, report, dropped)
        if split == "train" and not config.eval_data and config.val_fraction > 0 and examples:
            # a stable split per source: the same seed and data give the same held-out rows
            order = list(range(len(examples)))
            random.Random(config.seed).shuffle(order)
            held = set(order[: max(1, round(len(examples) * config.val_fraction))])
            splits["val"] += [e for i, e in enumerate(examples) if i in held]
            examples = [e for i, e in enumerate(examples) if i not in held]
        if split == "train":
            examples = _sample(examples, source.weight, source.max_rows, rng)
        report.rows_used = len(examples)
        splits[split] += examples
        reports.append(report)

    train, val = splits["train"], splits["val"]
    if not train:
        raise DataError("no training rows are left after preparation; see the data report for the reasons", "empty")
    total = SourceReport(path="(all)", split="all")
    for r in reports:
        total.rows_read += r.rows_read
        total.dropped.update(r.dropped)
        total.duplicates += r.duplicates
        total.turns += r.turns
        total.roles.update(r.roles)
        for name in ("rows_kept", "truncated", "lost_end_token", "boundary_merged", "tokens", "trained_tokens"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        for name in ("lengths", "prompt_lengths", "trained_lengths"):
            getattr(total, name).extend(getattr(r, name))
    total.rows_used = len(train) + len(val)
    report = {
        "template": template.name,
        "train_on": config.train_on,
        "max_length": config.max_length,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "sources": [r.as_dict() for r in reports],
        "total": total.as_dict(),
        "split": {"train_rows": len(train), "val_rows": len(val),
                  "train_trained_tokens": int(sum(e.trained_token_count for e in train))},
        "dropped_rows": [{"source": d.source, "reason": d.reason, "detail": d.detail} for d in dropped[:1000]],
        "cache": "miss" if key else "off",
        "cache_key": key,
    }
    data = PreparedData(train, val, dropped, report, samples)
    if key is not None:
        _save_cache(_cache_dir(key, cache_root), data)
    return data
