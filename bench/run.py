"""sftlab vs TRL's SFTTrainer: the same model, rows, max_length, batch, learning rate and steps.

Each trainer runs in its own process so peak memory is its own (VmHWM on CPU,
torch.cuda.max_memory_allocated on GPU). For each run the bench reports:
  - trained (non-padding) tokens/s over the timed steps (after `--warmup` untimed steps);
  - peak memory;
  - the loss of the same first batch at the same initial weights in both tools (they must
    agree to 1e-3: both optimise the same objective, prompt masked);
  - model FLOPs/s (6·N·tokens + the attention term, PaLM appendix B / nanoGPT) against the
    machine's own measured matmul rate (fp32 on CPU, bf16 on CUDA).
TRL is run with packing off and on (BFD, padding-free); its faster setting is compared.

    make bench                      # both models, full + LoRA
    .venv/bin/python bench/run.py --models smollm2-135m-instruct --methods full --steps 4
    .venv/bin/python bench/run.py --quick --models PATH_TO_TINY_MODEL   # seconds; used by the tests
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
DEFAULT_DATA = ROOT / "bench" / "data" / "chat_pairs.jsonl"
RESULTS = ROOT / "bench" / "results"


# -- shared helpers -------------------------------------------------------------------------------

def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measured_matmul_flops(seconds: float = 2.0, dtype_name: str | None = None) -> float:
    """The machine's own dense matmul rate in `dtype_name` (default: bf16 on CUDA, fp32 on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 1024
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name] if dtype_name else (
        torch.bfloat16 if cuda else torch.float32)
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    b = torch.randn(n, n, dtype=dtype, device=a.device)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def flops_per_token(config, method: str, mean_length: float) -> float:
    """6·N (full) or 4·N (LoRA: no weight gradients) + 12·L·H·Q·T (attention), N = matmul weights."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    per_layer = hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * config.intermediate_size
    n_matmul = layers * per_layer + config.vocab_size * hidden  # + the output layer
    dense = (6 if method == "full" else 4) * n_matmul
    return dense + 12 * layers * heads * head_dim * mean_length


def step_gemm_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul of one full fine-tuning step over `tokens` tokens (a piece): each
    linear layer's forward (tokens x in -> out) and its two backward products (the input's
    gradient, tokens x out -> in; the weight's, in x tokens -> out), and the output layer's."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    linears = [(hidden, heads * head_dim), (hidden, kv), (hidden, kv), (heads * head_dim, hidden),
               (hidden, config.intermediate_size), (hidden, config.intermediate_size), (config.intermediate_size, hidden)]
    shapes = []
    for fan_in, fan_out in linears * layers + [(hidden, config.vocab_size)]:
        shapes += [(tokens, fan_in, fan_out), (tokens, fan_out, fan_in), (fan_in, tokens, fan_out)]
    return shapes


def gemm_shape_rate(config, tokens: int, dtype_name: str, repeats: int = 3) -> dict:
    """The machine's matmul rate at a step's own GEMM shapes (each distinct shape timed, weighted by
    how often the step runs it): what a step could reach if it did nothing but its matmuls."""
    import collections

    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = collections.Counter(step_gemm_shapes(config, tokens))
    total_flops = total_seconds = 0.0
    for (m, k, n), count in counts.items():
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
        total_flops += 2 * m * k * n * count
        total_seconds += seconds * count
    return {"tokens": tokens, "dtype": dtype_name, "shapes": len(counts), "matmuls": sum(counts.values()),
            "flops": total_flops, "seconds": total_seconds, "flops_per_s": total_flops / total_seconds}


def bench_rows(path: Path, rows: int) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[:rows]


def rendered_pairs(rows: list[dict], tokenizer) -> list[tuple[str, str]]:
    """(prompt text, response) per row, rendered with sftlab's Alpaca template for both tools."""
    from sftlab.data.formats import FormatOptions, from_openai
    from sftlab.data.readers import RawRow
    from sftlab.data.templates import get_template

    template = get_template("alpaca", tokenizer)
    pairs = []
    for index, row in enumerate(rows):
        conversation = from_openai(RawRow(row, f"bench[{index}]"), FormatOptions())
        pairs.append((template.render_prompt(conversation), conversation.messages[-1].content))
    return pairs


