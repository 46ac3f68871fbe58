"""The token store: prepared examples on disk as flat arrays, opened with ``np.memmap``.

A store is one folder (an entry of the data cache, or a run's temporary folder):

=====================  =============================================================================
``ids.bin``            every kept row's token ids, end to end (uint16 when the vocabulary fits, else uint32)
``trained.bin``        one byte a token: 1 where the token is trained (its label is its id), 0 where -100
``offsets.bin``        int64, rows + 1: row r is tokens ``offsets[r]:offsets[r+1]``
``trained_counts.bin`` int32 a row: its trained tokens (position 0 excluded, as the loss does)
``flags.bin``          uint8 a row: 1 truncated, 2 a token spans the prompt/response boundary, 4 lost its end token,
                       8 a further view of the conversation of the row before it (see sftlab.data.templates)
``sources.txt``        each row's provenance (``file:line``), one a line; ``source_offsets.bin`` indexes it
``train.bin``          int64 row numbers of the training split (in order; a row may repeat: ``weight``)
``val.bin``            int64 row numbers of the validation split
``dropped.jsonl``      every dropped row: source, reason, detail
``meta.json``          format version, dtypes and counts, the data report, the template-check samples
=====================  =============================================================================

Nothing is held per row in Python: a training run reads the lengths array, makes its batch plan
with numpy, and builds an :class:`Example` only for the rows of the batch it is about to run.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sftlab.data.tokenize import IGNORE_INDEX, Dropped, Example

STORE_FORMAT = 1
TRUNCATED, BOUNDARY_MERGED, LOST_END_TOKEN, CONTINUES = 1, 2, 4, 8


class StoreWriter:
    """Appends tokenized examples (and dropped rows) to a store folder, chunk by chunk; memory
    stays a few bytes a row (lengths, counts, flags) whatever the number of tokens."""

    FILES = ("ids.bin", "trained.bin", "sources.txt", "dropped.jsonl")

    def __init__(self, folder: Path, vocab_size: int, resume: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.id_dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
        self._lengths, self._counts, self._flags = array("q"), array("i"), array("B")
        self._source_ends = array("q")
        self._source_bytes = 0
        self.dropped_count = 0
        if resume is not None:  # a killed prepare: back to its last checkpoint, appending from there
            for name, size in zip(self.FILES, resume["sizes"]):
                with open(self.folder / name, "r+b") as handle:
                    handle.truncate(size)
            for name in ("_lengths", "_counts", "_flags", "_source_ends"):
                getattr(self, name).frombytes(resume[name])
            self._source_bytes, self.dropped_count = resume["source_bytes"], resume["dropped_count"]
        mode = "ab" if resume is not None else "wb"
        self._ids = open(self.folder / "ids.bin", mode)  # noqa: SIM115 - closed in finish()
        self._trained = open(self.folder / "trained.bin", mode)  # noqa: SIM115
        self._sources = open(self.folder / "sources.txt", mode)  # noqa: SIM115
        self._dropped = open(self.folder / "dropped.jsonl", mode.replace("b", ""), encoding="utf-8")  # noqa: SIM115

    def checkpoint(self) -> dict:
        """What a resumed writer needs: the files flushed to disk, their sizes, the row arrays."""
        handles = (self._ids, self._trained, self._sources, self._dropped)
        for handle in handles:
            handle.flush()
        return {"sizes": [h.tell() for h in handles], "source_bytes": self._source_bytes,
                "dropped_count": self.dropped_count,
                **{name: getattr(self, name).tobytes() for name in ("_lengths", "_counts", "_flags", "_source_ends")}}

    @property
    def rows(self) -> int:
        return len(self._lengths)

    def add(self, examples: list[Example]) -> None:
        if not examples:
            return
        ids = np.concatenate([e.input_ids for e in examples])
        labels = np.concatenate([e.labels for e in examples])
        self._ids.write(ids.astype(self.id_dtype).tobytes())
        self._trained.write((labels != IGNORE_INDEX).astype(np.uint8).tobytes())
        for e in examples:
            self._lengths.append(len(e))
            self._counts.append(e.trained_token_count)
            self._flags.append(TRUNCATED * e.truncated | BOUNDARY_MERGED * e.boundary_merged
                               | LOST_END_TOKEN * e.lost_end_token | CONTINUES * e.continues)
            line = e.source.replace("\n", " ").encode("utf-8") + b"\n"
            self._source_bytes += len(line)
            self._source_ends.append(self._source_bytes)
            self._sources.write(line)

    def conversation_starts(self, first_row: int) -> np.ndarray:
        """The store rows from `first_row` on that start a conversation (a row's further views
        follow it, flagged CONTINUES)."""
        flags = np.frombuffer(self._flags, dtype=np.uint8)[first_row:]
        return first_row + np.flatnonzero((flags & CONTINUES) == 0)

    def conversation_count(self, rows) -> int:
        """How many conversations these store rows hold (rows that start one)."""
        flags = np.frombuffer(self._flags, dtype=np.uint8)
        return int(np.count_nonzero(flags[np.asarray(rows, dtype=np.int64)] & CONTINUES == 0)) if len(rows) else 0

    def trained_tokens(self, rows: list[int]) -> int:
        counts = np.frombuffer(self._counts, dtype=np.int32)
        return int(counts[np.asarray(rows, dtype=np.int64)].sum()) if len(rows) else 0

    def drop(self, rows: list[Dropped]) -> None:
        for d in rows:
            self._dropped.write(json.dumps({"source": d.source, "reason": d.reason, "detail": d.detail}) + "\n")
        self.dropped_count += len(rows)

    def finish(self, train: Sequence[int], val: Sequence[int], meta: dict) -> None:
        for handle in (self._ids, self._trained, self._sources, self._dropped):
            handle.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self._lengths, dtype=np.int64), out=offsets[1:])
        offsets.tofile(self.folder / "offsets.bin")
        np.frombuffer(self._counts, dtype=np.int32).tofile(self.folder / "trained_counts.bin")
        np.frombuffer(self._flags, dtype=np.uint8).tofile(self.folder / "flags.bin")
        source_offsets = np.zeros(len(self._source_ends) + 1, dtype=np.int64)
        source_offsets[1:] = np.frombuffer(self._source_ends, dtype=np.int64)
        source_offsets.tofile(self.folder / "source_offsets.bin")
        np.asarray(train, dtype=np.int64).tofile(self.folder / "train.bin")
        np.asarray(val, dtype=np.int64).tofile(self.folder / "val.bin")
        info = {"store_format": STORE_FORMAT, "id_dtype": self.id_dtype.name, "rows": len(self._lengths),
                "tokens": int(offsets[-1]), "dropped": self.dropped_count, **meta}
        (self.folder / "meta.json").write_text(json.dumps(info))  # written last: the store is complete


class TokenStore:
    """A finished store, memory-mapped (read-only)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("store_format") != STORE_FORMAT:
            raise ValueError(f"{self.folder}: store format {self.meta.get('store_format')}, expected {STORE_FORMAT}")
        self.ids = self._map("ids.bin", self.meta["id_dtype"])
        self.trained = self._map("trained.bin", np.uint8)
        self.offsets = self._map("offsets.bin", np.int64)
        self.trained_counts = self._map("trained_counts.bin", np.int32)
        self.flags = self._map("flags.bin", np.uint8)
        self._source_offsets = None
        self._sources = None

    def _map(self, name: str, dtype) -> np.ndarray:
        path = self.folder / name
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def split(self, name: str) -> StoreView:
        return StoreView(self, np.fromfile(self.folder / f"{name}.bin", dtype=np.int64))

    def example(self, row: int) -> Example:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        ids = np.asarray(self.ids[start:end], dtype=np.int32)
        labels = np.where(self.trained[start:end] != 0, ids, IGNORE_INDEX).astype(np.int32)
        flags = int(self.flags[row])
        return Example(ids, labels, self.source(row), bool(flags & TRUNCATED), bool(flags & BOUNDARY_MERGED),
                       bool(flags & LOST_END_TOKEN), bool(flags & CONTINUES))

    def source(self, row: int) -> str:
        """A row's provenance, read from sources.txt only when asked."""
        if self._sources is None:
            self._source_offsets = self._map("source_offsets.bin", np.int64)
            self._sources = self._map("sources.txt", np.uint8)
        start, end = int(self._source_offsets[row]), int(self._source_offsets[row + 1]) - 1
        return bytes(self._sources[start:end]).decode("utf-8")

    def dropped(self) -> Iterator[Dropped]:
        with open(self.folder / "dropped.jsonl", encoding="utf-8") as handle:
            for line in handle:
                d = json.loads(line)
                yield Dropped(d["source"], d["reason"], d["detail"])


class StoreView(Sequence):
    """The examples of one split: a sequence of Example built on access, and a numpy array of
    their lengths for planning batches without touching the tokens."""

    def __init__(self, store: TokenStore, rows: np.ndarray):
        self.store, self.rows = store, rows
        offsets = store.offsets
        self.lengths = (offsets[rows + 1] - offsets[rows]) if len(rows) else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.store.example(int(r)) for r in self.rows[index]]
        return self.store.example(int(self.rows[index]))

    def __iter__(self) -> Iterator[Example]:
        for r in self.rows:
            yield self.store.example(int(r))
