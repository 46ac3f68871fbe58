"""Data-parallel scaling on this machine: 1 process with all the cores against N processes with
cores/N threads each (torchrun), DDP and FSDP2, at the same global batch and data.

For each run it reports trained-input tokens/s over the steps after the first, the losses
(which must agree: the same examples in every step), each process's peak RSS, and what each
rank holds of the weights, gradients and optimizer state (measured from its tensors: FSDP2's
share should be ~1/N of one process's).

    .venv/bin/python bench/scaling.py                                  # SmolLM2-135M, full FT
    .venv/bin/python bench/scaling.py --model PATH --rows 16 --steps 3 --max-length 128 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "bench" / "data" / "chat_pairs.jsonl"


def run_mode(mode: str, args, work: Path) -> dict:
    """One training run (single | ddp | fsdp) as users launch it; its metrics and summary."""
    import yaml

    cores = os.cpu_count() or 1
    procs = 1 if mode == "single" else args.nproc
    folder = work / mode
    folder.mkdir()
    config = {
        "model": args.model, "data": str(work / "rows.jsonl"), "template": "alpaca", "max_length": args.max_length,
        "method": args.method, "batch_size": args.batch, "gradient_accumulation_steps": args.nproc // procs,
        "max_steps": args.steps, "learning_rate": 2e-5, "warmup_ratio": 0, "lr_scheduler": "constant",
        "output_dir": str(folder / "run"), "logging_steps": 1, "seed": 0, "cache": True,
        "parallelism": "auto" if mode == "single" else mode, "gradient_checkpointing": args.gradient_checkpointing,
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs)), "PYTHONUNBUFFERED": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "sftlab", "train", "run.yaml"]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   "-m", "sftlab", "train", "run.yaml"]
    print(f"  {mode}: {procs} process(es) x {env['OMP_NUM_THREADS']} thread(s) ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "run" / "train_summary.json").read_text())
    timed = records[1:]  # the first step warms up (allocations, first reductions)
    seconds = timed[-1]["elapsed_s"] - records[0]["elapsed_s"]
    tokens = sum(r["input_tokens"] for r in timed)
    chosen = next((line for line in proc.stdout.splitlines() if line.startswith("parallelism:")), "")
    result = {"mode": mode, "processes": procs, "threads": int(env["OMP_NUM_THREADS"]), "wall_s": round(wall, 1),
              "tokens_per_s": tokens / seconds, "losses": [r["loss"] for r in records],
              "ranks": summary["memory"]["ranks"], "parallelism_line": chosen}
    held = summary["memory"]["ranks"][0]["held_mb"]
    print(f"    {result['tokens_per_s']:.1f} tok/s; rank 0 peak {summary['memory']['ranks'][0]['process_peak_mb']:.0f} MB, "
          f"holds {sum(held.values()):.0f} MB of weights+grads+optimizer", flush=True)
    return result


def markdown(results: list[dict], args, machine: str) -> str:
    base = results[0]
    lines = [f"Machine: {machine}", "",
             f"{Path(args.model).name}, {args.method} fine-tuning, {args.rows} rows, max_length {args.max_length}, "
             f"global batch {args.batch * args.nproc} ({args.batch} x {args.nproc}), {args.steps} steps "
             f"(tokens/s over steps 2-{args.steps}); `python bench/scaling.py`", "",
             "| run | processes x threads | tokens/s | vs 1 process | max loss diff vs 1 process | peak RSS per process (MB) "
             "| per rank: weights + grads + optimizer (MB) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        peaks = " / ".join(f"{x['process_peak_mb']:.0f}" for x in r["ranks"])
        held = " / ".join(f"{x['held_mb']['weights']:.0f} + {x['held_mb']['gradients']:.0f} + "
                          f"{x['held_mb']['optimizer']:.0f}" for x in r["ranks"])
        lines.append(f"| {r['mode']} | {r['processes']} x {r['threads']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {diff:.1e} | {peaks} | {held} |")
    lines += ["", *[f"- {r['mode']}: `{r['parallelism_line']}`" for r in results if r["parallelism_line"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="examples per micro-batch per process")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--modes", default="single,ddp,fsdp")
    parser.add_argument("--gradient-checkpointing", default="auto")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.data.read_text().splitlines()[: args.rows]]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = [run_mode(mode, args, work) for mode in args.modes.split(",")]
    text = markdown(results, args, machine)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"scaling-{stamp}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "machine": machine, "results": results}, indent=2))
    (args.out / f"scaling-{stamp}.md").write_text(text)
    (args.out / "scaling-latest.md").write_text(text)


if __name__ == "__main__":
    main()
