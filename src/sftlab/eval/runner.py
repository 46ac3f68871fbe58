"""`run_eval`: what SFT gained (held-out loss, instruction following) and what it cost (forgetting).

One function, top to bottom: load both models, then each measurement in turn, then the report.
Both models stay loaded together (KL needs their logits on the same ids), so the machine needs
memory for two copies of the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from sftlab.eval.errors import EvalError

DEFAULTS = {
    "limit": 60,
    "max_new_tokens": 128,
    "batch_size": 8,
    "side_by_side": 5,
    "forgetting_threshold": 0.10,
    "corpus_samples": 8,
    "corpus_tokens": 96,
    "block_size": 256,
    "max_corpus_chunks": 64,
    "seed": 0,
}


def find_run(run_dir: str | Path) -> tuple[Path, Path]:
    """(run directory holding config.yaml, the checkpoint folder to evaluate)."""
    from sftlab.models.loading import find_checkpoint

    path = Path(run_dir)
    if not path.exists():
        raise EvalError(f"{path}: run directory not found")
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise EvalError(f"{path}: not a run directory (no final/sftlab.json); train one with `sftlab train CONFIG`")
    for candidate in (path, checkpoint.parent):
        if (candidate / "config.yaml").is_file():
            return candidate, checkpoint
    raise EvalError(f"{path}: the run's config.yaml is missing")


def _tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def _generate(generator, prompts: list[tuple[str, str]], max_new_tokens: int, batch_size: int) -> tuple[list[str], dict]:
    """Greedy responses and the generation speed (response tokens, re-tokenized, per second of wall time)."""
    started = time.perf_counter()
    responses = generator.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - started
    tokens = _tokens(generator.tokenizer, responses)
    return responses, {"seconds": round(seconds, 2), "tokens": tokens,
                       "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else 0.0}


def _relative(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or not math.isfinite(before) or before == 0:
        return None
    return after / before - 1.0


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
    return records


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(f"[dim]eval:[/] {text}", highlight=False, soft_wrap=True)


def run_eval(
    run_dir: str | Path,
    base: str | None = None,
    data: str | Path | None = None,
    suite: str | Path | None = None,
    corpus: str | Path | None = None,
    lm_eval: list[str] | str | None = None,
    lm_eval_include: list[str | Path] = (),
    lm_eval_limit: int | float | None = None,
    lm_eval_fewshot: int | None = None,
    lm_eval_base: bool = True,
    output: str | Path | None = None,
    limit: int | None = DEFAULTS["limit"],
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    batch_size: int = DEFAULTS["batch_size"],
    side_by_side: int = DEFAULTS["side_by_side"],
    forgetting_threshold: float = DEFAULTS["forgetting_threshold"],
    corpus_samples: int = DEFAULTS["corpus_samples"],
    corpus_tokens: int = DEFAULTS["corpus_tokens"],
    block_size: int = DEFAULTS["block_size"],
    max_corpus_chunks: int | None = DEFAULTS["max_corpus_chunks"],
    seed: int = DEFAULTS["seed"],
    device: str = "auto",
    console: Console | None = None,
) -> dict:
    """Evaluate a run against its base model; writes OUTPUT/eval_report.json and eval_report.html.

    limit: suite prompts to run (None = all, 0 = skip instruction following);
    side_by_side: held-out prompts answered by both models (0 = skip);
    lm_eval: comma-separated lm-eval task names (None = skip); lm_eval_base: also run them on the base.
    Returns the report dict (also written as JSON).
    """
    from sftlab.config import load_config
    from sftlab.eval import ifeval, measures
    from sftlab.eval.report import write_report
    from sftlab.eval.suite import SUITE_PATH, load_suite
    from sftlab.infer.generate import Generator
    from sftlab.models.loading import load_for_inference, pick_device

    started = time.perf_counter()
    if limit is not None and limit < 0:
        raise EvalError(f"--limit {limit}: give 0 (skip), a positive number, or --full-suite")
    run_path, checkpoint = find_run(run_dir)
    config = load_config(run_path / "config.yaml")
    out_dir = Path(output) if output else run_path / "eval"
    rows = load_suite(suite) if limit != 0 else []  # fail on a bad suite before loading models
    if limit:
        rows = rows[:limit]
    corpus_texts = measures.read_corpus(corpus) if corpus is not None else None
    stack = contextlib.ExitStack()
    manager = None
    if lm_eval:  # check the task names before minutes of work (an unknown task fails here)
        from sftlab.eval.lm_eval_bridge import task_manager

        manager = stack.enter_context(task_manager(lm_eval, lm_eval_include))
    with stack:
        torch_device = pick_device(device)
        timings: dict[str, float] = {}

        def lap(name: str, since: float) -> float:
            timings[name] = round(time.perf_counter() - since, 2)
            return time.perf_counter()

        t = time.perf_counter()
        _say(console, f"loading the tuned model from {checkpoint}")
        tuned, tokenizer, info = load_for_inference(str(checkpoint), torch_device)
        base_name = base or info.get("base_model") or config.model
        _say(console, f"loading the base model {base_name}")
        base_model, base_tokenizer, _ = load_for_inference(str(base_name), torch_device)
        template = info.get("template", config.template)
        same_vocab = measures.same_vocabulary(tokenizer, base_tokenizer)
        t = lap("load", t)

        report: dict = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_path),
            "checkpoint": str(checkpoint),
            "tuned": {"path": str(checkpoint), "method": info.get("method"), "template": template},
            "base": {"name": str(base_name), "template": template},
            "same_tokenizer": same_vocab,
            "device": str(torch_device),
            "settings": {
                "data": str(data) if data else None, "suite": str(suite or SUITE_PATH),
                "corpus": str(corpus) if corpus else None,
                "limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "side_by_side": side_by_side,
                "forgetting_threshold": forgetting_threshold, "corpus_samples": corpus_samples,
                "corpus_tokens": corpus_tokens,
                "block_size": block_size, "max_corpus_chunks": max_corpus_chunks, "seed": seed,
                "lm_eval": lm_eval, "lm_eval_limit": lm_eval_limit, "lm_eval_fewshot": lm_eval_fewshot,
                "lm_eval_base": lm_eval_base,
            },
            "training": _training_summary(read_metrics(run_path), run_path),
        }

        # -- 1. held-out response loss ---------------------------------------------------------------
        examples, where = measures.heldout_examples(config, tokenizer, data)
        heldout: dict = {"source": where, "rows": len(examples)}
        if examples:
            _say(console, f"held-out loss on {len(examples)} rows ({where})")
            base_examples = examples if same_vocab else measures.heldout_examples(config, base_tokenizer, data)[0]
            chunk = config.loss_chunk_size
            heldout["tuned"] = measures.response_loss(tuned, examples, tokenizer.pad_token_id, torch_device,
                                                      batch_size, chunk)
            heldout["base"] = measures.response_loss(base_model, base_examples, base_tokenizer.pad_token_id, torch_device,
                                                     batch_size, chunk)
            heldout["delta_loss"] = heldout["tuned"]["loss"] - heldout["base"]["loss"]
            if same_vocab:
                batches = measures.batches_of(examples, batch_size, tokenizer.pad_token_id)
                heldout["kl"] = measures.mean_kl(base_model, tuned, batches, torch_device)
        report["heldout"] = heldout
        t = lap("heldout", t)

        # -- 2. verifiable instruction following -------------------------------------------------------
        tuned_generator = Generator(tuned, tokenizer, template)
        base_generator = Generator(base_model, base_tokenizer, template)
        if rows:
            _say(console, f"instruction following: {len(rows)} prompts x 2 models, up to {max_new_tokens} new tokens")
            prompts = [(row["prompt"], "") for row in rows]
            instruction_following = {"suite": str(suite or SUITE_PATH), "prompts": len(rows)}
            answers = {}
            for name, generator in (("tuned", tuned_generator), ("base", base_generator)):
                responses, speed = _generate(generator, prompts, max_new_tokens, batch_size)
                scored = ifeval.score(rows, responses)
                checks = scored.pop("checks")
                instruction_following[name] = {**scored, "generation": speed}
                answers[name] = (responses, checks)
            instruction_following["responses"] = [
                {"id": row["id"], "prompt": row["prompt"], "instruction_ids": row["instruction_ids"],
                 "kwargs": row["kwargs"],
                 **{name: {"response": answers[name][0][i], **answers[name][1][i]} for name in ("base", "tuned")}}
                for i, row in enumerate(rows)
            ]
            report["instruction_following"] = instruction_following
        else:
            report["instruction_following"] = None
        t = lap("instruction_following", t)

        # -- 3. forgetting -----------------------------------------------------------------------------
        if corpus is not None:
            texts, source = corpus_texts, str(corpus)
        elif corpus_samples > 0:
            _say(console, f"forgetting: sampling {corpus_samples} continuations from the base model (seed {seed})")
            texts = measures.sample_continuations(base_model, base_tokenizer, measures.neutral_prompts(corpus_samples, seed),
                                                  corpus_tokens, seed, batch_size)
            source = "base_samples"
        else:
            texts, source = [], None
        forgetting: dict = {"source": source, "threshold": forgetting_threshold}
        if texts:
            chunks = measures.text_examples(texts, tokenizer, block_size, max_corpus_chunks)
            base_chunks = (chunks if same_vocab
                           else measures.text_examples(texts, base_tokenizer, block_size, max_corpus_chunks))
            _say(console, f"forgetting: perplexity on {len(chunks)} chunks of general text")
            forgetting["chunks"] = len(chunks)
            forgetting["tuned"] = measures.text_perplexity(tuned, chunks, tokenizer.pad_token_id, torch_device, batch_size)
            forgetting["base"] = measures.text_perplexity(base_model, base_chunks, base_tokenizer.pad_token_id, torch_device,
                                                          batch_size)
            change = _relative(forgetting["base"]["perplexity"], forgetting["tuned"]["perplexity"])
            forgetting["relative_change"] = change
            forgetting["flagged"] = change is not None and change > forgetting_threshold
            if same_vocab:
                batches = measures.batches_of(chunks, batch_size, tokenizer.pad_token_id)
                forgetting["kl"] = measures.mean_kl(base_model, tuned, batches, torch_device)
            if source == "base_samples":
                forgetting["texts"] = texts
        report["forgetting"] = forgetting
        t = lap("forgetting", t)

        # -- 4. side by side ---------------------------------------------------------------------------
        pairs = []
        if side_by_side > 0:
            pairs = _side_by_side_prompts(config, examples, data, side_by_side) or [
                {"instruction": row["prompt"], "input": "", "reference": None, "source": row["id"]}
                for row in rows[:side_by_side]
            ]
        if pairs:
            _say(console, f"side by side: {len(pairs)} prompts")
            prompts = [(p["instruction"], p["input"]) for p in pairs]
            tuned_answers, _ = _generate(tuned_generator, prompts, max_new_tokens, batch_size)
            base_answers, _ = _generate(base_generator, prompts, max_new_tokens, batch_size)
            for pair, b, tu in zip(pairs, base_answers, tuned_answers):
                pair["base"], pair["tuned"] = b, tu
        report["side_by_side"] = pairs
        t = lap("side_by_side", t)

        # -- 5. lm-evaluation-harness ----------------------------------------------------------------
        report["lm_eval"] = None
        if lm_eval:
            from sftlab.eval.lm_eval_bridge import run_lm_eval

            _say(console, f"lm-eval: {lm_eval}")
            report["lm_eval"] = {
                name: run_lm_eval(model, tok, lm_eval, limit=lm_eval_limit, num_fewshot=lm_eval_fewshot,
                                  batch_size=batch_size, seed=seed, manager=manager)
                for name, model, tok in (("tuned", tuned, tokenizer), ("base", base_model, base_tokenizer))
                if name == "tuned" or lm_eval_base
            }
            t = lap("lm_eval", t)

        timings["total"] = round(time.perf_counter() - started, 2)
        report["timings"] = timings
        json_path, html_path = write_report(report, out_dir, run_path)
        report["files"] = {"json": str(json_path), "html": str(html_path)}
        return report


def _side_by_side_prompts(config, examples, data, n: int) -> list[dict]:
    """The first n single-turn held-out rows: instruction, input and the reference answer."""
    from sftlab.eval.measures import find_conversations, prompt_of

    conversations = find_conversations(config, [e.source for e in examples[: 4 * n]], data)
    pairs = []
    for example in examples:
        conversation = conversations.get(example.source)
        prompt = prompt_of(conversation) if conversation is not None else None
        if prompt is None:
            continue
        answers = [m.content for m in conversation.messages if m.role == "assistant"]
        pairs.append({"instruction": prompt[0], "input": prompt[1], "reference": answers[-1] if answers else None,
                      "source": example.source})
        if len(pairs) == n:
            break
    return pairs


def _training_summary(metrics: list[dict], run_path: Path) -> dict:
    summary: dict = {"steps": len(metrics)}
    if metrics:
        summary["first_loss"] = metrics[0].get("loss")
        summary["last_loss"] = metrics[-1].get("loss")
        vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
        summary["last_val_loss"] = vals[-1] if vals else None
        summary["trained_tokens"] = sum(m.get("tokens", 0) for m in metrics)
    path = run_path / "train_summary.json"
    if path.is_file():
        try:
            summary["train_summary"] = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    summary["metrics"] = metrics
    return summary
