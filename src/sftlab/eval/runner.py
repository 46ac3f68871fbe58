"""`run_eval`: what SFT gained (held-out loss, instruction following) and what it cost (forgetting).

Load both models, then each measurement in turn (a function each), then the report.
Both models stay loaded together (KL needs their logits on the same ids), so the machine needs
memory for two copies of the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from sftlab.data import memo
from sftlab.eval import measures
from sftlab.eval.errors import EvalError
from sftlab.eval.settings import EvalSettings

def find_run(run_dir: str | Path) -> tuple[Path, Path]:
    """(run directory holding config.yaml, the checkpoint folder to evaluate)."""
    from sftlab.models.loading import find_checkpoint, run_config_dir

    path = Path(run_dir)
    if not path.exists():
        raise EvalError(f"{path}: run directory not found")
    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise EvalError(f"{path}: not a run directory (no final/sftlab.json); train one with `sftlab train CONFIG`")
    run_path = run_config_dir(checkpoint)
    if run_path is None:
        raise EvalError(f"{path}: the run's config.yaml is missing")
    return run_path, checkpoint


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


class BaseMemo:
    """The base model's generated text, remembered across evals of runs that share the base.

    A sweep evaluates many runs of one base model: its answers to the suite, its side-by-side
    answers and the general text it samples for the forgetting check are the same every time
    (greedy, or seeded), and they are most of an eval's time. They are kept in the memo
    ($SFTLAB_HOME/cache/memo) under a key made of the base model's files (stat signatures), the
    template, the device, the library versions, the sftlab code that generates, and the prompts
    and settings of the call. Losses, KL and perplexities are always computed (they are quick,
    and KL needs both models' logits). A base that is not a plain local model folder (a hub id,
    another run) is never memoized.
    """

    KIND = "eval-base"

    def __init__(self, signature: list | None, console: Console | None = None):
        self.signature = signature
        self.console = console
        self.reused: list[str] = []

    @classmethod
    def for_base(cls, base_name: str, template: str, device, enabled: bool, console: Console | None = None,
                 template_kwargs: dict | None = None, dtype: str = ""):
        signature = _base_signature(base_name, template, device) if enabled else None
        if signature is not None and template_kwargs:
            signature.append(sorted(template_kwargs.items()))
        if signature is not None and dtype:  # bf16 and fp32 generations differ
            signature.append(dtype)
        return cls(signature, console)

    def get(self, what: str, args: list, compute):
        """compute() (a JSON-able value), or what it returned for the same base and args before."""
        if self.signature is None:
            return compute()
        key = [*self.signature, what, args]
        value = memo.recall(self.KIND, key)
        if value is not None:
            self.reused.append(what)
            _say(self.console, f"{what}: the base model's text reused from an earlier eval (--no-cache: generate again)")
            return value
        value = compute()
        memo.remember(self.KIND, key, value)
        return value


def _base_signature(base_name: str, template: str, device) -> list | None:
    from importlib.metadata import version

    from sftlab.models.convert import resolve_model
    from sftlab.models.loading import find_checkpoint

    if find_checkpoint(base_name) is not None:
        return None  # another run as the base: its files may be a LoRA adapter over yet another model
    try:
        path = Path(resolve_model(str(base_name), pull_if_missing=False))
    except Exception:
        return None
    if not path.is_dir():
        return None  # a hub id
    package = Path(__file__).parents[1]
    code = [package / "infer" / "engine.py", package / "infer" / "generate.py", package / "data" / "templates.py",
            package / "models" / "loading.py", Path(__file__).with_name("measures.py")]
    return [1, [version("torch"), version("transformers")], [memo.file_signature(c) for c in code],
            memo.file_signature(path), template, memo.file_signature(template) if Path(template).is_file() else None,
            str(device.type)]


@dataclass
class _Models:
    """The tuned model and its base, loaded side by side, with what the measurements share."""

    tuned: object
    tokenizer: object
    base: object
    base_tokenizer: object
    device: object
    template: str
    same_vocab: bool  # KL and shared examples need the same token ids
    memo: BaseMemo
    template_kwargs: dict = field(default_factory=dict)  # the run's template_kwargs
    special_tokens: str = "text"  # the run's special_tokens_in_content
    tool_parser: str = "none"  # how the run's template writes tool calls (sftlab.infer.tools)

    def generators(self):
        from sftlab.infer.generate import Generator

        return {"tuned": Generator(self.tuned, self.tokenizer, self.template, self.template_kwargs, self.special_tokens),
                "base": Generator(self.base, self.base_tokenizer, self.template, self.template_kwargs,
                                  self.special_tokens)}


def run_eval(run_dir: str | Path, settings: EvalSettings | None = None, console: Console | None = None,
             **options) -> dict:
    """Evaluate a run against its base model; writes OUTPUT/eval_report.json and eval_report.html.

    `settings` (or its fields as keyword `options`, e.g. `limit=10`) say what to measure: see
    `sftlab.eval.settings.EvalSettings` (limit 0 skips instruction following, side_by_side 0 the
    side-by-side answers, lm_eval None the harness). Returns the report dict (also written as JSON).
    """
    from sftlab.config import load_config
    from sftlab.eval.report import write_report
    from sftlab.eval.suite import SUITE_PATH, load_suite
    from sftlab.models.loading import load_for_inference, pick_device

    s = settings.model_copy(update=options) if settings is not None else EvalSettings(**options)
    started = time.perf_counter()
    run_path, checkpoint = find_run(run_dir)
    config = load_config(run_path / "config.yaml")
    rows = load_suite(s.suite) if s.limit != 0 else []  # fail on a bad suite before loading models
    rows = rows[: s.limit] if s.limit else rows
    corpus_texts = measures.read_corpus(s.corpus) if s.corpus is not None else None
    with contextlib.ExitStack() as stack:
        manager = None
        if s.lm_eval:  # check the task names before minutes of work (an unknown task fails here)
            from sftlab.eval.lm_eval_bridge import task_manager

            manager = stack.enter_context(task_manager(s.lm_eval, s.lm_eval_include))
        timings: dict[str, float] = {}
        t = time.perf_counter()
        device = pick_device(s.device)
        _say(console, f"loading the tuned model from {checkpoint}")
        tuned, tokenizer, info = load_for_inference(str(checkpoint), device)
        base_name = s.base or info.get("base_model") or config.model
        _say(console, f"loading the base model {base_name}")
        # the base computes in the tuned run's precision: the two are compared on equal terms
        base_model, base_tokenizer, _ = load_for_inference(str(base_name), device, info.get("precision", "auto"))
        template = info.get("template", config.template)
        template_kwargs = dict(info.get("template_kwargs") or config.template_kwargs)
        models = _Models(tuned, tokenizer, base_model, base_tokenizer, device, template,
                         measures.same_vocabulary(tokenizer, base_tokenizer),
                         BaseMemo.for_base(base_name, template, device, s.cache, console, template_kwargs,
                                           str(next(base_model.parameters()).dtype)),
                         template_kwargs, info.get("special_tokens_in_content", "allow"),
                         _tool_parser(info, template, tokenizer))
        timings["load"] = _lap(t)
        report: dict = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(run_path),
            "checkpoint": str(checkpoint),
            "tuned": {"path": str(checkpoint), "method": info.get("method"), "template": template},
            "base": {"name": str(base_name), "template": template},
            "same_tokenizer": models.same_vocab,
            "device": str(device),
            "settings": {**s.as_report(), "suite": str(s.suite or SUITE_PATH)},
            "training": _training_summary(read_metrics(run_path), run_path),
        }
        generators = models.generators()
        t = time.perf_counter()
        examples, report["heldout"] = _heldout(models, config, s, console)
        timings["heldout"] = _lap(t)
        t = time.perf_counter()
        report["instruction_following"] = _instruction_following(generators, rows, s, console, models.memo)
        timings["instruction_following"] = _lap(t)
        t = time.perf_counter()
        report["forgetting"] = _forgetting(models, corpus_texts, s, console)
        timings["forgetting"] = _lap(t)
        t = time.perf_counter()
        report["side_by_side"] = _side_by_side(generators, config, examples, rows, s, console, models.memo)
        timings["side_by_side"] = _lap(t)
        report["tool_calls"] = None
        if s.tool_calls:
            t = time.perf_counter()
            report["tool_calls"] = _tool_calls(generators, models, s, console)
            timings["tool_calls"] = _lap(t)
        report["lm_eval"] = None
        if s.lm_eval:
            t = time.perf_counter()
            report["lm_eval"] = _lm_eval(models, s, manager, console)
            timings["lm_eval"] = _lap(t)
        timings["total"] = _lap(started)
        report["timings"] = timings
        report["base"]["reused"] = models.memo.reused
        json_path, html_path = write_report(report, s.output or run_path / "eval", run_path)
        report["files"] = {"json": str(json_path), "html": str(html_path)}
        return report


def _tool_parser(info: dict, template: str, tokenizer) -> str:
    from sftlab.data.templates import TemplateError, run_template
    from sftlab.infer.tools import choose_parser

    if info.get("tool_parser") not in (None, "auto"):
        return info["tool_parser"]
    try:
        return choose_parser(run_template(info, tokenizer, template))
    except TemplateError:
        return "none"


def _tool_calls(generators: dict, models: _Models, s: EvalSettings, console) -> dict:
    """Both models call tools on the held-out agent rows (sftlab.eval.toolcalls)."""
    from sftlab.eval import toolcalls

    rows = toolcalls.load_rows(s.tool_calls)
    _say(console, f"tool calling: {len(rows)} rows x 2 models ({models.tool_parser} calls), up to "
                  f"{s.max_new_tokens} new tokens")
    result: dict = {"file": str(s.tool_calls), "parser": models.tool_parser}
    for name in ("tuned", "base"):
        result[name] = toolcalls.evaluate(generators[name], rows, models.tool_parser, s.max_new_tokens, s.batch_size)
    return result


def _lap(since: float) -> float:
    return round(time.perf_counter() - since, 2)


def _heldout(models: _Models, config, s: EvalSettings, console) -> tuple[list, dict]:
    """The training objective (mean response-token loss) of both models on held-out rows, and
    the KL between them there; also returns the examples (side by side picks from them)."""
    from sftlab.train.batches import EvalBatches

    examples, where = measures.heldout_examples(config, models.tokenizer, s.data)
    heldout: dict = {"source": where, "rows": len(examples)}
    if not examples:
        return examples, heldout
    _say(console, f"held-out loss on {len(examples)} rows ({where})")
    base_examples = examples if models.same_vocab else measures.heldout_examples(config, models.base_tokenizer, s.data)[0]
    chunk = config.loss_chunk_size
    heldout["tuned"] = measures.response_loss(models.tuned, examples, models.tokenizer.pad_token_id, models.device,
                                              s.batch_size, chunk)
    heldout["base"] = measures.response_loss(models.base, base_examples, models.base_tokenizer.pad_token_id,
                                             models.device, s.batch_size, chunk)
    heldout["delta_loss"] = heldout["tuned"]["loss"] - heldout["base"]["loss"]
    if models.same_vocab:
        batches = EvalBatches(examples, s.batch_size, models.tokenizer.pad_token_id)
        heldout["kl"] = measures.mean_kl(models.base, models.tuned, batches, models.device)
    return examples, heldout


def _instruction_following(generators: dict, rows: list[dict], s: EvalSettings, console,
                           base_memo: BaseMemo) -> dict | None:
    """Both models answer the suite's prompts; every verifiable instruction is checked."""
    from sftlab.eval import ifeval
    from sftlab.eval.suite import SUITE_PATH

    if not rows:
        return None
    _say(console, f"instruction following: {len(rows)} prompts x 2 models, up to {s.max_new_tokens} new tokens")
    prompts = [(row["prompt"], "") for row in rows]
    result: dict = {"suite": str(s.suite or SUITE_PATH), "prompts": len(rows)}
    answers = {}
    for name in ("tuned", "base"):
        def answer(name=name):
            return list(_generate(generators[name], prompts, s.max_new_tokens, s.batch_size))

        responses, speed = (answer() if name == "tuned" else
                            base_memo.get("instruction_following", [prompts, s.max_new_tokens, s.batch_size], answer))
        scored = ifeval.score(rows, responses)
        checks = scored.pop("checks")
        result[name] = {**scored, "generation": speed}
        answers[name] = (responses, checks)
    result["responses"] = [
        {"id": row["id"], "prompt": row["prompt"], "instruction_ids": row["instruction_ids"], "kwargs": row["kwargs"],
         **{name: {"response": answers[name][0][i], **answers[name][1][i]} for name in ("base", "tuned")}}
        for i, row in enumerate(rows)
    ]
    return result


