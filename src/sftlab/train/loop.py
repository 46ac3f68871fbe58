"""The training loop, top to bottom: set up, iterate, step, log, checkpoint.

Devices, LoRA and resuming are switches in this one function, not subclasses. The loss of an
optimizer step is the sum of per-token losses over all trained tokens of all its micro-batches
divided by their total count (not a mean of per-batch means), so gradient accumulation is
exact.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sftlab.config import RunConfig, save_config
from sftlab.data.batching import batch_order, collate, split_by_tokens
from sftlab.data.packing import collate_packed, packed_batch_order
from sftlab.data.prepare import prepare_data
from sftlab.models.loading import load_causal_lm, load_tokenizer, pick_device
from sftlab.train.checkpoint import (
    StashedTokenizer,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
    save_model,
    verify_saved_template,
)
from sftlab.train.embedding import add_embedding_grad_in_place
from sftlab.train.loss import unwrap_model, evaluate_loss
from sftlab.train.memory import PhaseMemory, plan_memory, release_freed_memory
from sftlab.train.step import cut_into_pieces, forward_backward


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


def _apply_lora(model, config: RunConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


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


def _eval_batches(examples, batch_size: int, pad_id: int, budget: int):
    """Validation batches: batch_size examples of similar length, cut under the token budget."""
    ordered = sorted(examples, key=len)
    batches = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        batches += [collate([group[i] for i in part], pad_id) for part in split_by_tokens([len(e) for e in group], budget)]
    return batches


def build_model(config: RunConfig, device: torch.device, resume_from: Path | None = None):
    """The model to train: base weights (or a checkpoint's), with LoRA adapters when asked."""
    if config.method == "full":
        return load_causal_lm(str(resume_from) if resume_from else config.model, device)
    model = load_causal_lm(config.model, device)
    if resume_from:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    return _apply_lora(model, config)


def train(config: RunConfig, resume: bool = False, console: Console | None = None) -> TrainResult:
    console = console or Console()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")

    # -- set up -----------------------------------------------------------------------------
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    memory = PhaseMemory(device)
    with memory.phase("prepare data"):
        tokenizer = load_tokenizer(config.model)
        data = prepare_data(config, tokenizer)
        data.save_report(output_dir)
        tokenizer = StashedTokenizer(tokenizer)  # on disk from here on: frees its memory for training
        gc.collect()
    console.print(
        f"data: {len(data.train)} train / {len(data.val)} validation rows, "
        f"{data.report['split']['train_trained_tokens']:,} trained tokens, "
        f"{data.report['total']['rows_dropped']} dropped, {data.report['total']['rows_truncated']} truncated"
        + (" (tokenized data from the cache)" if data.report.get("cache") == "hit" else "")
    )

    checkpoints = list_checkpoints(output_dir) if resume else []
    resume_from = checkpoints[-1] if checkpoints else None
    if resume and resume_from is None:
        console.print(f"[yellow]no checkpoint in {output_dir} to resume from; starting fresh[/]")
    with memory.phase("load model"):
        model = build_model(config, device, resume_from)
    if config.method == "full" and config.embedding_grad_in_place and not config.compile:
        add_embedding_grad_in_place(model)
    plan = plan_memory(model, device, config.max_length, config.method, config.micro_batch_tokens,
                       config.gradient_checkpointing)
    budget = plan.tokens
    console.print(f"micro-batch token budget: {budget} ({plan.reason})")
    if config.compile:
        # compile the decoder only: the chunked loss runs outside it, and shapes vary per batch
        unwrap_model(model).get_decoder().compile(dynamic=True)
    model.train()
    if config.method == "lora":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        console.print(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    lengths = [len(e) for e in data.train]
    epoch_orders: dict[int, list] = {}

    def epoch_order(epoch: int) -> list:
        # orders are fixed by (seed, epoch), so a resumed run continues with the very batches an
        # uninterrupted run would have seen
        if epoch not in epoch_orders:
            if config.packing:
                epoch_orders[epoch] = packed_batch_order(lengths, config.max_length, config.batch_size, config.seed, epoch)
            else:
                epoch_orders[epoch] = batch_order(lengths, config.batch_size, config.seed, epoch, config.group_by_length)
        return epoch_orders[epoch]

    def micro_batch_units(index: int) -> list:
        """Micro-batch `index` of the run: its examples, or its packed rows of examples."""
        epoch, position = divmod(index, micro_per_epoch)
        units = epoch_order(epoch)[position]
        if config.packing:
            return [[data.train[i] for i in row] for row in units]
        return [data.train[i] for i in units]

    if config.packing:
        unit_size = lambda row: sum(len(e) for e in row)
        collate_units = lambda rows: collate_packed(rows, tokenizer.pad_token_id)
    else:
        unit_size, collate_units = len, lambda examples: collate(examples, tokenizer.pad_token_id)

    micro_per_epoch = len(epoch_order(0))
    steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    optimizer = _optimizer(model, config, device)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    start_step = load_trainer_state(resume_from, optimizer, scheduler) if resume_from else 0
    if resume_from:
        console.print(f"resumed from {resume_from} at step {start_step}")

    val_batches = _eval_batches(data.val, config.batch_size, tokenizer.pad_token_id, budget) if data.val else []

    def validate(phase: str = "validation") -> float | None:
        if not val_batches:
            return None
        with memory.phase(phase):
            return evaluate_loss(model, val_batches, device, config.loss_chunk_size)["loss"]

    metrics_path = output_dir / "metrics.jsonl"
    if resume_from and metrics_path.exists():  # drop lines logged after the checkpoint we resume from
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    elif not resume_from:
        metrics_path.write_text("")
    tensorboard = _tensorboard(output_dir)

    val_before = validate("first validation") if not resume_from else None
    if val_before is not None:
        console.print(f"validation loss before training: {val_before:.4f}")

    # -- iterate ----------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    pending: list[dict] = []  # step records whose loss is still a device tensor (synced at log time)
    last_loss, val_after, input_tokens_done, started = None, None, 0, time.perf_counter()
    best_val, best_step, bad_evals, stop_early, shown_val = None, None, 0, False, "-"
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(), console=console, transient=False,
    )
    with progress:
        task = progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-", tps="-", val="-")
        last_step = start_step
        for step in range(start_step + 1, total_steps + 1):
            last_step = step
            # -- step: accumulate micro-batches, normalise by the step's trained-token count --
            first = (step - 1) * config.gradient_accumulation_steps
            micro_batches = [micro_batch_units(first + j) for j in range(config.gradient_accumulation_steps)]
            learning_rate = scheduler.get_last_lr()[0]
            with memory.phase("training steps"):
                while True:
                    pieces = cut_into_pieces(micro_batches, unit_size, collate_units, budget)
                    try:
                        done = forward_backward(model, pieces, device, config.loss_chunk_size, config.loss_impl)
                        break
                    except torch.OutOfMemoryError:
                        optimizer.zero_grad(set_to_none=True)
                        if device.type != "cuda" or len(pieces) == sum(len(m) for m in micro_batches):
                            raise _out_of_memory(config) from None
                        torch.cuda.empty_cache()
                        budget //= 2
                        console.print(f"[yellow]out of GPU memory at step {step}: micro_batch_tokens halved to {budget}[/]")
                if config.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                else:
                    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_tokens, step_input_tokens = done.trained_tokens, done.input_tokens
            loss_sum = done.loss_sum
            input_tokens_done += step_input_tokens
            pending.append({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_sum / max(step_tokens, 1),
                            "grad_norm": grad_norm, "learning_rate": learning_rate, "tokens": step_tokens,
                            "input_tokens": step_input_tokens})

            # -- log (the only host-device sync of the loop) ---------------------------------
            is_last = step == total_steps
            val_loss = validate() if is_last or (config.eval_steps and step % config.eval_steps == 0) else None
            if val_loss is not None:
                if best_val is None or val_loss < best_val:
                    best_val, best_step, bad_evals = val_loss, step, 0
                    if config.save_best and config.eval_steps:
                        with memory.phase("save best"):
                            save_model(model, tokenizer, config, output_dir / "best")
                else:
                    bad_evals += 1
                stop_early = bool(config.early_stopping_patience) and bad_evals >= config.early_stopping_patience
                is_last = is_last or stop_early
                val_after = val_loss if is_last else None
            if step % config.logging_steps == 0 or is_last or val_loss is not None:
                elapsed = time.perf_counter() - started
                tokens_per_second = input_tokens_done / elapsed
                with metrics_path.open("a") as handle:
                    for record in pending:
                        record["loss"] = float(record["loss"])
                        record["grad_norm"] = float(record["grad_norm"])
                        record["tokens_per_second"] = round(tokens_per_second, 2)
                        record["elapsed_s"] = round(elapsed, 2)
                        if record["step"] == step and val_loss is not None:
                            record["val_loss"] = val_loss
                        handle.write(json.dumps(record) + "\n")
                        if tensorboard:
                            tensorboard.add_scalar("train/loss", record["loss"], record["step"])
                            tensorboard.add_scalar("train/learning_rate", record["learning_rate"], record["step"])
                last_loss = pending[-1]["loss"]
                pending = []
                if val_loss is not None:
                    shown_val = f"{val_loss:.4f}"
                    if not is_last:
                        console.print(f"step {step}: validation loss {val_loss:.4f}" + (" (best)" if best_step == step else ""))
                progress.update(task, loss=f"{last_loss:.4f}", lr=f"{learning_rate:.2e}", tps=f"{tokens_per_second:.0f}",
                                val=shown_val)
            progress.update(task, completed=step)
            if stop_early:
                console.print(f"early stopping at step {step}: no improvement in {bad_evals} validations "
                              f"(best {best_val:.4f} at step {best_step})")
                break

            # -- checkpoint -------------------------------------------------------------------
            if config.save_steps and step % config.save_steps == 0 and not is_last:
                with memory.phase("save checkpoint"):
                    save_checkpoint(model, tokenizer, config, optimizer, scheduler, step, output_dir)

    seconds = time.perf_counter() - started
    del optimizer, scheduler, params  # the optimizer state is done with: saving needs the weights only
    release_freed_memory()
    if val_after is not None:
        before = f"{val_before:.4f} -> " if val_before is not None else ""
        console.print(f"validation loss: {before}{val_after:.4f}")
    with memory.phase("save final"):
        save_model(model, tokenizer, config, output_dir / "final")
    with memory.phase("check saved template"):
        verify_saved_template(output_dir / "final", data.samples, config.train_on)
    if tensorboard:
        tensorboard.close()
    result = TrainResult(
        output_dir=str(output_dir), steps=last_step, final_train_loss=last_loss, val_loss_before=val_before,
        val_loss_after=val_after, best_val_loss=best_val, best_step=best_step, seconds=round(seconds, 2),
        tokens_per_second=round(input_tokens_done / seconds, 2) if seconds > 0 else 0.0,
    )
    (output_dir / "train_summary.json").write_text(json.dumps({
        **asdict(result), "micro_batch_tokens": budget, "memory": {**memory.summary(), **plan.summary()},
    }, indent=2))
    memory.close()
    console.print(memory.table())
    console.print(f"saved {output_dir / 'final'} ({last_step - start_step} steps in {seconds:.0f}s)")
    return result


def _out_of_memory(config: RunConfig) -> RuntimeError:
    return RuntimeError(
        f"out of memory with one example per forward pass (max_length {config.max_length}): lower max_length, "
        "set gradient_checkpointing: true, or use method: lora"
    )


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))
