"""read -> format -> template -> tokenize + mask -> cache, with a data report that counts every row.

No row disappears silently: each one is kept, or dropped under a named reason that the report
counts (with its file:line). With `on_error: raise` a malformed row stops the run with its
location; with `skip` it is dropped and counted. Tokenized data is cached under
$SFTLAB_HOME/cache/data, keyed by the content of the inputs, the tokenizer, the template,
max_length and every option that changes the result, so a second run reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sftlab.config import DataSource, RunConfig
from sftlab.data import memo
from sftlab.data.formats import FORMATS, Conversation, FormatOptions, conversation_kinds, detect_format
from sftlab.data.readers import DataError, read_rows
from sftlab.data.store import StoreView, StoreWriter, TokenStore
from sftlab.data.templates import (
    JinjaTemplate, TemplateConsistencyError, TemplateError, check_consistency, get_template, template_fingerprint,
)
from sftlab.data.tokenize import Dropped, TokenizedRow, tokenize_rows

TOKENIZE_BATCH = 256  # the fast tokenizer is much quicker on batches than on single texts
CONSISTENCY_SAMPLE = 8  # rows per source whose inference prompts are checked token by token
CACHE_FORMAT = 7  # bump when the cached layout or the preparation logic changes (6: numpy splits; 7: agent rows, views)
# the run config keys that change the prepared data (part of the cache key)
KEY_OPTIONS = frozenset({"max_length", "train_on", "on_error", "drop_leading_assistant", "merge_consecutive_roles",
                         "drop_trailing_user", "drop_duplicates", "val_fraction", "seed", "template_kwargs",
                         "train_reasoning", "train_empty_think", "special_tokens_in_content"})
ROW_KINDS = ("tools", "tool_calls", "parallel_tool_calls", "tool_results", "reasoning", "untrained_turns")
REPORT_DROPPED = 1000  # dropped rows listed in the report (all of them are in the store's dropped.jsonl)


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


def _convert_row(row, fmt: str | None, options: FormatOptions, on_error: str) -> tuple[str | None, Conversation | Dropped]:
    """(the format, as given or detected, and the row's conversation or Dropped); with
    on_error "raise" a malformed row raises DataError with its location."""
    try:
        if row.error is not None:
            raise row.error
        if fmt is None:
            fmt = detect_format(row, options)
        return fmt, FORMATS[fmt](row, options)
    except DataError as exc:
        if on_error == "raise":
            hint = "(set `on_error: skip` to drop such rows and count them instead)"
            raise DataError(f"{exc}\n{hint}", exc.reason) from None
        return fmt, Dropped(row.source, exc.reason, str(exc))


def load_conversations(source: DataSource, on_error: str = "raise", options: FormatOptions | None = None) -> Loaded:
    """The conversations of one data source (streamed row by row), its dropped rows and counts."""
    options = options or FormatOptions(fields=dict(source.fields))
    fmt = None if source.format == "auto" else source.format
    conversations, dropped, rows_read = [], [], 0
    for row in read_rows(source.path, source.split):
        rows_read += 1
        fmt, item = _convert_row(row, fmt, options, on_error)
        (dropped if isinstance(item, Dropped) else conversations).append(item)
    return Loaded(conversations, dropped, rows_read, fmt or "unknown")


class Histogram:
    """Counts of non-negative integers (token lengths, turns): exact percentiles in memory that
    does not grow with the number of rows."""

    def __init__(self):
        self.counts = np.zeros(64, dtype=np.int64)

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.int64)
        if len(values) == 0:
            return
        top = int(values.max())
        if top >= len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(max(top + 1, 2 * len(self.counts)) - len(self.counts), np.int64)])
        self.counts += np.bincount(values, minlength=len(self.counts))

    def merge(self, other: Histogram) -> None:
        if len(other.counts) > len(self.counts):
            self.counts, other_counts = other.counts.copy(), self.counts
        else:
            other_counts = other.counts
        self.counts[: len(other_counts)] += other_counts

    def percentiles(self) -> dict:
        """Of the sorted values: min, max and the value at rank round(q * (n - 1)) for q = .5, .9, .99."""
        n = int(self.counts.sum())
        if n == 0:
            return {}
        cumulative = np.cumsum(self.counts)
        at = lambda rank: int(np.searchsorted(cumulative, rank + 1))
        pick = lambda q: at(min(n - 1, int(q * (n - 1) + 0.5)))
        return {"min": at(0), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": at(n - 1)}


# Counters of the views that train turns in their own context (see sftlab.data.templates).
VIEW_COUNTS = ("rows_with_turn_views", "turn_view_sequences", "turn_view_tokens", "turn_views_truncated_away",
               "empty_think_masked", "reasoning_masked")


@dataclass
class SourceReport:
    path: str
    split: str
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    rows_used: int = 0  # after weight / max_rows sampling (repeats counted)
    sequences: int = 0  # kept sequences: a row and its further views
    dropped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    truncated: int = 0
    lost_end_token: int = 0
    boundary_merged: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: Histogram = field(default_factory=Histogram)
    prompt_lengths: Histogram = field(default_factory=Histogram)
    trained_lengths: Histogram = field(default_factory=Histogram)
    turns: Histogram = field(default_factory=Histogram)
    roles: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)  # rows with tools, tool calls, ... (ROW_KINDS)
    special_text: int = 0  # rows whose text spells a control token (see sftlab.data.special)
    views: Counter = field(default_factory=Counter)  # VIEW_COUNTS

    def add_conversations(self, conversations: list[Conversation]) -> None:
        self.turns.add([sum(m.role in ("user", "assistant") for m in c.messages) for c in conversations])
        for c in conversations:
            self.roles.update(m.role for m in c.messages)
            self.kinds.update(conversation_kinds(c))

    def add(self, results: list[TokenizedRow | Dropped]) -> None:
        lengths, trained_counts = [], []
        for item in results:
            if isinstance(item, Dropped):
                self.dropped[item.reason] += 1
                continue
            self.rows_kept += 1
            self.sequences += len(item.examples)
            self.truncated += any(e.truncated for e in item.examples) or item.views_truncated_away > 0
            self.lost_end_token += any(e.lost_end_token for e in item.examples)
            self.boundary_merged += any(e.boundary_merged for e in item.examples)
            if item.extra_views:
                self.views.update(rows_with_turn_views=1, turn_view_sequences=item.extra_views,
                                  turn_view_tokens=item.extra_view_tokens)
            self.views.update(turn_views_truncated_away=item.views_truncated_away,
                              empty_think_masked=item.empty_think_masked, reasoning_masked=item.reasoning_masked)
            lengths.append(item.tokens)
            trained_counts.append(item.trained_token_count)
        lengths, trained_counts = np.asarray(lengths, dtype=np.int64), np.asarray(trained_counts, dtype=np.int64)
        self.tokens += int(lengths.sum())
        self.trained_tokens += int(trained_counts.sum())
        self.lengths.add(lengths)
        self.trained_lengths.add(trained_counts)
        self.prompt_lengths.add(lengths - trained_counts)

    def merge(self, other: SourceReport) -> None:
        self.rows_read += other.rows_read
        self.dropped.update(other.dropped)
        self.duplicates += other.duplicates
        self.roles.update(other.roles)
        self.kinds.update(other.kinds)
        self.views.update(other.views)
        for name in ("rows_kept", "sequences", "truncated", "lost_end_token", "boundary_merged", "tokens",
                     "trained_tokens", "special_text"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("lengths", "prompt_lengths", "trained_lengths", "turns"):
            getattr(self, name).merge(getattr(other, name))

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
            "length_percentiles": self.lengths.percentiles(),
            "prompt_length_percentiles": self.prompt_lengths.percentiles(),
            "trained_length_percentiles": self.trained_lengths.percentiles(),
            "turns_percentiles": self.turns.percentiles(),
            "role_counts": dict(self.roles),
            "sequences": self.sequences,
            "rows_with_special_token_text": self.special_text,
            "agent_rows": {f"rows_with_{kind}": self.kinds.get(kind, 0) for kind in ROW_KINDS},
            "turn_views": {name: self.views.get(name, 0) for name in VIEW_COUNTS},
        }


@dataclass
class PreparedData:
    """The prepared splits, memory-mapped from the token store (see sftlab.data.store)."""

    train: StoreView
    val: StoreView
    report: dict
    samples: list[Conversation] = field(default_factory=list)  # rows for the train/inference check
    store: TokenStore | None = None
    _cleanup: object = None  # removes a temporary store (cache off) with this object

    @property
    def dropped(self) -> list[Dropped]:
        """Every dropped row, read from the store's dropped.jsonl."""
        return list(self.store.dropped()) if self.store else []

    def save_report(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=2))
        return path