def _forgetting(models: _Models, corpus_texts: list[str] | None, s: EvalSettings, console) -> dict:
    """Perplexity of both models on general text (the user's corpus, or text the base model
    writes itself); flagged when the tuned model's rises by more than the threshold."""
    from sftlab.train.batches import EvalBatches

    if corpus_texts is not None:
        texts, source = corpus_texts, str(s.corpus)
    elif s.corpus_samples > 0:
        openings = measures.neutral_prompts(s.corpus_samples, s.seed)

        def sample() -> list[str]:
            _say(console, f"forgetting: sampling {s.corpus_samples} continuations from the base model (seed {s.seed})")
            return measures.sample_continuations(models.base, models.base_tokenizer, openings, s.corpus_tokens,
                                                 s.seed, s.batch_size)

        texts = models.memo.get("forgetting_corpus", [openings, s.corpus_tokens, s.seed, s.batch_size], sample)
        source = "base_samples"
    else:
        texts, source = [], None
    forgetting: dict = {"source": source, "threshold": s.forgetting_threshold}
    if not texts:
        return forgetting
    chunks = measures.text_examples(texts, models.tokenizer, s.block_size, s.max_corpus_chunks)
    base_chunks = (chunks if models.same_vocab
                   else measures.text_examples(texts, models.base_tokenizer, s.block_size, s.max_corpus_chunks))
    _say(console, f"forgetting: perplexity on {len(chunks)} chunks of general text")
    forgetting["chunks"] = len(chunks)
    forgetting["tuned"] = measures.text_perplexity(models.tuned, chunks, models.tokenizer.pad_token_id, models.device,
                                                   s.batch_size)
    forgetting["base"] = measures.text_perplexity(models.base, base_chunks, models.base_tokenizer.pad_token_id,
                                                  models.device, s.batch_size)
    change = _relative(forgetting["base"]["perplexity"], forgetting["tuned"]["perplexity"])
    forgetting["relative_change"] = change
    forgetting["flagged"] = change is not None and change > s.forgetting_threshold
    if models.same_vocab:
        batches = EvalBatches(chunks, s.batch_size, models.tokenizer.pad_token_id)
        forgetting["kl"] = measures.mean_kl(models.base, models.tuned, batches, models.device)
    if source == "base_samples":
        forgetting["texts"] = texts
    return forgetting