# -- workers (one process each) -------------------------------------------------------------------

def run_sftlab(spec: dict) -> dict:
    from sftlab.config import load_config
    from sftlab.train.loop import train

    work = Path(spec["workdir"])
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(Path(spec["data"]), spec["rows"])))
    overrides = [
        f"model={spec['model']}", f"data={data}", "template=alpaca", f"max_length={spec['max_length']}",
        f"method={spec['method']}", f"batch_size={spec['batch'] // spec['accumulation']}",
        f"gradient_accumulation_steps={spec['accumulation']}", f"max_steps={spec['warmup'] + spec['steps']}",
        f"learning_rate={spec['lr']}", "warmup_ratio=0", "lr_scheduler=constant", f"output_dir={work / 'run'}",
        "logging_steps=1", "cache=false", f"packing={str(spec['packing']).lower()}", "group_by_length=true",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "seed=0",
    ] + spec.get("extra", [])
    config = load_config(overrides=overrides)

    result = train(config)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    timed = records[spec["warmup"]:]
    seconds = timed[-1]["elapsed_s"] - records[spec["warmup"] - 1]["elapsed_s"] if spec["warmup"] else timed[-1]["elapsed_s"]
    tokens = sum(r["input_tokens"] for r in timed)
    return {"tool": "sftlab", "packing": spec["packing"], "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_memory_mb": peak_memory_mb(),
            "first_batch_loss": run_worker("sftlab-first-loss", spec)["first_batch_loss"] if spec.get("first_loss", True) else None,
            "final_loss": result.final_train_loss}


def run_sftlab_first_loss(spec: dict) -> dict:
    """sftlab's loss on rows 0..batch-1 (file order) at the initial weights, in its own process."""
    import torch

    from sftlab.config import load_config
    from sftlab.data.batching import collate
    from sftlab.data.prepare import prepare_data
    from sftlab.models.loading import load_causal_lm, load_tokenizer
    from sftlab.train.loss import token_loss_sum

    work = Path(spec["workdir"]) / "first-loss"
    work.mkdir(exist_ok=True)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(Path(spec["data"]), spec["batch"])))
    config = load_config(overrides=[f"model={spec['model']}", f"data={data}", "template=alpaca",
                                    f"max_length={spec['max_length']}", "cache=false"])
    tokenizer = load_tokenizer(config.model)
    examples = prepare_data(config, tokenizer, use_cache=False).train  # file order, one batch
    model = load_causal_lm(config.model)
    with torch.no_grad():
        summed, count = token_loss_sum(model, collate(examples, tokenizer.pad_token_id))
    return {"first_batch_loss": float(summed) / count}