def _sample(rows: np.ndarray, weight: float, max_rows: int | None, rng: np.random.Generator) -> np.ndarray:
    """Apply a row cap, then a weight (<1 subsamples, >1 repeats whole copies plus a sample);
    rows are store row numbers, drawn without replacement and kept in store order."""
    pick = lambda n: rows[np.sort(rng.choice(len(rows), n, replace=False))]
    if max_rows is not None and len(rows) > max_rows:
        rows = pick(max_rows)
    if weight == 1.0:
        return rows
    whole, fraction = int(weight), weight - int(weight)
    return np.concatenate([np.tile(rows, whole), pick(round(len(rows) * fraction))])


def _conversation_key(c: Conversation) -> int:
    """8 bytes a conversation for exact-duplicate detection (not the conversation itself)."""
    text = "\x1e".join(f"{m.role}{'' if m.trained or m.role != 'assistant' else '~'}\x1f{m.content}" for m in c.messages)
    if c.tools or any(len(m.to_tuple()) > 3 for m in c.messages):  # agent rows: calls, results, reasoning count too
        text += "\x1d" + json.dumps([c.to_json()[1:]], sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class DigestSet:
    """A set of 64-bit row digests in 8 bytes a row: a sorted numpy array, plus a small Python
    set of the newest digests merged into it every MERGE_EVERY additions."""

    MERGE_EVERY = 1 << 16

    def __init__(self):
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def __contains__(self, digest: int) -> bool:
        if digest in self.recent:
            return True
        at = int(np.searchsorted(self.sorted, np.uint64(digest)))
        return at < len(self.sorted) and int(self.sorted[at]) == digest

    def add(self, digest: int) -> bool:
        """Add the digest; False when it was already there."""
        if digest in self:
            return False
        self.recent.add(digest)
        if len(self.recent) >= self.MERGE_EVERY:
            merged = np.concatenate([self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))])
            merged.sort()
            self.sorted, self.recent = merged, set()
        return True

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)


