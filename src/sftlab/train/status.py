"""A run's state on disk (OUTPUT_DIR/status.json), so anything can tell what a run is doing.

Training writes ``running`` (with its pid, host and step count) when it starts, then
``finished``, ``interrupted`` (stopped by a signal at a checkpoint) or ``failed`` (with the
error). :func:`run_state` reads it back and checks it against the world: a ``running`` run whose
process is gone was killed, and is ``interrupted`` when a checkpoint can resume it, else
``failed``. Runs made before this file existed are judged by their folders. No torch here:
``sftlab ui`` lists runs without importing it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

STATUS_FILE = "status.json"
MANIFEST = "manifest.json"  # a checkpoint's file list with checksums, written last (sftlab.train.checkpoint)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunStatus:
    """Writes status.json for one run (a no-op off the main rank)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(output_dir) / STATUS_FILE, enabled
        self.fields: dict = {}

    def write(self, state: str, **fields) -> None:
        if not self.enabled:
            return
        self.fields.update(fields, state=state, updated=_now())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.fields, indent=2))
        os.replace(tmp, self.path)

    def running(self, resume: bool) -> None:
        self.write("running", pid=os.getpid(), host=socket.gethostname(), started=_now(), resumed=resume,
                   error=None, interrupted_by=None)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders (complete or not), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _complete_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints whose save finished (their manifest is written last)."""
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir) if (p / MANIFEST).is_file()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (a child not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def run_state(run_dir: str | Path) -> dict:
    """{'state', 'detail', 'resumable', 'checkpoints', ...status.json} for a run folder."""
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    checkpoints = _complete_checkpoint_steps(run_dir)
    finished = (run_dir / "final" / "sftlab.json").is_file()
    state, detail = saved.get("state"), saved.get("error") or ""
    if state == "running":
        here = saved.get("host") in (None, socket.gethostname())
        if here and not _alive(int(saved.get("pid", 0))):
            state = "interrupted" if checkpoints else "failed"
            detail = "the training process ended without saying why (killed?)"
    elif state == "interrupted":
        detail = f"stopped by {saved.get('interrupted_by') or 'a signal'} at a checkpoint"
    elif state is None:  # a run from before status.json, or an exported model
        recent = [p for p in (run_dir / "metrics.jsonl", run_dir / "train.log")
                  if p.is_file() and time.time() - p.stat().st_mtime < 120]
        if (run_dir / "sftlab.json").is_file():
            state, detail = "exported", "a model folder (sftlab export): chat and eval work on it"
        elif finished:
            state = "finished"
        elif recent:  # being written: training (or `sftlab ui` starting it)
            state = "running"
        elif checkpoints:
            state = "interrupted"
        else:
            state = "unknown"
    return {**saved, "state": state, "detail": detail, "checkpoints": checkpoints,
            "resumable": state in ("interrupted", "failed") and bool(checkpoints)}