def _side_by_side(generators: dict, config, examples: list, rows: list[dict], s: EvalSettings, console,
                  base_memo: BaseMemo) -> list[dict]:
    """Held-out prompts (else suite prompts) answered by both models, beside the reference."""
    if s.side_by_side <= 0:
        return []
    pairs = _side_by_side_prompts(config, examples, s.data, s.side_by_side) or [
        {"instruction": row["prompt"], "input": "", "reference": None, "source": row["id"]}
        for row in rows[: s.side_by_side]
    ]
    if pairs:
        _say(console, f"side by side: {len(pairs)} prompts")
        prompts = [(p["instruction"], p["input"]) for p in pairs]
        tuned_answers, _ = _generate(generators["tuned"], prompts, s.max_new_tokens, s.batch_size)
        base_answers = base_memo.get("side_by_side", [prompts, s.max_new_tokens, s.batch_size],
                                          lambda: _generate(generators["base"], prompts, s.max_new_tokens,
                                                       s.batch_size)[0])
        for pair, b, tu in zip(pairs, base_answers, tuned_answers):
            pair["base"], pair["tuned"] = b, tu
    return pairs


def _lm_eval(models: _Models, s: EvalSettings, manager, console) -> dict:
    from sftlab.eval.lm_eval_bridge import run_lm_eval

    _say(console, f"lm-eval: {s.lm_eval}")
    return {
        name: run_lm_eval(model, tok, s.lm_eval, limit=s.lm_eval_limit, num_fewshot=s.lm_eval_fewshot,
                          batch_size=s.batch_size, seed=s.seed, manager=manager)
        for name, model, tok in (("tuned", models.tuned, models.tokenizer), ("base", models.base, models.base_tokenizer))
        if name == "tuned" or s.lm_eval_base
    }


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