# -- cache -------------------------------------------------------------------------------------

def _file_info(path: str) -> dict:
    """{"digest": sha256 of the file's bytes, "rows": its row count when cheap to know (else None)}.

    Memoized by the file's stat signature (sftlab.data.memo): a second prepare of a 2 GB file
    does not read it again. The row count (lines of an uncompressed .jsonl/.csv, counted in the
    same pass; a parquet file's metadata) gives the progress bar its ETA."""
    if path.startswith("hf:") or Path(path).is_dir():
        return {"digest": f"dataset:{path}", "rows": None}  # remote/streamed datasets are keyed by name
    return memo.memoized("file", memo.file_signature(path), lambda: _read_file_info(Path(path)))


def _read_file_info(path: Path) -> dict:
    digest, lines, last = hashlib.sha256(), 0, b"\n"
    suffix = path.suffix.lower()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    rows = None
    if suffix in (".jsonl", ".csv"):
        rows = lines + (last != b"\n") - (suffix == ".csv")  # a CSV's header is not a row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    return {"digest": digest.hexdigest(), "rows": rows}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(config: RunConfig, tokenizer, template) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "sources": [[s.model_dump(), _file_info(s.path)["digest"]] for s in config.data],
        "eval": [[s.model_dump(), _file_info(s.path)["digest"]] for s in config.eval_data],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": template_fingerprint(template),
        "options": config.model_dump(include=KEY_OPTIONS),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_dir(key: str, root: Path | None = None) -> Path:
    from sftlab.paths import sftlab_home

    return (root or sftlab_home() / "cache" / "data") / key


