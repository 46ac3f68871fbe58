"""`sftlab train CONFIG --nproc N`: torchrun started for the user, on this machine.

The workers run `python -m sftlab train CONFIG ...` exactly as under a hand-written torchrun
command. A signal to this launcher (Ctrl-C, SIGTERM) is passed straight to the workers, so each
finishes its step and saves a checkpoint; torchrun's own agent would instead kill them 30 s
after a signal, whatever they were doing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "sftlab", "train", *train_args]


def run_torchrun(nproc: int, train_args: list[str]) -> int:
    import psutil

    env = dict(os.environ)
    # N processes share the cores (torchrun would give each a single thread)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, train_args), env=env, start_new_session=True)

    def forward(signum, frame):
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
