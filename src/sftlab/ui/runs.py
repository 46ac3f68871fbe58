"""What `sftlab ui` reads from a folder of runs: the list, each run's metrics, data and eval report.

A run is a folder with a config.yaml, metrics.jsonl or status.json (what `sftlab train` writes),
found up to three levels under the runs folder and named by its path inside it ("demo",
"sweep/lr-1e-4"). Everything here reads files; nothing writes into a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sftlab.data import memo
from sftlab.errors import SftlabError
from sftlab.train.status import run_state

MARKERS = ("config.yaml", "metrics.jsonl", "status.json", "train.log")  # train.log: started by the UI
MAX_DEPTH = 3
SKIP = {"final", "eval", "tensorboard", ".git", "__pycache__"}


class UIError(SftlabError):
    """A request the page cannot serve: the message is shown in the page as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def find_runs(root: Path) -> list[Path]:
    """Run folders under root (root itself when it is a run), sorted by name."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if _is_run(folder):
            found.append(folder)
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name not in SKIP and not child.name.startswith((".", "checkpoint-")):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def run_id(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return folder.name if rel == "." else rel


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).is_file() for m in MARKERS)


def resolve_run(root: Path, name: str | None) -> Path:
    """The folder of run `name` under root (root's own name when root is a run); a clear error when there is none."""
    if not name:
        raise UIError("no run given: pick one on the Runs page", 400)
    candidate = (root / name).resolve()
    if candidate != root and root not in candidate.parents:
        raise UIError(f"run '{name}' is outside the runs folder {root}", 404)
    if _is_run(candidate):
        return candidate
    if name == root.name and _is_run(root):
        return root
    raise UIError(f"no run '{name}' under {root} (a run folder has a config.yaml or metrics.jsonl)", 404)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_config(folder: Path) -> dict:
    from sftlab.config import ConfigError, load_yaml

    try:
        config = load_yaml((folder / "config.yaml").read_text(), str(folder / "config.yaml"))
    except (OSError, ConfigError):
        return {}
    return config if isinstance(config, dict) else {}


def read_metrics(folder: Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete metric lines from byte offset `start`: (records, the offset to read from next)."""
    path = folder / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            chunk = handle.read()
    except OSError:
        return [], 0
    if start and not chunk and path.stat().st_size < start:  # rewritten (a new run in the folder)
        return read_metrics(folder, 0)
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
    records = []
    for line in chunk[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records, start + end


def _data_names(config: dict) -> list[str]:
    data = config.get("data") or []
    items = data if isinstance(data, list) else [data]
    return [Path(str(item.get("path", "")) if isinstance(item, dict) else str(item)).name for item in items]


_METRIC_SUMMARIES: dict[str, tuple[list, dict, float | None]] = {}


def metrics_summary(folder: Path) -> tuple[dict, float | None]:
    """(the last metrics record, the lowest val_loss) of a run. The Runs page asks every few
    seconds for every run, so a file's summary is kept until its stat signature (size, mtime,
    inode) changes: a finished run's metrics.jsonl is read once, a running one's when it grows."""
    path = folder / "metrics.jsonl"
    try:
        key, *signature = memo.file_signature(path)
    except OSError:
        return {}, None
    known = _METRIC_SUMMARIES.get(key)
    if known is not None and known[0] == signature:
        return known[1], known[2]
    records, _ = read_metrics(folder)
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    value = (records[-1] if records else {}, min(val) if val else None)
    if len(_METRIC_SUMMARIES) >= 4096:
        _METRIC_SUMMARIES.clear()
    _METRIC_SUMMARIES[key] = (signature, *value)
    return value


def run_row(root: Path, folder: Path, state: dict | None = None) -> dict:
    """One line of the Runs table (`state`: the run's run_state, when the caller has it)."""
    config, summary = read_config(folder), _read_json(folder / "train_summary.json") or {}
    state = state or run_state(folder)
    last, lowest = metrics_summary(folder)
    best = summary.get("best_val_loss")
    if best is None:
        best = lowest
    metrics = folder / "metrics.jsonl"
    return {
        "id": run_id(root, folder),
        "path": str(folder),
        "state": state["state"], "detail": state["detail"], "resumable": state["resumable"],
        "model": config.get("model"), "method": config.get("method"), "template": config.get("template"),
        "data": _data_names(config),
        "step": last.get("step", 0), "total_steps": state.get("total_steps") or summary.get("steps"),
        "loss": last.get("loss"), "best_val_loss": best, "val_loss_before": summary.get("val_loss_before"),
        "tokens_per_second": last.get("tokens_per_second") or summary.get("tokens_per_second"),
        "has_eval": (folder / "eval" / "eval_report.json").is_file(),
        "has_final": any((f / "sftlab.json").is_file() for f in (folder, folder / "final")),
        "updated": max((p.stat().st_mtime for p in (metrics, folder / "status.json", folder / "config.yaml")
                        if p.is_file()), default=folder.stat().st_mtime),
    }


def eval_report(folder: Path) -> dict:
    report = _read_json(folder / "eval" / "eval_report.json")
    if report is None:
        raise UIError(f"run '{folder.name}' has no eval report yet: run `sftlab eval {folder}` to make one", 404)
    return report


def histogram(values: np.ndarray, bins: int = 24) -> dict:
    """Counts over equal-width bins: {'edges': [...bins+1], 'counts': [...bins]}."""
    if len(values) == 0:
        return {"edges": [], "counts": []}
    low, high = int(values.min()), int(values.max())
    counts, edges = np.histogram(values, bins=min(bins, max(1, high - low + 1)), range=(low, high + 1))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}