def _load_cache(folder: Path) -> PreparedData | None:
    """The store in `folder` when it is complete (its meta.json is written last)."""
    try:
        store = TokenStore(folder)
    except (OSError, ValueError, KeyError):
        return None
    meta = store.meta
    samples = [Conversation.from_json(item) for item in meta["samples"]]
    return PreparedData(store.split("train"), store.split("val"), meta["report"], samples, store)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a finished store into place (atomic); another process's complete entry wins."""
    if folder.exists():
        if _load_cache(folder) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(folder, ignore_errors=True)  # an unreadable entry: replaced
    try:
        tmp.rename(folder)  # a killed prepare never leaves a cache entry that looks complete
    except OSError:  # another process renamed the same entry into place first
        shutil.rmtree(tmp, ignore_errors=True)


# -- the stage ---------------------------------------------------------------------------------

def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]prepare[/] {task.description}"), BarColumn(bar_width=24),
        TextColumn("{task.completed:,.0f} rows"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), transient=True, disable=not enabled,
    )


def _known_rows(sources: list[DataSource]) -> int | None:
    """The rows of all sources when every file says (lines of .jsonl/.csv, parquet metadata)."""
    counts = [_file_info(str(s.path))["rows"] for s in sources]
    return None if any(c is None for c in counts) else sum(counts)


def _quick_signature(config: RunConfig) -> list | None:
    """Everything the cache key depends on, as stat signatures, without loading the tokenizer:
    the data files, the model folder (its tokenizer files), a custom template file, the library
    versions and the sftlab code that renders and keys the data. None when something is not a
    local file (a hub id or dataset): then the key is computed in full."""
    from importlib.metadata import version

    from sftlab.models.convert import resolve_model

    model = Path(resolve_model(config.model))
    sources = [*config.data, *config.eval_data]
    if not model.is_dir() or any(str(s.path).startswith("hf:") or Path(s.path).is_dir() for s in sources):
        return None
    code = [Path(__file__), Path(__file__).with_name("templates.py"), Path(__file__).parents[1] / "models" / "loading.py"]
    template = config.template
    return [
        CACHE_FORMAT, [version("transformers"), version("tokenizers")], [memo.file_signature(c) for c in code],
        memo.file_signature(model), template, memo.file_signature(template) if Path(template).is_file() else None,
        [[s.model_dump(), memo.file_signature(s.path)] for s in config.data],
        [[s.model_dump(), memo.file_signature(s.path)] for s in config.eval_data],
        config.model_dump(include=KEY_OPTIONS),
    ]


