"""What a run reports while it trains: metrics.jsonl, TensorBoard and the progress bar (rank 0).

Step records keep their loss as a device tensor until the next log point, so logging is the
only place the loop waits for the device."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


class RunLog:
    def __init__(self, output_dir: Path, console: Console, enabled: bool, start_step: int, total_steps: int):
        self.enabled, self.console = enabled, console
        self.path = output_dir / "metrics.jsonl"
        self.pending: list[dict] = []
        self.input_tokens, self.started = 0, time.perf_counter()
        self.last_loss, self.shown_val = None, "-"
        self.tensorboard = None
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(), console=console, transient=False, disable=not enabled,
        )
        if not enabled:
            return
        if start_step and self.path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not start_step:
            self.path.write_text("")
        self.tensorboard = _tensorboard(output_dir)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-",
                                           tps="-", val="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        if self.tensorboard:
            self.tensorboard.close()

    def record(self, step_record: dict, input_tokens: int) -> None:
        """A finished step; loss and grad_norm may still be device tensors."""
        self.input_tokens += input_tokens
        self.pending.append(step_record)

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.input_tokens / elapsed if elapsed > 0 else 0.0

    def flush(self, step: int, val_loss: float | None = None) -> None:
        """Write the pending step records (the one host-device sync) and refresh the bar."""
        if not self.pending:
            return
        elapsed = time.perf_counter() - self.started
        tokens_per_second = self.input_tokens / elapsed
        for record in self.pending:
            record["loss"] = float(record["loss"])
            record["grad_norm"] = float(record["grad_norm"])
            record["tokens_per_second"] = round(tokens_per_second, 2)
            record["elapsed_s"] = round(elapsed, 2)
            if record["step"] == step and val_loss is not None:
                record["val_loss"] = val_loss
        self.last_loss = self.pending[-1]["loss"]
        if self.enabled:
            with self.path.open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in self.pending)
            if self.tensorboard:
                for r in self.pending:
                    self.tensorboard.add_scalar("train/loss", r["loss"], r["step"])
                    self.tensorboard.add_scalar("train/learning_rate", r["learning_rate"], r["step"])
                    if "val_loss" in r:
                        self.tensorboard.add_scalar("val/loss", r["val_loss"], r["step"])
        if val_loss is not None:
            self.shown_val = f"{val_loss:.4f}"
        if self.enabled:
            self.progress.update(self.task, loss=f"{self.last_loss:.4f}", lr=f"{self.pending[-1]['learning_rate']:.2e}",
                                 tps=f"{tokens_per_second:.0f}", val=self.shown_val)
        self.pending = []

    def advance(self, step: int) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step)

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)
