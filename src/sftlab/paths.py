"""Where sftlab keeps what it makes once and reuses: $SFTLAB_HOME (default ~/.cache/sftlab).

    models/NAME        registry models converted from GGUF (`sftlab models pull`)
    cache/data/KEY     token stores of prepared data (sftlab.data.store), by content key
    cache/memo/        remembered file digests and cache keys (sftlab.data.memo)
"""

from __future__ import annotations

import os
from pathlib import Path


def sftlab_home() -> Path:
    return Path(os.environ.get("SFTLAB_HOME", Path.home() / ".cache" / "sftlab")).expanduser()