def prepare_data(config: RunConfig, tokenizer=None, use_cache: bool | None = None, cache_root: Path | None = None,
                 progress: bool = True) -> PreparedData:
    """Prepare the run's training and validation examples and the data report.

    Rows stream from the files through format -> template -> tokenize into a token store on
    disk (memory stays flat in the number of rows); the result is memory-mapped from it. The
    report's `cache` field says whether the store came from the cache ("hit") or was computed
    ("miss"); `cache_key` identifies the entry. `cache_root` replaces the shared cache folder (a
    distributed run with `cache: false` hands its data to the other ranks there).

    With `tokenizer=None` the model's tokenizer is loaded only when the store must be written:
    a cache hit is then found from the files' stat signatures alone (seconds, no torch import).
    """
    use_cache = config.cache if use_cache is None else use_cache
    quick = _quick_signature(config) if use_cache and tokenizer is None else None
    if quick is not None:
        remembered = memo.recall("cache-key", quick)
        cached = _load_cache(_cache_dir(remembered, cache_root)) if remembered else None
        if cached is not None:
            cached.report["cache"] = "hit"
            return cached
    if tokenizer is None:
        from sftlab.models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    template = get_template(config.template, tokenizer, config.template_kwargs or None, config.special_tokens_in_content)
    key = cache_key(config, tokenizer, template) if use_cache else None
    if quick is not None:
        memo.remember("cache-key", quick, key)
    folder = _cache_dir(key, cache_root) if key else None
    if folder is None:  # no cache: a temporary store, removed with the data
        tmp = Path(tempfile.mkdtemp(prefix="sftlab-store-"))
        try:
            _write_store(config, tokenizer, template, tmp, key, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        data = _load_cache(tmp)
        # removed with the store, which every view of it (data.train, data.val) keeps alive
        data._cleanup = weakref.finalize(data.store, shutil.rmtree, tmp, True)
        return data
    cached = _load_cache(folder)
    if cached is not None:
        cached.report["cache"] = "hit"
        return cached
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):  # one writer per entry; the others wait, then read
        cached = _load_cache(folder)
        if cached is not None:
            cached.report["cache"] = "hit"
            return cached
        partial = folder.parent / f".{folder.name}.partial"  # kept when killed: the next prepare resumes it
        try:
            resumed = _write_store(config, tokenizer, template, partial, key, progress)
        except (DataError, TemplateError):  # the data must change: nothing to resume
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _publish(partial, folder)
    data = _load_cache(folder)
    data.report["cache"] = "miss"
    data.report["resumed"] = resumed  # True: continued a prepare that was stopped midway
    return data


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


POOL_AFTER_ROWS = 20_000  # worker processes start once the data proves this big (spawning costs ~2 s)

_worker_state: dict = {}


class _BackendOnly:
    """What `tokenize_rendered` needs of a fast tokenizer: its Rust backend. A worker process
    given only this (the template renders without the tokenizer) never imports transformers
    or torch, and starts in a fraction of a second."""

    def __init__(self, backend):
        self.backend_tokenizer = backend


def _init_worker(tokenizer, template, options: dict) -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_state.update(tokenizer=tokenizer, template=template, **options)


def _pack(chunk: list[Conversation]) -> list:
    """Conversations as plain tuples: pickled to a worker about twice as fast as the dataclasses."""
    return [c.to_json() for c in chunk]


def _unpack(packed: list) -> list[Conversation]:
    return [Conversation.from_json(item) for item in packed]


ROW_TEMPLATE_ERRORS = (DataError, TemplateConsistencyError)  # a row the template cannot render as trained


def _row_error(exc: Exception, source: str, on_error: str) -> Dropped:
    """A row the template cannot render: raised with its location (on_error raise), or dropped."""
    if on_error == "raise":
        if isinstance(exc, DataError):
            raise DataError(f"{exc}\n(set `on_error: skip` to drop such rows and count them instead)", exc.reason) from None
        raise exc
    return Dropped(source, getattr(exc, "reason", "template_error"), str(exc))


def _render_options(config: RunConfig) -> dict:
    return {"train_reasoning": config.train_reasoning, "train_empty_think": config.train_empty_think}


def _render_and_tokenize(chunk: list, state: dict | None = None) -> list[TokenizedRow | Dropped]:
    if state is None:  # in a worker: the chunk came packed
        state, chunk = _worker_state, _unpack(chunk)
    results: list = [None] * len(chunk)
    rendered, kept = [], []
    for k, conversation in enumerate(chunk):
        try:
            rendered.append(state["template"].render(conversation, state["train_on"], **state["render"]))
            kept.append(k)
        except ROW_TEMPLATE_ERRORS as exc:
            results[k] = _row_error(exc, conversation.source, state["on_error"])
    tokenized = tokenize_rows(state["tokenizer"], rendered, [chunk[k].source for k in kept], state["max_length"])
    for k, item in zip(kept, tokenized):
        results[k] = item
    return results


