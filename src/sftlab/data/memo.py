"""Remembered results of slow, pure computations over files, keyed by the files' stat signature.

Hashing a 2 GB data file or loading a tokenizer only to learn the data cache's key costs
seconds; a second `sftlab prepare` of the same inputs should not pay them. A memo entry is one
small JSON file under ``$SFTLAB_HOME/cache/memo/``, named by a hash of what it answers for
(kind, paths, and each file's size, modification time in nanoseconds and inode) — the same
signature `make` and `rsync` trust. A file rewritten in place keeps its inode but gets a new
mtime, so it is hashed again. One file per entry: concurrent writers never lose each other's
entries, and a torn or unreadable entry is just recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _memo_dir() -> Path:
    from sftlab.paths import sftlab_home

    return sftlab_home() / "cache" / "memo"


def file_signature(path: str | Path) -> list:
    """[path, size, mtime_ns, inode] of a file; of a folder, the signature of each file in it."""
    path = Path(path)
    if path.is_dir():
        return [str(path.resolve()), [file_signature(p) for p in sorted(path.iterdir()) if p.is_file()]]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def _entry(kind: str, signature: Any) -> Path:
    name = hashlib.sha256(json.dumps([kind, signature], sort_keys=True, default=str).encode()).hexdigest()[:32]
    return _memo_dir() / f"{kind}-{name}.json"


def recall(kind: str, signature: Any) -> Any | None:
    try:
        return json.loads(_entry(kind, signature).read_text())["value"]
    except (OSError, ValueError, KeyError):
        return None


def remember(kind: str, signature: Any, value: Any) -> None:
    path = _entry(kind, signature)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"kind": kind, "value": value}))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the value is just computed again next time
        pass


def memoized(kind: str, signature: Any, compute: Callable[[], Any]) -> Any:
    value = recall(kind, signature)
    if value is None:
        value = compute()
        remember(kind, signature, value)
    return value
