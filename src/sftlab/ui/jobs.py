"""Training runs the UI starts: `sftlab train CONFIG` as a child process, stopped with SIGTERM.

The YAML the user wrote is saved beside the run (RUNS/NAME.yaml) and stays the source of truth:
the child trains from it, `--resume` continues from it, and the run folder's config.yaml is
what training resolved from it. The child's output goes to RUN/train.log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from sftlab.config import ConfigError, RunConfig, config_from_yaml
from sftlab.train.status import run_state
from sftlab.ui.runs import UIError, read_config

EXIT_WAIT_S = 30  # a stopped child still writing its summary gets this long to exit
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name or not set(name) <= NAME_CHARS or name.startswith("."):
        raise UIError(f"run name '{name}': use letters, digits, '-', '_' and '.' (e.g. my-run-1)")
    return name


def check_yaml(text: str, root: Path, where: str = "the config") -> RunConfig:
    """The config the YAML describes; an error names the key. Its output_dir must lie under root."""
    try:
        config = config_from_yaml(text, where, root)
    except ConfigError as exc:
        raise UIError(str(exc)) from None
    for key, sources in (("data", config.data), ("eval_data", config.eval_data or [])):
        for source in sources:
            if not source.path.startswith("hf:") and not Path(source.path).exists():
                raise UIError(f"{key}: {source.path} not found (a path on the machine running sftlab ui)")
    out = Path(config.output_dir).expanduser().resolve()
    if root not in out.parents:  # strictly inside: the runs folder itself is not a run
        raise UIError(f"output_dir: {config.output_dir} is not a folder inside the runs folder {root}; "
                      "the UI shows and controls runs inside it only")
    return config


class Jobs:
    """The children this UI started, by run folder (one live child per run)."""

    def __init__(self, root: Path):
        self.root = root
        self.children: dict[Path, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def _spawn(self, folder: Path, config_path: Path, resume: bool) -> subprocess.Popen:
        with self.lock:
            child = self.children.get(folder)
            if run_state(folder)["state"] == "running":
                raise UIError(f"run '{folder.name}' is already training")
            if child and child.poll() is None:  # it has saved and said so, and is exiting
                try:
                    child.wait(timeout=EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    raise UIError(f"run '{folder.name}' stopped but its process {child.pid} has not exited yet; "
                                  "try again in a moment") from None
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "ab")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "COLUMNS": "120"}
            args = [sys.executable, "-m", "sftlab", "train", str(config_path), *(["--resume"] if resume else [])]
            child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
            log.close()
            self.children[folder] = child
            return child

    def start(self, name: str, text: str) -> dict:
        """Save RUNS/NAME.yaml and train from it."""
        name = check_name(name)
        config_path = self.root / f"{name}.yaml"
        config = check_yaml(text, self.root, str(config_path))
        folder = Path(config.output_dir).expanduser().resolve()
        if (folder / "metrics.jsonl").is_file() and run_state(folder)["state"] != "unknown":
            raise UIError(f"{folder} already holds a run: choose another name, or resume that one")
        config_path.write_text(text if text.endswith("\n") else text + "\n")
        child = self._spawn(folder, config_path, resume=False)
        return {"pid": child.pid, "config": str(config_path), "output_dir": str(folder)}

    def config_of(self, folder: Path) -> Path:
        """The YAML a run trains from: RUNS/NAME.yaml when the UI wrote one, else its config.yaml."""
        beside = folder.parent / f"{folder.name}.yaml"
        if beside.is_file():
            return beside
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
        raise UIError(f"run '{folder.name}' has no config to resume from")

    def resume(self, folder: Path) -> dict:
        state = run_state(folder)
        if not state["resumable"]:
            raise UIError(f"run '{folder.name}' is {state['state']} with no checkpoint to resume from")
        if not read_config(folder):
            raise UIError(f"run '{folder.name}' has no readable config.yaml")
        child = self._spawn(folder, self.config_of(folder), resume=True)
        return {"pid": child.pid}

    def stop(self, folder: Path) -> dict:
        """SIGTERM: training finishes its step, saves a checkpoint and exits (resumable)."""
        child, state = self.children.get(folder), run_state(folder)
        if state["state"] != "running":
            raise UIError(f"run '{folder.name}' is not training ({state['state']})")
        if child is not None and child.poll() is None:
            pid = child.pid
        elif state.get("host") not in (None, socket.gethostname()):
            raise UIError(f"run '{folder.name}' trains on {state['host']}: stop it there (SIGTERM or Ctrl-C)")
        elif state.get("pid"):  # started elsewhere (a terminal) on this machine
            pid = int(state["pid"])
        else:
            raise UIError(f"run '{folder.name}' is starting: stop it in a moment")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise UIError(f"run '{folder.name}': its process {pid} is gone") from None
        return {"pid": pid, "signal": "SIGTERM"}

    def reap(self) -> None:
        for child in self.children.values():
            child.poll()

    def close(self) -> None:
        """Children keep training when the UI stops (they are their own sessions); just reap."""
        self.reap()