class _ChunkTokenizer:
    """Renders and tokenizes chunks of conversations in order: in this process, or in num_proc
    worker processes once the data is big enough to pay for them. At most two chunks a worker
    are in flight, so memory does not grow with the data."""

    def __init__(self, tokenizer, template, config: RunConfig, num_proc: int):
        options = {"train_on": config.train_on, "max_length": config.max_length, "on_error": config.on_error,
                   "render": _render_options(config)}
        self.state = {"tokenizer": tokenizer, "template": template, **options}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        light = backend is not None and not isinstance(template, JinjaTemplate)  # Jinja renders with the tokenizer
        self.init_args = (_BackendOnly(backend) if light else tokenizer, template, options)
        self.num_proc, self.pool, self.pending = num_proc, None, []

    def submit(self, chunk: list[Conversation], rows_so_far: int) -> None:
        if self.pool is None and self.num_proc > 1 and rows_so_far >= POOL_AFTER_ROWS:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(self.num_proc, _init_worker, self.init_args)
        if self.pool is None:
            self.pending.append(_render_and_tokenize(chunk, self.state))
        else:
            self.pending.append(self.pool.apply_async(_render_and_tokenize, (_pack(chunk),)))

    def ready(self, drain: bool = False):
        """Results in submission order: all of them (drain), or while too many are in flight."""
        limit = 0 if drain else 2 * max(1, self.num_proc) if self.pool else 0
        while len(self.pending) > limit:
            item = self.pending.pop(0)
            yield item if isinstance(item, list) else item.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _num_proc(setting) -> int:
    import os

    return max(1, os.cpu_count() or 1) if setting == "auto" else int(setting)


PROGRESS = "progress.pkl"  # a partial store's checkpoint (see _Preparation)
CHECKPOINT_SECONDS = 60.0  # a killed prepare loses at most about this much work


