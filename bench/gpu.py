"""sftlab on a CUDA GPU: tokens/s, MFU and peak memory of full fine-tuning and LoRA in bf16, packing
off and on, for random-init models built from the configs of SmolLM2-135M, Gemma 3 270M and
Qwen3-1.7B (no download: the configs are below, the weights random).

    python bench/gpu.py --tokenizer DIR            # a CUDA machine: 12 rows in a few minutes
    python bench/gpu.py --tiny                     # CPU: one tiny model, 2 steps a row (the tests run this)

Made for the machines this project can borrow (H100/H200, torch 2.11, transformers 5.17, no
network, no trl / bitsandbytes / gguf): it needs only sftlab's own training dependencies and a
tokenizer folder (SmolLM2's, 2 MB, carried along; its ids fit every model's vocabulary, and each
model keeps its own vocabulary size, so the output layer costs what it costs). A row that
cannot run prints its reason and the rest go on. Every row trains with sftlab's `train()` on
synthetic Alpaca rows of about max_length tokens (packing off: one row a sequence; on: rows
packed into max_length), batch 8, max_length 1024, `precision: bf16` (autocast on CUDA).

MFU = tokens/s x FLOPs a token / the GPU's bf16 dense peak (989 TFLOP/s for H100 and H200 SXM).
FLOPs a token (PaLM, appendix B): 6N + 12·L·H·Q·T for full fine-tuning, N the matmul weights
(the parameters without the input embedding, the output layer counted even when it is tied to it); LoRA does the forward and the input gradients of the frozen weights (4N)
plus its adapters (6·N_lora), and the same attention term. Peak memory is torch's
max_memory_allocated over the row. Prints a table and writes the rows as JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
MODELS = {  # architecture and sizes of the published models; vocabularies as published
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                         rope_theta=100000.0, tie_word_embeddings=True)),
    "gemma3-270m": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                             num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=256, max_position_embeddings=32768, sliding_window=512,
                                             query_pre_attn_scalar=256, tie_word_embeddings=True)),
    "qwen3-1.7b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True)),
}
TINY = {"tiny-llama": ("LlamaConfig", dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                           tie_word_embeddings=True))}
WORDS = ("the model learns to follow instructions from examples while the loss is computed on the response tokens "
         "only data quality matters more than quantity numbers dates names Paris Tokyo Lagos 42 2026").split()


def synthetic_rows(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choices(WORDS, k=words // 4)), "input": "",
             "output": " ".join(rng.choices(WORDS, k=words))} for _ in range(n)]


def flops_per_token(model, config, method: str, seq: int) -> float:
    embed = model.get_input_embeddings().weight.numel()
    # N: the matmul weights, the output layer included (with tied embeddings it is the input one)
    n = sum(p.numel() for p in model.parameters()) - embed + (embed if config.tie_word_embeddings else 0)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 12 * layers * heads * head_dim * seq
    if method == "full":
        return 6 * n + attention
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * (n - adapters) + 6 * adapters + attention


def build_model(kind: str, sizes: dict, tokenizer, folder: Path, device: str) -> Path:
    import torch
    import transformers

    config = getattr(transformers, kind)(**sizes, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def run_row(model_dir: Path, data: Path, out: Path, method: str, packing: bool, steps: int, max_length: int,
            device: str) -> dict:
    import torch

    from sftlab.config import load_config
    from sftlab.train.loop import train

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = load_config(overrides=[
        f"model={model_dir}", f"data={data}", "template=alpaca", f"method={method}",
        f"packing={str(packing).lower()}", f"max_steps={steps}", "batch_size=8", f"max_length={max_length}",
        "warmup_ratio=0", f"output_dir={out}", "logging_steps=1", "val_fraction=0", "save_best=false",
        f"device={device}", "precision=bf16" if device == "cuda" else "precision=fp32"])
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:] or records  # the first steps warm up kernels and the allocator
    tokens = sum(r["input_tokens"] for r in timed)
    elapsed = (timed[-1]["elapsed_s"] - (records[1]["elapsed_s"] if len(records) > 2 else 0)) or seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"steps": result.steps, "tokens_per_second": round(tokens / elapsed, 1), "peak_gib": peak and round(peak, 2),
            "loss_first": round(records[0]["loss"], 4), "loss_last": round(records[-1]["loss"], 4),
            "wall_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the smollm2 registry model)")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny model, 2 steps a row")
    parser.add_argument("--steps", type=int, default=None, help="steps a row (default 12 on CUDA)")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: running the tiny CPU mode (--tiny)")
        args.tiny = True
    models = TINY if args.tiny else {k: MODELS[k] for k in (args.models.split(",") if args.models else MODELS)}
    steps = args.steps or (2 if args.tiny else 12)
    max_length = 128 if args.tiny else 1024
    if args.tokenizer is None:
        from sftlab.models.convert import pull

        args.tokenizer = str(pull("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    print(f"sftlab GPU bench on {gpu} (torch {torch.__version__}); bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s" if peak else f"sftlab GPU bench on {gpu} (torch {torch.__version__})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sftlab-gpu-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "rows.json"
        data.write_text(json.dumps(synthetic_rows(200, max_length * 2 // 3)))
        for name, (kind, sizes) in models.items():
            try:
                model_dir = build_model(kind, sizes, tokenizer, tmp / name, device)
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why; the rest go on
                rows.append({"model": name, "error": f"build: {type(exc).__name__}: {exc}"[:300]})
                print(f"{name}: cannot build: {exc}", flush=True)
                continue
            for method in ("full", "lora"):
                for packing in (False, True):
                    row = {"model": name, "method": method, "packing": packing}
                    try:
                        row.update(run_row(model_dir, data, tmp / f"{name}-{method}-{packing}", method, packing, steps,
                                           max_length, device))
                        import transformers

                        config = getattr(transformers, kind)(**sizes)
                        with torch.device("meta"):
                            meta = transformers.AutoModelForCausalLM.from_config(config)
                        if method == "lora":
                            from peft import LoraConfig, get_peft_model

                            meta = get_peft_model(meta, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                   task_type="CAUSAL_LM"))
                        row["flops_per_token"] = flops_per_token(meta, config, method, max_length)
                        if peak:
                            row["mfu"] = round(row["tokens_per_second"] * row["flops_per_token"] / peak, 4)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
    print(f"\n| model | method | packing | tokens/s | MFU | peak GiB | loss first → last |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r.get('method', '')} | {r.get('packing', '')} | — | — | — | {r['error']} |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "—"
            print(f"| {r['model']} | {r['method']} | {'on' if r['packing'] else 'off'} | {r['tokens_per_second']:,.0f} | "
                  f"{mfu} | {r['peak_gib'] if r['peak_gib'] is not None else '—'} | {r['loss_first']} → {r['loss_last']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
