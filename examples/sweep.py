"""A small hyper-parameter sweep: method x learning rate x epochs, each point trained and evaluated
with sftlab's own commands, then one table (held-out loss, instruction following, forgetting,
wall time).

    python examples/sweep.py examples/base-model.yaml --runs runs/sweep \\
        --point lora:2e-4:1 --point lora:2e-4:2 --point full:1e-5:1 --point full:2e-5:1

A point is METHOD:LEARNING_RATE:EPOCHS and trains into RUNS/METHOD-LR-EPOCHSep with
`sftlab train CONFIG --set ...`, then `sftlab eval` with the options of --eval (default: the
demo's 60 suite prompts, 64 new tokens, a 5% forgetting threshold). The base model's answers
are generated once for the whole sweep: `sftlab eval` reuses them (docs/eval.md).
Points already evaluated are not run again, and an interrupted training resumes, so the
command can be repeated until the table is complete. The table goes to RUNS/sweep.md and
the numbers to RUNS/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

EVAL = "--limit 60 --max-new-tokens 64 --side-by-side 0 --forgetting-threshold 0.05"


def point_name(method: str, lr: str, epochs: str) -> str:
    return f"{method}-{lr}-{epochs}ep"


def parse_point(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("full", "lora"):
        raise SystemExit(f"--point {text}: expected METHOD:LR:EPOCHS, e.g. lora:2e-4:1 (METHOD full or lora)")
    float(parts[1]), int(parts[2])  # a bad number fails here, before any training
    return parts[0], parts[1], parts[2]


def sftlab(*args: str) -> float:
    """Run `sftlab ARGS`; return its wall time in seconds (exit on failure)."""
    started = time.perf_counter()
    print("$ sftlab " + " ".join(shlex.quote(a) for a in args), flush=True)
    if subprocess.run([sys.executable, "-m", "sftlab", *args]).returncode != 0:
        raise SystemExit(f"sftlab {args[0]} failed; fix it and run the sweep again (finished points are kept)")
    return round(time.perf_counter() - started, 1)


def run_point(config: Path, runs: Path, method: str, lr: str, epochs: str, eval_args: list[str]) -> dict:
    out = runs / point_name(method, lr, epochs)
    record_path = out / "sweep_point.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    sets = [f"method={method}", f"learning_rate={lr}", f"num_epochs={epochs}", f"output_dir={out}"]
    if not ((out / "train_summary.json").is_file() and (out / "final" / "sftlab.json").is_file()):
        resume = ["--resume"] if any(out.glob("checkpoint-*/manifest.json")) else []
        sftlab("train", str(config), *[a for s in sets for a in ("--set", s)], *resume)
    eval_s = sftlab("eval", str(out), *eval_args)
    summary = json.loads((out / "train_summary.json").read_text())
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    follow, forget, held = report["instruction_following"], report["forgetting"], report["heldout"]
    record = {
        "method": method, "learning_rate": float(lr), "epochs": int(epochs), "steps": summary["steps"],
        "heldout_loss": {"base": held["base"]["loss"], "tuned": held["tuned"]["loss"]},
        "prompt_strict": {"base": follow["base"]["prompt_strict"], "tuned": follow["tuned"]["prompt_strict"]},
        "instruction_strict": {"base": follow["base"]["instruction_strict"],
                               "tuned": follow["tuned"]["instruction_strict"]},
        "prompts": follow["prompts"],
        "perplexity": {"base": forget["base"]["perplexity"], "tuned": forget["tuned"]["perplexity"]},
        "perplexity_change": forget["relative_change"], "forgetting_flagged": forget["flagged"],
        "train_seconds": summary["seconds"],
        "eval_seconds": eval_s, "base_reused": report["base"].get("reused", []),
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def table(records: list[dict]) -> str:
    lines = ["| method | lr | epochs | steps | held-out loss | IF prompt strict | IF instruction strict "
             "| perplexity change | training time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        flag = " (flagged)" if r["forgetting_flagged"] else ""
        lines.append(
            f"| {r['method']} | {r['learning_rate']:g} | {r['epochs']} | {r['steps']} "
            f"| {r['heldout_loss']['base']:.3f} → {r['heldout_loss']['tuned']:.3f} "
            f"| {100 * r['prompt_strict']['base']:.1f}% → {100 * r['prompt_strict']['tuned']:.1f}% "
            f"| {100 * r['instruction_strict']['base']:.1f}% → {100 * r['instruction_strict']['tuned']:.1f}% "
            f"| {100 * r['perplexity_change']:+.1f}%{flag} | {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the run config every point starts from")
    parser.add_argument("--point", action="append", required=True, type=parse_point,
                        help="METHOD:LR:EPOCHS, e.g. lora:2e-4:1 (repeatable)")
    parser.add_argument("--runs", type=Path, default=Path("runs/sweep"), help="folder of the points' runs")
    parser.add_argument("--eval", default=EVAL, help=f"sftlab eval options (default: {EVAL!r})")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"{args.config}: config not found")
    args.runs.mkdir(parents=True, exist_ok=True)
    records = [run_point(args.config, args.runs, *p, shlex.split(args.eval)) for p in args.point]
    (args.runs / "sweep.json").write_text(json.dumps(records, indent=2))
    text = table(records)
    (args.runs / "sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