class _Preparation:
    """Streams every source into a StoreWriter, row by row, keeping the report's running counts.

    Every CHECKPOINT_SECONDS, between chunks, it saves its state to PROGRESS in the store
    folder (written atomically): a prepare killed midway and run again resumes from there —
    the files are cut back to their checkpointed sizes and the rows already done are skipped
    (re-read, not re-tokenized) — and ends with the same store as an uninterrupted one."""

    SAVED = ("si", "rows_done", "reports", "report", "fmt", "checked", "first_row", "splits", "seen", "samples",
             "first_dropped", "rng", "total_rows", "total_tokens")

    def __init__(self, config: RunConfig, tokenizer, template, folder: Path, key: str | None, show: bool):
        self.config, self.tokenizer, self.template, self.folder, self.key, self.show = (
            config, tokenizer, template, folder, key, show)
        self.sources = [("train", s) for s in config.data] + [("val", s) for s in config.eval_data]
        saved = self._saved_progress()
        self.resumed = saved is not None
        if saved is None:
            self.si, self.rows_done, self.reports, self.report = 0, 0, [], None
            self.fmt, self.checked, self.first_row = None, 0, 0
            self.splits, self.seen, self.samples, self.first_dropped = {"train": [], "val": []}, DigestSet(), [], []
            self.rng, self.total_rows, self.total_tokens = np.random.default_rng(config.seed), 0, 0
        else:
            for name in self.SAVED:
                setattr(self, name, saved[name])
        self.writer = StoreWriter(folder, len(tokenizer), saved["writer"] if saved else None)
        self.workers = _ChunkTokenizer(tokenizer, template, config, _num_proc(config.num_proc))
        from sftlab.data.special import SpecialText, control_tokens

        self.special = SpecialText(control_tokens(tokenizer))  # counts control-token text whatever the mode
        self.chunk: list[Conversation] = []
        self.last_checkpoint = time.perf_counter()

    def _saved_progress(self) -> dict | None:
        import pickle

        try:
            with open(self.folder / PROGRESS, "rb") as handle:
                return pickle.load(handle)
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    def _checkpoint(self) -> None:
        import os
        import pickle

        self._flush(drain=True)
        state = {name: getattr(self, name) for name in self.SAVED}
        state["writer"] = self.writer.checkpoint()
        tmp = self.folder / (PROGRESS + ".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.folder / PROGRESS)
        self.last_checkpoint = time.perf_counter()

    def _drop(self, rows: list[Dropped]) -> None:
        self.writer.drop(rows)
        self.first_dropped.extend(rows[: max(0, REPORT_DROPPED - len(self.first_dropped))])

    def _flush(self, drain: bool = False) -> None:
        if self.chunk:
            self.report.add_conversations(self.chunk)
            self.workers.submit(self.chunk, self.total_rows)
            self.chunk = []
        for results in self.workers.ready(drain):
            self.report.add(results)
            kept = [e for r in results if isinstance(r, TokenizedRow) for e in r.examples]
            self.writer.add(kept)
            self._drop([r for r in results if isinstance(r, Dropped)])
            self.total_tokens += sum(len(e) for e in kept)

    def run(self) -> None:
        with _progress(self.show) as bar, contextlib.closing(self.workers):
            total = _known_rows([s for _, s in self.sources]) if self.show else None
            task = bar.add_task("", total=total, rate="")  # with no total: no ETA
            started, rows_at_start, tokens_at_start = time.perf_counter(), self.total_rows, self.total_tokens
            while self.si < len(self.sources):
                split, source = self.sources[self.si]
                if self.report is None:  # a source starts
                    self.report = SourceReport(path=str(source.path), split=split)
                    self.fmt = None if source.format == "auto" else source.format
                    self.checked, self.rows_done, self.first_row = 0, 0, self.writer.rows
                self.options = _format_options(self.config, source)
                bar.update(task, description=Path(str(source.path)).name)
                for index, row in enumerate(read_rows(source.path, source.split)):
                    if index < self.rows_done:  # done before a checkpoint this run resumes from
                        continue
                    self._row(row)
                    if len(self.chunk) >= TOKENIZE_BATCH:
                        self._flush()
                        now = time.perf_counter()
                        seconds = max(now - started, 1e-9)
                        bar.update(task, completed=self.total_rows,
                                   rate=f"{(self.total_rows - rows_at_start) / seconds:,.0f} rows/s, "
                                        f"{(self.total_tokens - tokens_at_start) / seconds:,.0f} tokens/s")
                        if self.key is not None and now - self.last_checkpoint > CHECKPOINT_SECONDS:
                            self._checkpoint()
                self._flush(drain=True)
                self._finish_source(split, source)

    def _row(self, row) -> None:
        config, report = self.config, self.report
        report.rows_read += 1
        self.rows_done += 1
        self.total_rows += 1
        self.fmt, conversation = _convert_row(row, self.fmt, self.options, config.on_error)
        if isinstance(conversation, Dropped):
            report.dropped[conversation.reason] += 1
            self._drop([conversation])
            return
        if self.special.in_conversation(conversation):
            report.special_text += 1
            if config.special_tokens_in_content == "drop_row":
                dropped = Dropped(conversation.source, "special_token_text",
                                  "the row's text spells a control token (special_tokens_in_content: drop_row)")
                report.dropped[dropped.reason] += 1
                self._drop([dropped])
                return
        # exact duplicates: always counted, dropped on request
        if not self.seen.add(_conversation_key(conversation)):  # an identical conversation came earlier
            report.duplicates += 1
            if config.drop_duplicates:
                report.dropped["duplicate"] += 1
                self._drop([Dropped(conversation.source, "duplicate", "an identical conversation came earlier")])
                return
        if self.checked < CONSISTENCY_SAMPLE:
            options = _render_options(config)
            try:
                self.template.render(conversation, config.train_on, **options)
            except ROW_TEMPLATE_ERRORS as exc:  # a row the template cannot render: not a sample
                dropped = _row_error(exc, conversation.source, config.on_error)
                report.dropped[dropped.reason] += 1
                self._drop([dropped])
                return
            self.checked += 1
            if all(m.role != "text" for m in conversation.messages):  # the Jinja text is what export writes
                self.template.check_jinja(conversation)
            if config.train_on != "all" and any(m.role == "assistant" for m in conversation.messages):
                check_consistency(self.template, self.tokenizer, conversation, config.train_on, **options)
                self.samples.append(conversation)
        self.chunk.append(conversation)

    def _finish_source(self, split: str, source: DataSource) -> None:
        config, report = self.config, self.report
        report.format = self.fmt or "unknown"
        # this source's kept conversations: the store row each starts at (its further views follow it)
        starts = self.writer.conversation_starts(self.first_row)
        conversations = np.arange(len(starts), dtype=np.int64)
        if split == "train" and not config.eval_data and config.val_fraction > 0 and len(starts):
            # a stable split per source: the same seed and data give the same held-out rows
            held = np.zeros(len(starts), dtype=bool)
            held[np.random.default_rng(config.seed).permutation(len(starts))[: max(1, round(len(starts) * config.val_fraction))]] = True
            self.splits["val"].append(_store_rows(starts, conversations[held], self.writer.rows))
            conversations = conversations[~held]
        if split == "train":
            conversations = _sample(conversations, source.weight, source.max_rows, self.rng)
        report.rows_used = len(conversations)
        self.splits[split].append(_store_rows(starts, conversations, self.writer.rows))
        self.reports.append(report)
        self.report, self.si = None, self.si + 1

    def finish(self) -> None:
        train, val = (np.concatenate([np.zeros(0, np.int64), *self.splits[name]]) for name in ("train", "val"))
        if not len(train):
            raise DataError("no training rows are left after preparation; see the data report for the reasons", "empty")
        total = SourceReport(path="(all)", split="all")
        for r in self.reports:
            total.merge(r)
        total.rows_used = self.writer.conversation_count(train) + self.writer.conversation_count(val)
        report = {
            "template": self.template.name,
            "train_on": self.config.train_on,
            "max_length": self.config.max_length,
            "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
            "sources": [r.as_dict() for r in self.reports],
            "total": total.as_dict(),
            "split": {"train_rows": self.writer.conversation_count(train), "val_rows": self.writer.conversation_count(val),
                      "train_sequences": len(train), "val_sequences": len(val),
                      "train_trained_tokens": self.writer.trained_tokens(train)},
            "dropped_rows": [{"source": d.source, "reason": d.reason, "detail": d.detail} for d in self.first_dropped],
            "cache": "miss" if self.key else "off",
            "cache_key": self.key,
        }
        meta = {"report": report, "samples": [c.to_json() for c in self.samples]}
        for name in (PROGRESS, PROGRESS + ".tmp"):
            (self.folder / name).unlink(missing_ok=True)
        self.writer.finish(train, val, meta)


def _store_rows(starts: np.ndarray, conversations: np.ndarray, end: int) -> np.ndarray:
    """The store rows of the chosen conversations (each with its further views), in order."""
    if not len(conversations):
        return np.zeros(0, dtype=np.int64)
    ends = np.append(starts[1:], end)
    first, count = starts[conversations], (ends - starts)[conversations]
    if np.all(count == 1):
        return first
    offsets = np.repeat(np.cumsum(count) - count, count)
    return np.repeat(first, count) + (np.arange(int(count.sum())) - offsets)


def _write_store(config: RunConfig, tokenizer, template, folder: Path, key: str | None, show: bool) -> bool:
    """Prepare into `folder` (resuming a killed prepare found there); True when it resumed."""
    preparation = _Preparation(config, tokenizer, template, folder, key, show)
    preparation.run()
    preparation.finish()
    return preparation.resumed