def trl_inputs(spec: dict):
    """(tokenizer, prompt/completion dataset, fp32 model) for a TRL worker: the bench rows as
    prompt/completion pairs rendered with the same template sftlab trains with."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.models.convert import resolve_model

    path = resolve_model(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = rendered_pairs(bench_rows(Path(spec["data"]), spec["rows"]), tokenizer)
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    return tokenizer, dataset, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_trl(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer, dataset, model = trl_inputs(spec)
    peft_config = None
    if spec["method"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        max_steps=spec["warmup"] + spec["steps"], max_length=spec["max_length"], completion_only_loss=True,
        packing=spec["packing"], packing_strategy="bfd", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), bf16=spec.get("precision", "fp32") == "bf16" or torch.cuda.is_available(),
        seed=0, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)

    # the same first batch (rows 0..batch-1) at the initial weights, through TRL's own collator and loss
    first = trainer.data_collator([trainer.train_dataset[i] for i in range(spec["batch"])])
    with torch.no_grad():
        inputs = {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in first.items()}
        first_loss = float(trainer.compute_loss(trainer.model, inputs))

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    t0, n0 = marks[spec["warmup"] - 1] if spec["warmup"] else (start, 0)
    t1, n1 = marks[-1]
    return {"tool": "trl", "packing": spec["packing"], "tokens": n1 - n0, "seconds": t1 - t0,
            "tokens_per_s": (n1 - n0) / (t1 - t0), "peak_memory_mb": peak_memory_mb(), "first_batch_loss": first_loss}


def run_trl_as_a_user(spec: dict) -> dict:
    """TRL the way its README shows it: SFTTrainer with the user's batch and epochs, its defaults
    otherwise (activation checkpointing on, no packing), then save_model — one whole process."""
    import torch
    from trl import SFTConfig, SFTTrainer

    tokenizer, dataset, model = trl_inputs(spec)
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=spec["lr"], max_length=spec["max_length"],
        completion_only_loss=True, report_to=[], use_cpu=not torch.cuda.is_available(),
        bf16=spec.get("precision") == "bf16" or torch.cuda.is_available(), seed=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    trainer.save_model(str(Path(spec["workdir"]) / "trl" / "final"))
    seconds = output.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"train_seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "losses": losses}


def worker_main(tool: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = {"sftlab": run_sftlab, "trl": run_trl, "sftlab-first-loss": run_sftlab_first_loss,
              "trl-user": run_trl_as_a_user}[tool](spec)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# -- driver -------------------------------------------------------------------------------------------

def run_worker(tool: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"{tool} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def whole_process(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a command run as its own process, measured as
    `/usr/bin/time -v` does: the kernel's rusage of the finished child (loading and saving included)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed (exit {proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def user_settings_row(model: str, args, precision: str = "fp32") -> dict:
    """Both tools at the settings a user types — batch 8, no accumulation, max_length 512, one
    epoch, each tool's defaults otherwise — in one precision (sftlab `precision`, TRL `bf16=`),
    measured as whole processes, loading and saving included."""
    import yaml

    lr = 2e-5
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows(args.data, args.rows)))
        config = {"model": model, "data": "rows.jsonl", "template": "alpaca", "max_length": args.max_length,
                  "batch_size": args.batch, "gradient_accumulation_steps": 1, "num_epochs": 1,
                  "learning_rate": lr, "output_dir": str(work / "run"), "cache": False, "precision": precision}
        (work / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"  {model} full {precision}, user settings: sftlab train run.yaml ...", flush=True)
        sftlab = Path(sys.executable).with_name("sftlab")
        wall, peak, out = whole_process([str(sftlab), "train", "run.yaml"], work)
        summary = json.loads((work / "run" / "train_summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        ours = {"wall_s": wall, "peak_rss_mb": peak, "tokens_per_s": summary["tokens_per_second"],
                "micro_batch_tokens": summary["micro_batch_tokens"], "memory": summary["memory"], "losses": losses,
                "precision_line": next((l for l in out.splitlines() if l.startswith("precision:")), "")}
        print(f"    {wall:.0f} s, {peak:.0f} MB", flush=True)
        print(f"  {model} full {precision}, user settings: TRL SFTTrainer (bf16={precision == 'bf16'}) ...", flush=True)
        spec = {"model": model, "data": str(args.data), "rows": args.rows, "max_length": args.max_length,
                "batch": args.batch, "lr": lr, "workdir": str(work), "precision": precision}
        wall, peak, out = whole_process([sys.executable, __file__, "--worker", "trl-user", json.dumps(spec)], ROOT)
        trl = {"wall_s": wall, "peak_rss_mb": peak,
               **json.loads(next(l for l in out.splitlines() if l.startswith("BENCH_RESULT "))[len("BENCH_RESULT "):])}
        print(f"    {wall:.0f} s, {peak:.0f} MB", flush=True)
    return {"model": model, "method": "full", "precision": precision, "rows": args.rows, "batch": args.batch,
            "max_length": args.max_length, "sftlab": ours, "trl": trl, "speed_ratio": trl["wall_s"] / ours["wall_s"],
            "memory_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"]}


def precision_rows(rows: list[dict]) -> list[str]:
    """sftlab bf16 against sftlab fp32 on the same model (both user-settings runs)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["precision"]: r for r in rows if r["model"] == model}
        if not {"fp32", "bf16"} <= set(by):
            continue
        a, b = by["fp32"]["sftlab"], by["bf16"]["sftlab"]
        last = max(1, len(a["losses"]) // 3)
        mean = lambda xs: sum(xs[-last:]) / len(xs[-last:])
        lines.append(f"| {Path(model).name} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
                     f"**{b['tokens_per_s'] / a['tokens_per_s']:.2f}×** | {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} | "
                     f"{mean(a['losses']):.4f} / {mean(b['losses']):.4f} ({100 * (mean(b['losses']) / mean(a['losses']) - 1):+.1f}%) | "
                     f"{by['bf16']['sftlab']['precision_line'].removeprefix('precision: ')} |")
    return lines


def user_settings_markdown(rows: list[dict], machine: str, gemm: list[dict] | None = None) -> str:
    lines = [f"Machine: {machine}", "",
             "Same user-level settings (batch 8, no accumulation, max_length 512, 1 epoch, each tool's defaults "
             "otherwise; precision: sftlab `precision`, TRL `bf16=`), whole process (loading and saving included):", "",
             "| model | precision | TRL wall / peak RSS | sftlab wall / peak RSS | speed | memory | training tok/s sftlab / TRL | sftlab micro_batch_tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, t = r["sftlab"], r["trl"]
        lines.append(f"| {Path(r['model']).name} | {r.get('precision', 'fp32')} | {t['wall_s']:.0f} s / {t['peak_rss_mb']:.0f} MB | "
                     f"{s['wall_s']:.0f} s / {s['peak_rss_mb']:.0f} MB | **{r['speed_ratio']:.2f}×** | "
                     f"**{r['memory_ratio']:.2f}×** | {s['tokens_per_s']:.1f} / {t['tokens_per_s']:.1f} | {s['micro_batch_tokens']} |")
    compared = precision_rows(rows)
    if compared:
        lines += ["", "sftlab bf16 against sftlab fp32 (the runs above):", "",
                  "| model | fp32 tok/s | bf16 tok/s | bf16 speed-up | peak RSS fp32 / bf16 MB | mean loss of the last third "
                  "of steps fp32 / bf16 | what auto said |", "|---|---|---|---|---|---|---|", *compared]
    for g in gemm or []:
        lines += ["", f"{Path(g['model']).name}, the step's own GEMM shapes ({g['shapes']} shapes, {g['matmuls']} matmuls "
                      f"a step of {g['tokens']}-token pieces: each linear layer's forward, input-gradient and weight-gradient "
                      f"products, and the output layer's), in {g['dtype']}: {g['flops_per_s'] / 1e9:.0f} GFLOP/s. A training "
                      f"step at {g['step_tokens_per_s']:.1f} tok/s does {g['flops_per_token'] / 1e9:.3f} GFLOP a token "
                      f"(6N + attention, PaLM appendix B), {g['step_flops_per_s'] / 1e9:.0f} GFLOP/s: "
                      f"**{100 * g['share']:.0f}%** of that rate."]
    lines += ["", "Where sftlab's peak happens (peak MB of each phase; * = the phase that set the process peak):", ""]
    for r in rows:
        phases = r["sftlab"]["memory"]["phases"]
        top = r["sftlab"]["memory"]["process_peak_mb"]
        cells = ", ".join(f"{name} {p['peak_mb']:.0f}{'*' if p['raised_process_peak'] and p['peak_mb'] >= top - 1 else ''}"
                          for name, p in phases.items())
        lines.append(f"- {Path(r['model']).name} ({r.get('precision', 'fp32')}): {cells}")
    return "\n".join(lines) + "\n"


def sftlab_overrides(args, checkpointing: str) -> list[str]:
    """sftlab's config overrides for one activation-checkpointing setting and the bench's precision
    (TRL runs in the same one), then --sftlab-set."""
    return [f"gradient_checkpointing={str(checkpointing == 'on').lower()}", f"precision={args.precision}",
            *args.sftlab_set]


def bench_one(model: str, method: str, args, matmul_flops: float) -> list[dict]:
    from transformers import AutoConfig

    from sftlab.models.loading import load_tokenizer
    from sftlab.models.convert import resolve_model

    lr = 2e-5 if method == "full" else 2e-4
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "method": method, "data": str(args.data), "rows": args.rows, "max_length": args.max_length,
                "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "lr": lr,
                "accumulation": args.batch // args.sftlab_micro_batch, "precision": args.precision}
        ours_by_setting, trl_runs = {}, []
        for setting in args.checkpointing:
            work = Path(tmp) / f"sftlab-{setting}"
            work.mkdir()
            print(f"  {model} {method}: sftlab (packing={args.sftlab_packing}, checkpointing {setting}) ...", flush=True)
            run = run_worker("sftlab", {**spec, "extra": sftlab_overrides(args, setting), "packing": args.sftlab_packing,
                                        "workdir": str(work), "first_loss": not ours_by_setting})
            if ours_by_setting:  # the same weights and first batch: measured once
                run["first_batch_loss"] = next(iter(ours_by_setting.values()))["first_batch_loss"]
            ours_by_setting[setting] = run
        for packing in (False, True):
            if args.trl_packing != "both" and packing != (args.trl_packing == "on"):
                continue
            work = Path(tmp) / f"trl-{packing}"
            work.mkdir()
            print(f"  {model} {method}: trl (packing={packing}) ...", flush=True)
            trl_runs.append(run_worker("trl", {**spec, "packing": packing, "workdir": str(work)}))
    best_trl = max(trl_runs, key=lambda r: r["tokens_per_s"])
    unpacked_trl = next((r for r in trl_runs if not r["packing"]), best_trl)
    config = AutoConfig.from_pretrained(resolve_model(model))
    tokenizer = load_tokenizer(model)
    pairs = rendered_pairs(bench_rows(args.data, args.rows), tokenizer)
    lengths = [min(args.max_length, len(tokenizer(p + c)["input_ids"]) + 1) for p, c in pairs]
    mean_length = sum(lengths) / len(lengths)
    fpt = flops_per_token(config, method, mean_length)
    return [{
        "model": model, "method": method, "rows": args.rows, "max_length": args.max_length, "batch": args.batch,
        "timed_steps": args.steps, "mean_example_tokens": round(mean_length, 1), "sftlab_checkpointing": setting,
        "sftlab": ours, "trl_runs": trl_runs, "trl_best": best_trl,
        "throughput_ratio": ours["tokens_per_s"] / best_trl["tokens_per_s"],
        "memory_ratio": ours["peak_memory_mb"] / best_trl["peak_memory_mb"],
        # TRL packs its dataset when packing is on, so its unpacked run holds the same first batch
        "first_batch_loss_diff": abs(ours["first_batch_loss"] - unpacked_trl["first_batch_loss"]),
        "flops_per_token": fpt, "matmul_flops": matmul_flops,
        "sftlab_flops_utilisation": ours["tokens_per_s"] * fpt / matmul_flops,
        "trl_flops_utilisation": best_trl["tokens_per_s"] * fpt / matmul_flops,
    } for setting, ours in ours_by_setting.items()]


# each technique switched off (or, for the options, on) in turn: (name, spec changes)
TECHNIQUES = [
    ("sftlab as benchmarked (packing, 1-row micro-batches, fused linear+CE, fused AdamW, in-place embedding grad)", {}),
    ("packing off: length-grouped padded micro-batches of 8 examples", {"packing": False, "accumulation": 1}),
    ("whole batch in one micro-batch instead of 1-row micro-batches", {"accumulation": 1}),
    ("chunked linear+CE with recompute instead of fused", {"extra": ["loss_impl=chunked"]}),
    ("foreach AdamW instead of fused", {"extra": ["fused_optimizer=false"]}),
    ("embedding gradient through autograd (dense buffer) instead of in place", {"extra": ["embedding_grad_in_place=false"]}),
    ("+ activation checkpointing", {"extra": ["gradient_checkpointing=true"]}),
    ("+ torch.compile (decoder, dynamic shapes)", {"extra": ["compile=true"]}),
]


def ablate(args, machine: str, matmul_flops: float, stamp: str) -> None:
    """sftlab alone, one technique changed at a time, against the benchmarked configuration."""
    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            lr = 2e-5 if method == "full" else 2e-4
            base = {"model": model, "method": method, "data": str(args.data), "rows": args.rows,
                    "max_length": args.max_length, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                    "lr": lr, "accumulation": args.batch // args.sftlab_micro_batch,
                    "extra": sftlab_overrides(args, args.checkpointing[0]),
                    "packing": args.sftlab_packing, "first_loss": False}
            reference = None
            chosen = range(len(TECHNIQUES)) if args.ablate == "all" else [int(i) for i in args.ablate.split(",")]
            for name, change in [TECHNIQUES[i] for i in chosen]:
                spec = {**base, **change, "extra": base["extra"] + change.get("extra", [])}
                print(f"  {model} {method}: {name} ...", flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        result = run_worker("sftlab", {**spec, "workdir": tmp})
                    except RuntimeError as error:  # e.g. torch.compile without a C compiler: report, go on
                        print(f"    failed: {str(error).splitlines()[0]}", flush=True)
                        continue
                reference = reference or result
                rows.append({"model": model, "method": method, "variant": name, **result,
                             "throughput_vs_benchmarked": result["tokens_per_s"] / reference["tokens_per_s"],
                             "memory_vs_benchmarked": result["peak_memory_mb"] / reference["peak_memory_mb"]})
                (args.out / f"ablation-{stamp}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
                print(f"    {result['tokens_per_s']:.1f} tok/s, {result['peak_memory_mb']:.0f} MB", flush=True)
    lines = [f"Machine: {machine}", "", "| model | method | variant | tok/s | vs benchmarked | peak MB | vs benchmarked |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['model']).name} | {r['method']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
                     f"{r['throughput_vs_benchmarked']:.2f}× | {r['peak_memory_mb']:.0f} | {r['memory_vs_benchmarked']:.2f}× |")
    table = "\n".join(lines) + "\n"
    (args.out / f"ablation-{stamp}.md").write_text(table)
    if not args.quick:
        (args.out / "ablation-latest.md").write_text(table)
    print(table)


def markdown(results: list[dict], machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| model | method | sftlab checkpointing | sftlab tok/s | TRL tok/s (best) | throughput | sftlab peak MB | TRL peak MB | memory | first-batch loss sftlab / TRL | FLOPs/s vs matmul (sftlab / TRL) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, t = r["sftlab"], r["trl_best"]
        t_first = next((x for x in r["trl_runs"] if not x["packing"]), t)["first_batch_loss"]
        lines.append(
            f"| {Path(r['model']).name} | {r['method']} | {r['sftlab_checkpointing']} | {s['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} "
            f"(packing {'on' if t['packing'] else 'off'}) | **{r['throughput_ratio']:.2f}×** | {s['peak_memory_mb']:.0f} | "
            f"{t['peak_memory_mb']:.0f} | **{r['memory_ratio']:.2f}×** | {s['first_batch_loss']:.4f} / {t_first:.4f} | "
            f"{100 * r['sftlab_flops_utilisation']:.0f}% / {100 * r['trl_flops_utilisation']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--sftlab-packing", type=lambda v: v.lower() in ("1", "true", "on"), default=True)
    parser.add_argument("--sftlab-micro-batch", type=int, default=1,
                        help="sftlab's rows per micro-batch (the global batch is --batch either way: "
                             "batch/micro-batch accumulation steps, exact token-weighted)")
    parser.add_argument("--sftlab-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra sftlab config overrides (repeatable)")
    parser.add_argument("--sftlab-checkpointing", choices=["both", "off", "on"], default="both",
                        help="sftlab's activation checkpointing: a row each for off (sftlab's default) and on "
                             "(TRL's default, SFTConfig.gradient_checkpointing=True), against the same TRL runs")
    parser.add_argument("--trl-packing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--ablate", metavar="all|I,J,...",
                        help="instead of the comparison: sftlab alone, each technique switched off in turn "
                             "(all, or indices into TECHNIQUES; 0 is the benchmarked configuration)")
    parser.add_argument("--user-settings", choices=["on", "off", "only"], default="on",
                        help="also (or only) run both tools at the settings a user types (batch 8, no accumulation, "
                             "1 epoch, defaults otherwise) as whole processes; full fine-tuning, each model")
    parser.add_argument("--precision", default=None,
                        help="precision of the side-by-side comparison and the ablation, both tools (default: bf16 "
                             "where the hardware multiplies it natively, else fp32)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="the user-settings runs' precisions (both tools); bf16 where the machine lacks native "
                             "bf16 still runs, slower")
    parser.add_argument("--user-models", default="smollm2-135m-instruct",
                        help="models of the user-settings runs (default: SmolLM2 only, to keep make bench under an hour)")
    parser.add_argument("--quick", action="store_true", help="a few rows and one timed step (for the tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.steps, args.warmup, args.batch, args.max_length = 8, 1, 1, 4, 128
        args.user_models = args.models
    args.checkpointing = ["off", "on"] if args.sftlab_checkpointing == "both" else [args.sftlab_checkpointing]
    if args.batch % args.sftlab_micro_batch:
        parser.error(f"--batch {args.batch} is not a multiple of --sftlab-micro-batch {args.sftlab_micro_batch}")
    import torch

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
               if not torch.cuda.is_available() else f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    from sftlab.precision import resolve

    args.precision = args.precision or resolve("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")).name
    print(f"measuring the matmul rate ({args.precision}, the comparison's precision) ...", flush=True)
    matmul = measured_matmul_flops(0.5 if args.quick else 2.0, args.precision)
    print(f"  {matmul / 1e9:.1f} GFLOP/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = "quick" if args.quick else time.strftime("%Y%m%d-%H%M%S")
    if args.ablate:
        ablate(args, machine, matmul, stamp)
        return
    if args.user_settings != "off":
        user_rows, gemm = [], []
        for model in (args.user_models or args.models).split(","):
            for precision in args.precisions.split(","):
                user_rows.append(user_settings_row(model, args, precision))
                (args.out / f"user-settings-{stamp}.json").write_text(
                    json.dumps({"machine": machine, "rows": user_rows, "gemm": gemm}, indent=2))
            best = next((r for r in user_rows if r["model"] == model and r["precision"] == "bf16"), None)
            if best is not None:  # the share of the bf16 matmul rate at the step's own shapes
                from transformers import AutoConfig

                from sftlab.models.convert import resolve_model

                config = AutoConfig.from_pretrained(resolve_model(model))
                rate = gemm_shape_rate(config, best["sftlab"]["micro_batch_tokens"], "bf16")
                from sftlab.models.loading import load_tokenizer

                tokenizer = load_tokenizer(model)
                lengths = [min(args.max_length, len(tokenizer(p + c)["input_ids"]) + 1)
                           for p, c in rendered_pairs(bench_rows(args.data, args.rows), tokenizer)]
                fpt = flops_per_token(config, "full", sum(lengths) / len(lengths))
                step = best["sftlab"]["tokens_per_s"] * fpt
                gemm.append({"model": model, **rate, "flops_per_token": fpt, "step_tokens_per_s": best["sftlab"]["tokens_per_s"],
                             "step_flops_per_s": step, "share": step / rate["flops_per_s"]})
        (args.out / f"user-settings-{stamp}.json").write_text(
            json.dumps({"machine": machine, "rows": user_rows, "gemm": gemm}, indent=2))
        table = user_settings_markdown(user_rows, machine, gemm)
        (args.out / f"user-settings-{stamp}.md").write_text(table)
        if not args.quick:
            (args.out / "user-settings-latest.md").write_text(table)
        print(table, flush=True)
        if args.user_settings == "only":
            return
    results = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            new = bench_one(model, method, args, matmul)
            results += new
            # written after every pair, so an interrupted bench keeps what it measured
            (args.out / f"bench-{stamp}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
            print("\n".join(markdown(new, machine).splitlines()[-len(new):]), flush=True)
    table = markdown(results, machine)
    (args.out / f"bench-{stamp}.md").write_text(table)
    if not args.quick:
        (args.out / "latest.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
