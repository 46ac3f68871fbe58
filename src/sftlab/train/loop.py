"""The training loop, top to bottom: set up, iterate, step, log, checkpoint.

One process or many (torchrun; DDP or FSDP2), full or LoRA, fresh or resumed: switches in this
one loop, not subclasses. The loss of an optimizer step is the sum of per-token losses over all
trained tokens of all its micro-batches on all ranks divided by their total count (not a mean
of per-batch means), so gradient accumulation and data parallelism are exact.
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from sftlab import precision
from sftlab.config import RunConfig, save_config
from sftlab.data.prepare import PreparedData, prepare_data
from sftlab.errors import NonFiniteLossError, ResourceError
from sftlab.models.loading import load_causal_lm, load_tokenizer
from sftlab.train.batches import EvalBatches, RunBatches
from sftlab.train.checkpoint import (
    StashedTokenizer,
    check_resume_config,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    save_model,
    verify_saved_template,
)
from sftlab.train.distributed import (
    LossModule,
    World,
    choose_parallelism,
    init_world,
    local_state_bytes,
    plain_value,
    wrap,
)
from sftlab.train.embedding import add_embedding_grad_in_place
from sftlab.train.interrupt import StopRequest
from sftlab.train.log import RunLog
from sftlab.train.status import RunStatus
from sftlab.train.loss import unwrap_model
from sftlab.train.memory import PhaseMemory, enable_checkpointing, plan_memory, release_freed_memory
from sftlab.train.step import cut_into_pieces, filler_piece, forward_backward, trained_tokens


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_train_loss: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    best_val_loss: float | None
    best_step: int | None
    seconds: float
    tokens_per_second: float
    interrupted: str | None = None  # the signal that stopped the run at a checkpoint
    skipped_steps: int = 0  # steps skipped for a NaN/Inf loss (on_nan: skip)


def _apply_lora(model, config: RunConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_model(config: RunConfig, device: torch.device):
    """The model to train: the base weights, with LoRA adapters when asked (a resumed run loads
    its checkpoint's state into this). Under mixed precision the frozen base of LoRA is stored in
    the compute dtype (half the memory, no cast a step); what trains stays fp32 (master weights)."""
    model = load_causal_lm(config.model, device)
    if config.method != "lora":
        return model
    model = _apply_lora(model, config)
    current = precision.current()
    if current is not None and current.mixed:
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(current.dtype)
    return model


def _optimizer(model, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    # no decay on norms and biases (1-D tensors), as in nanoGPT / HF
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.resolved_learning_rate, betas=(0.9, 0.999),
        fused=config.fused_optimizer and device.type in ("cpu", "cuda"),
    )


def _scheduler(optimizer, config: RunConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler, optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps), num_training_steps=total_steps,
    )


@torch.no_grad()
def evaluate(module, batches, world: World, parallelism: str | None, pad_id: int) -> float:
    """Mean token loss over the validation batches of all ranks (as in training: token-weighted)."""
    inner = module.module if parallelism == "ddp" else module  # DDP's forward syncs buffers; not needed here
    was_training = module.training
    module.eval()
    count = int(world.max(len(batches))) if parallelism == "fsdp" else len(batches)  # FSDP2: same passes on every rank
    autocast = precision.autocast(world.device)
    loss_sum, tokens = 0.0, 0
    for index in range(count):
        batch = batches[index] if index < len(batches) else filler_piece(pad_id)
        batch = {k: v.to(world.device) for k, v in batch.items() if k != "num_tokens"}
        with autocast:
            summed = inner(**batch)
        if index < len(batches):
            loss_sum += float(summed)
            tokens += trained_tokens(batch)
    module.train(was_training)
    return world.sum(loss_sum) / max(world.sum(tokens), 1)


def _prepare(config: RunConfig, world: World, memory: PhaseMemory, output_dir: Path) -> tuple[PreparedData, StashedTokenizer]:
    """Data on every rank; rank 0 alone prepares and writes the cache, the others then read it."""
    cache_root = None if config.cache or not world.distributed else output_dir / ".prepared"
    with memory.phase("prepare data"):
        tokenizer = load_tokenizer(config.model)
        if world.is_main:
            data = prepare_data(config, tokenizer, use_cache=config.cache or world.distributed, cache_root=cache_root)
            data.save_report(output_dir)
        world.barrier()
        if not world.is_main:
            data = prepare_data(config, tokenizer, use_cache=True, cache_root=cache_root)
        tokenizer = StashedTokenizer(tokenizer)  # on disk from here on: frees its memory for training
        gc.collect()
    return data, tokenizer


def _build(config: RunConfig, world: World, memory: PhaseMemory, console: Console, probe: dict | None = None):
    """(module to call, plain model, parallelism, memory plan): loaded, checked against the
    model's own loss on `probe` (a couple of real rows), memory planned, wrapped."""
    with memory.phase("load model"):
        model = build_model(config, world.device)
    if probe is not None:
        _check_loss(model, probe, config, world, console)
    parallelism = None
    if world.distributed:
        parallelism, why = choose_parallelism(config.parallelism, model, world)
        console.print(f"parallelism: {parallelism.upper()} on {world.size} processes ({why})")
    elif config.method == "full" and config.embedding_grad_in_place and not config.compile:
        add_embedding_grad_in_place(model)  # outside autograd: single process only (never reduced)
    local = plan_memory(model, world.device, config.max_length, config.method, config.micro_batch_tokens,
                        config.gradient_checkpointing, shards=world.size if parallelism == "fsdp" else 1)
    plan = world.broadcast(local)  # every rank cuts its pieces under rank 0's budget, checkpoints alike
    if plan.checkpointing and not local.checkpointing:
        enable_checkpointing(model, config.method)
    console.print(f"micro-batch token budget: {plan.tokens} ({plan.reason})")
    if config.compile:
        # compile the decoder only: the chunked loss runs outside it, and shapes vary per batch
        unwrap_model(model).get_decoder().compile(dynamic=True)
    model.train()
    if config.method == "lora":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        console.print(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    module = LossModule(model, config.loss_chunk_size, config.loss_impl)
    if parallelism:
        module = wrap(module, parallelism, world, config.fsdp_cpu_offload)
    return module, model, parallelism, plan


def _check_loss(model, probe: dict, config: RunConfig, world: World, console: Console) -> None:
    """The loss sftlab trains with equals the model's own forward on real rows, or the run stops
    before its first step, naming both (a head sftlab would not reproduce, e.g. a new family's)."""
    from sftlab.train.loss import check_loss_against_model

    current = precision.current()
    tolerance = 1e-4 if current is None or not current.mixed else 2e-2  # bf16 logits round at ~0.4%
    batch = {k: v.to(world.device) for k, v in probe.items() if k != "num_tokens"}
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        with precision.autocast(world.device):
            result = check_loss_against_model(model, batch, config.loss_impl, tolerance)
    finally:
        model.train(was_training)
    console.print(f"loss check: {config.loss_impl} loss = the model's own forward on {len(probe['input_ids'])} rows "
                  f"(relative difference {result['relative_difference']:.1e}; head: {result['head']})", highlight=False)


def _resume_point(config: RunConfig, world: World, output_dir: Path, console: Console, force: bool) -> Path | None:
    folder = None
    if world.is_main:
        folder = find_resumable(output_dir, lambda message: console.print(f"[yellow]{message}[/]"))
        if folder is None:
            console.print(f"[yellow]no complete checkpoint in {output_dir} to resume from; starting fresh[/]")
        else:
            for change in check_resume_config(folder, config, force, world.size):
                console.print(f"[yellow]resuming despite a changed config key (--force): {change}[/]")
    return world.broadcast(folder)


def _save_final(module, model, tokenizer, config: RunConfig, world: World, folder: Path) -> None:
    """A plain Hugging Face folder (PEFT adapter for LoRA), whatever the parallelism."""
    state_dict = None
    if world.distributed:  # gathered on rank 0 (in CPU memory): the one full copy of the run
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state_dict = {name.removeprefix("model."): tensor for name, tensor in full.items()}
        _share_tied(model, state_dict)
    if world.is_main:
        save_model(model, tokenizer, config, folder, state_dict=state_dict)
    world.barrier()


def _share_tied(model, state_dict: dict) -> None:
    """Gathered tied weights (Llama's and Gemma's embedding = output layer) come back as two
    tensors; make them one again, so save_pretrained writes the weight once as it does alone."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state_dict]
        for name in present[1:]:
            state_dict[name] = state_dict[present[0]]


def train(config: RunConfig, resume: bool = False, console: Console | None = None, force: bool = False) -> TrainResult:
    """Fine-tune per `config` on this process (or, under torchrun, on all of them)."""
    world = init_world(config.device)
    status = RunStatus(config.output_dir, world.is_main)  # status.json: what `sftlab ui` shows
    status.running(resume)
    console = console or Console()
    try:
        chosen = precision.resolve(config.precision, world.device)
        if world.is_main:
            console.print(chosen.describe(), highlight=False)
        with precision.use(chosen, world.device):
            result = _train(config, world, resume, console, force, status)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last checkpoint (if any) resumes
        status.write("interrupted", interrupted_by="a second Ctrl-C")
        raise
    except BaseException as exc:
        status.write("failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        world.close()
    status.write("interrupted" if result.interrupted else "finished", interrupted_by=result.interrupted,
                 step=result.steps)
    return result


@dataclass
class _Run:
    """A run set up to train: the data, the model as wrapped for the world, the batches and
    the optimizer, and where it starts (0, or a checkpoint's step)."""

    config: RunConfig
    world: World
    console: Console
    output_dir: Path
    memory: PhaseMemory
    data: PreparedData
    tokenizer: object
    module: object  # what runs forward/backward (DDP/FSDP2-wrapped when distributed)
    model: object  # the unwrapped model (saved at the end)
    parallelism: str | None
    plan: object  # the micro-batch token budget
    batches: RunBatches
    val_batches: object
    optimizer: object
    scheduler: object
    start_step: int
    progress: dict  # a checkpoint's validation history

    def validate(self, phase: str = "validation") -> float | None:
        if not self.data.val:
            return None
        with self.memory.phase(phase):
            return evaluate(self.module, self.val_batches, self.world, self.parallelism, self.tokenizer.pad_token_id)


@dataclass
class _Tracker:
    """Validation across the run: before training, the best and its step, validations in a row
    without improvement (early stopping), skipped steps; saved in every checkpoint."""

    val_before: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    skipped_steps: int = 0
    val_after: float | None = None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> _Tracker:
        """The history a checkpoint saved (what it lacks keeps its default)."""
        return cls(**{name: saved[name] for name in cls().saved() if saved.get(name) is not None})

    def saved(self) -> dict:
        return {"val_before": self.val_before, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "skipped_steps": self.skipped_steps}

    def observe(self, step: int, val_loss: float) -> bool:
        """Record a validation; True when it is the best so far."""
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False


def _setup(config: RunConfig, world: World, resume: bool, console: Console, force: bool) -> _Run:
    output_dir = Path(config.output_dir)
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    memory = PhaseMemory(world.device)
    data, tokenizer = _prepare(config, world, memory, output_dir)
    console.print(
        f"data: {len(data.train)} train / {len(data.val)} validation rows, "
        f"{data.report['split']['train_trained_tokens']:,} trained tokens, "
        f"{data.report['total']['rows_dropped']} dropped, {data.report['total']['rows_truncated']} truncated"
        + (" (tokenized data from the cache)" if data.report.get("cache") == "hit" else "")
    )
    resume_from = _resume_point(config, world, output_dir, console, force) if resume else None
    from sftlab.data.batching import collate

    probe = collate([data.train[i] for i in range(min(2, len(data.train)))], tokenizer.pad_token_id) if len(data.train) else None
    module, model, parallelism, plan = _build(config, world, memory, console, probe)
    batches = RunBatches(data.train, config, world.rank, world.size, tokenizer.pad_token_id)
    global_batch = config.batch_size * config.gradient_accumulation_steps * world.size
    console.print(f"global batch: {global_batch} ({config.batch_size} x {config.gradient_accumulation_steps} "
                  f"accumulation x {world.size} processes); {batches.total_steps} steps")
    optimizer = _optimizer(module, config, world.device)
    scheduler = _scheduler(optimizer, config, batches.total_steps)
    start_step, progress = 0, {}
    if resume_from:
        start_step, progress = load_checkpoint(resume_from, module, optimizer, scheduler, config, world)
        console.print(f"resumed from {resume_from} at step {start_step}")
    val_batches = (EvalBatches(data.val, config.batch_size, tokenizer.pad_token_id, plan.tokens, world.rank, world.size)
                   if len(data.val) else [])
    return _Run(config, world, console, output_dir, memory, data, tokenizer, module, model, parallelism, plan, batches,
                val_batches, optimizer, scheduler, start_step, progress)


def _train(config: RunConfig, world: World, resume: bool, console: Console, force: bool,
           status: RunStatus) -> TrainResult:
    if not world.is_main:
        console = Console(quiet=True)
    run = _setup(config, world, resume, console, force)
    status.write("running", total_steps=run.batches.total_steps, start_step=run.start_step)
    batches, memory, output_dir = run.batches, run.memory, run.output_dir
    if run.start_step:
        track = _Tracker.from_checkpoint(run.progress)
    else:
        track = _Tracker(val_before=run.validate("first validation"))
        if track.val_before is not None:
            console.print(f"validation loss before training: {track.val_before:.4f}")
    # the optimizer's own list: FSDP2 leaves the root's parameters unsharded after a no-grad
    # forward, so module.parameters() would then name tensors the optimizer does not hold
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    last_step, stop, held = run.start_step, StopRequest(), None
    log = RunLog(output_dir, console, world.is_main, run.start_step, batches.total_steps)
    with log, stop:
        for step in range(run.start_step + 1, batches.total_steps + 1):
            last_step = step
            with memory.phase("training steps"):
                record = _optimizer_step(run, step, params, track)
                if held is None:  # what this rank holds once gradients and optimizer state exist
                    held = local_state_bytes(run.module, run.optimizer)
            log.record(record, record["input_tokens"])
            is_last, stop_early = _validate_and_log(run, step, track, log)
            if stop_early:
                log.print(f"early stopping at step {step}: no improvement in {track.bad_evals} validations "
                          f"(best {track.best_val_loss:.4f} at step {track.best_step})")
                break
            interrupted = world.any(stop.requested)
            if interrupted or (config.save_steps and step % config.save_steps == 0 and not is_last):
                log.flush(step)  # metrics.jsonl holds every step the checkpoint holds
                with memory.phase("save checkpoint"):
                    folder = save_checkpoint(run.module, run.optimizer, run.scheduler, step, config, run.tokenizer,
                                             world, output_dir, track.saved())
            if interrupted:
                console.print(f"[yellow]{stop.signal or 'stop signal'} on a rank: stopped after step {step}; "
                              f"checkpoint {folder}. Resume with: sftlab train CONFIG --resume[/]")
                track.val_after = None
                return _finish(run, held, log, last_step, track, interrupted=stop.signal or "signal")
    del params
    run.optimizer = run.scheduler = None  # the optimizer state is done with: saving needs the weights only
    release_freed_memory()
    return _save(run, held, log, last_step, track)


def _optimizer_step(run: _Run, step: int, params: list, track: _Tracker) -> dict:
    """One training step (forward/backward over its micro-batches, clip, optimizer step); the
    step's metrics. A NaN/Inf loss or gradient stops the run or skips the step (on_nan)."""
    config, world, batches = run.config, run.world, run.batches
    learning_rate = run.scheduler.get_last_lr()[0]
    done = _step(run.module, batches.micro_batches(step), batches, run.plan, world, run.parallelism, config,
                 run.console, step)
    scaler = precision.scaler()  # fp16: gradients unscaled before clipping; an overflow skips the step
    if scaler is not None:
        scaler.unscale_(run.optimizer)
    grad_norm = plain_value(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    loss_sum = done.loss_sum if not world.distributed else _global(done.loss_sum, world)
    input_tokens = int(world.sum(done.input_tokens))
    if scaler is not None and torch.isfinite(loss_sum):
        scaler.step(run.optimizer)  # skips the update when the scaled gradient overflowed
        scaler.update()
        track.skipped_steps += not bool(torch.isfinite(grad_norm))
    elif not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):
        track.skipped_steps += _non_finite(step, batches, world, config, run.console, run.optimizer)
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step, "epoch": round(step / batches.steps_per_epoch, 4),
            "loss": loss_sum / max(done.trained_tokens, 1), "grad_norm": grad_norm, "learning_rate": learning_rate,
            "tokens": done.trained_tokens, "input_tokens": input_tokens}


def _validate_and_log(run: _Run, step: int, track: _Tracker, log: RunLog) -> tuple[bool, bool]:
    """Validate when it is time (every eval_steps, and at the end), keep the best (save_best),
    count toward early stopping, write the step's metrics; (is the last step, stop early)."""
    config = run.config
    is_last = step == run.batches.total_steps
    val_loss = run.validate() if is_last or (config.eval_steps and step % config.eval_steps == 0) else None
    stop_early = False
    if val_loss is not None:
        if track.observe(step, val_loss) and config.save_best and config.eval_steps:
            with run.memory.phase("save best"):
                _save_final(run.module, run.model, run.tokenizer, config, run.world, run.output_dir / "best")
        stop_early = bool(config.early_stopping_patience) and track.bad_evals >= config.early_stopping_patience
        is_last = is_last or stop_early
        track.val_after = val_loss if is_last else None
    if step % config.logging_steps == 0 or is_last or val_loss is not None:
        log.flush(step, val_loss)
        if val_loss is not None and not is_last:
            log.print(f"step {step}: validation loss {val_loss:.4f}" + (" (best)" if track.best_step == step else ""))
    log.advance(step)
    return is_last, stop_early


def _save(run: _Run, held, log: RunLog, last_step: int, track: _Tracker) -> TrainResult:
    """The final weights, the template check on them, and the summary."""
    if track.val_after is not None:
        before = f"{track.val_before:.4f} -> " if track.val_before is not None else ""
        run.console.print(f"validation loss: {before}{track.val_after:.4f}")
    with run.memory.phase("save final"):
        _save_final(run.module, run.model, run.tokenizer, run.config, run.world, run.output_dir / "final")
    if run.world.is_main:
        with run.memory.phase("check saved template"):
            verify_saved_template(run.output_dir / "final", run.data.samples, run.config.train_on)
        if run.world.distributed and not run.config.cache:
            shutil.rmtree(run.output_dir / ".prepared", ignore_errors=True)
    return _finish(run, held, log, last_step, track)


def _step(module, micro_batches, batches: RunBatches, plan, world, parallelism, config, console, step):
    """Forward and backward of one step; on CUDA out-of-memory, again at half the token budget."""
    while True:
        pieces = cut_into_pieces(micro_batches, batches.unit_size, batches.collate, plan.tokens)
        try:
            return forward_backward(module, pieces, world.device, world, parallelism,
                                    grad_into_weight=not world.distributed, pad_id=batches.pad_id)
        except torch.OutOfMemoryError:
            for p in module.parameters():
                p.grad = None
            if world.device.type != "cuda" or len(pieces) == sum(len(m) for m in micro_batches) or world.distributed:
                raise ResourceError(
                    f"out of memory at step {step} with micro_batch_tokens {plan.tokens} (max_length "
                    f"{config.max_length}): lower max_length or micro_batch_tokens, set gradient_checkpointing: "
                    "true, or use method: lora"
                ) from None
            torch.cuda.empty_cache()
            plan.tokens //= 2
            console.print(f"[yellow]out of GPU memory at step {step}: micro_batch_tokens halved to {plan.tokens}[/]")


def _global(loss_sum: torch.Tensor, world: World) -> torch.Tensor:
    return torch.tensor(world.sum(float(loss_sum)), device=loss_sum.device)


def _non_finite(step: int, batches: RunBatches, world: World, config: RunConfig, console: Console, optimizer) -> int:
    """A NaN/Inf step: skipped and counted (on_nan: skip), or the run stops naming its rows."""
    rows = batches.sources(step)
    shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    if config.on_nan == "skip":
        console.print(f"[yellow]step {step}: loss or gradient is NaN/Inf; step skipped (on_nan: skip). Rows: {shown}[/]")
        optimizer.zero_grad(set_to_none=True)
        return 1
    raise NonFiniteLossError(
        f"step {step}: the loss or gradient norm is NaN/Inf ({f'rank {world.rank} ' if world.distributed else ''}"
        f"rows: {shown}). Check those rows, "
        "lower learning_rate, or set on_nan: skip to skip such steps and count them"
    )


def _finish(run: _Run, held, log: RunLog, last_step: int, track: _Tracker, interrupted=None) -> TrainResult:
    world, memory, output_dir = run.world, run.memory, run.output_dir
    seconds = time.perf_counter() - log.started
    result = TrainResult(
        output_dir=str(output_dir), steps=last_step, final_train_loss=log.last_loss, val_loss_before=track.val_before,
        val_loss_after=track.val_after, best_val_loss=track.best_val_loss, best_step=track.best_step,
        seconds=round(seconds, 2), tokens_per_second=round(log.tokens_per_second, 2), interrupted=interrupted,
        skipped_steps=track.skipped_steps,
    )
    memory.close()
    mb = lambda b: round(b / 2**20, 1)
    ranks = world.gather({"rank": world.rank, "process_peak_mb": memory.summary()["process_peak_mb"],
                          "held_mb": {k: mb(v) for k, v in (held or {}).items()}})
    if log.enabled:
        (output_dir / "train_summary.json").write_text(json.dumps({
            **asdict(result), "world_size": world.size, "micro_batch_tokens": run.plan.tokens,
            "memory": {**memory.summary(), **run.plan.summary(), "ranks": ranks},
        }, indent=2))
        log.console.print(memory.table())
        if not interrupted:
            log.console.print(f"saved {output_dir / 'final'} ({last_step - run.start_step} steps in {seconds:.0f}s)")
    return result
