"""`sftlab prepare` at scale: peak memory against the number of rows, throughput against a bare
fast-tokenizer pass, the cache hit, and training start-up from the store.

Generates Alpaca/Orca-shaped rows of ~300 tokens (a system prompt, an instruction, an input,
a response; words drawn from a real chat text, every row different), then for each size:

- `sftlab prepare` as a whole process (wall time, peak RSS from the kernel's rusage);
- the bare batched fast tokenizer (with offsets) over the same rendered texts, in one process
  with the same threads, for the throughput ratio (only for sizes up to --bare-up-to rows; a
  bigger size is compared with the bare rate measured at the biggest smaller size of the run);
- a second `sftlab prepare` of the same inputs (a cache hit);
- training start-up: the store opened, the batch plan made and the first batch collated.

    .venv/bin/python bench/prepare_scale.py --rows 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bench" / "data" / "chat_pairs.jsonl"


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    words = " ".join(m["content"] for line in CORPUS.read_text().splitlines()
                     for m in json.loads(line)["messages"]).split()
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({
                "system_prompt": "You are an AI assistant. Answer carefully and explain your reasoning.",
                "question": f"Task {i}: " + " ".join(rng.choices(words, k=rng.randint(40, 90))),
                "response": " ".join(rng.choices(words, k=rng.randint(120, 200))) + ".",
            }) + "\n")


def whole_process(command: list[str], env: dict) -> tuple[float, float, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed:\n{out[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, out


BARE = r"""
import json, sys, time
from sftlab.config import load_config
from sftlab.data.prepare import load_conversations
from sftlab.data.templates import get_template
from sftlab.models.loading import load_tokenizer
config = load_config(sys.argv[1])
tokenizer = load_tokenizer(config.model)
template = get_template(config.template, tokenizer)
texts = [template.render(c).text for c in load_conversations(config.data[0]).conversations]
start = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 256):
    tokens += sum(len(ids) for ids in tokenizer(texts[i : i + 256], return_offsets_mapping=True)["input_ids"])
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""

STARTUP = r"""
import json, sys, time
start = time.perf_counter()
from sftlab.config import load_config
from sftlab.data.prepare import prepare_data
from sftlab.models.loading import load_tokenizer
from sftlab.train.batches import RunBatches
config = load_config(sys.argv[1])
imported = time.perf_counter()
tokenizer = load_tokenizer(config.model)
data = prepare_data(config, tokenizer, progress=False)
opened = time.perf_counter()
batches = RunBatches(data.train, config, pad_id=tokenizer.pad_token_id)
planned = time.perf_counter()
first = batches.collate(batches.micro_batches(1)[0])
done = time.perf_counter()
print(json.dumps({"cache": data.report["cache"], "rows": len(data.train), "import_s": imported - start,
                  "open_store_s": opened - imported, "batch_plan_s": planned - opened, "first_batch_s": done - planned,
                  "total_s": done - start}))
"""


def measure(n: int, work: Path, args, env: dict) -> dict:
    import yaml

    data = work / f"rows-{n}.jsonl"
    print(f"{n:,} rows: writing {data.name} ...", flush=True)
    write_rows(data, n)
    config = work / f"run-{n}.yaml"
    config.write_text(yaml.safe_dump({"model": args.model, "data": str(data), "template": args.template,
                                      "max_length": args.max_length, "output_dir": str(work / f"out-{n}"),
                                      "num_proc": args.num_proc}))
    sftlab = [sys.executable, "-m", "sftlab", "prepare", str(config)]
    wall, peak, out = whole_process(sftlab, env)
    report = json.loads((work / f"out-{n}" / "data_report.json").read_text())
    tokens = report["total"]["tokens"]
    result = {"rows": n, "file_mb": round(data.stat().st_size / 1e6), "tokens": tokens,
              "prepare_wall_s": round(wall, 1), "prepare_peak_rss_mb": round(peak), "rows_per_s": round(n / wall),
              "tokens_per_s": round(tokens / wall)}
    print(f"  prepare: {wall:.1f} s, {peak:.0f} MB peak RSS, {tokens:,} tokens", flush=True)
    wall, peak, out = whole_process(sftlab, env)
    result["cache_hit_wall_s"] = round(wall, 2)
    print(f"  second prepare (cache hit): {wall:.1f} s", flush=True)
    _, _, out = whole_process([sys.executable, "-c", STARTUP, str(config)], env)
    result["startup"] = json.loads(out.strip().splitlines()[-1])
    print(f"  training start-up: {result['startup']}", flush=True)
    if n <= args.bare_up_to:
        _, _, out = whole_process([sys.executable, "-c", BARE, str(config)], env)
        bare = json.loads(out.strip().splitlines()[-1])
        result["bare_tokenizer_tokens_per_s"] = round(bare["tokens"] / bare["seconds"])
        result["throughput_vs_bare"] = round(result["tokens_per_s"] / result["bare_tokenizer_tokens_per_s"], 3)
        print(f"  bare tokenizer: {result['bare_tokenizer_tokens_per_s']:,} tokens/s -> prepare at "
              f"{result['throughput_vs_bare']:.2f}x (prepare's wall time includes start-up, reading and writing)",
              flush=True)
    elif args.bare_rate:  # the same kind of rows: the bare rate measured at a smaller size in this run
        result["throughput_vs_bare"] = round(result["tokens_per_s"] / args.bare_rate, 3)
        result["bare_rate_from_rows"] = args.bare_rate_rows
    if "bare_tokenizer_tokens_per_s" in result:
        args.bare_rate, args.bare_rate_rows = result["bare_tokenizer_tokens_per_s"], n
    data.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", default="auto")
    parser.add_argument("--bare-up-to", type=int, default=100_000, help="compare with the bare tokenizer up to this size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.bare_rate = args.bare_rate_rows = None
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SFTLAB_HOME": str(Path(tmp) / "home"), "TRANSFORMERS_VERBOSITY": "error"}
        from sftlab.models.registry import REGISTRY

        if args.model in REGISTRY:  # a private cache: the model is converted there first (not timed)
            whole_process([sys.executable, "-m", "sftlab", "models", "pull", args.model], env)
        for n in (int(x) for x in args.rows.split(",")):
            results.append(measure(n, Path(tmp), args, env))
    lines = [f"Machine: {machine}; `python bench/prepare_scale.py --rows {args.rows}` ({args.model} tokenizer, "
             f"template {args.template}, num_proc {args.num_proc})", "",
             "| rows | tokens | prepare wall | rows/s | tokens/s | vs bare tokenizer | peak RSS | cache hit | training start-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['tokens']:,} | {r['prepare_wall_s']} s | {r['rows_per_s']:,} | "
                     f"{r['tokens_per_s']:,} | {r.get('throughput_vs_bare', '-')} | {r['prepare_peak_rss_mb']:,} MB | "
                     f"{r['cache_hit_wall_s']} s | {r['startup']['total_s']:.1f} s |")
    borrowed = [r for r in results if r.get("bare_rate_from_rows")]
    if borrowed:
        sizes = ", ".join(f"{r['rows']:,}" for r in borrowed)
        lines += ["", f"vs bare tokenizer for {sizes} rows: against the bare rate measured at "
                      f"{borrowed[0]['bare_rate_from_rows']:,} rows in this run (the same kind of rows)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare-scale-latest.md").write_text(text)
    (args.out / f"prepare-scale-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
