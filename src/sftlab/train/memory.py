"""Memory: where a run's peak happens, and how many tokens one forward/backward piece may hold.

Two things live here:

- ``PhaseMemory`` measures the peak of each phase of a run (loading, data, validation,
  training steps, saving, ...) and which phase set the process's peak. The breakdown goes into
  ``train_summary.json`` and is printed at the end of ``sftlab train``.
- ``micro_batch_token_budget`` picks ``micro_batch_tokens: auto``: the padded tokens one
  forward/backward piece may hold. The loss of a step is exact whatever the cut (summed token
  losses over the step divided by the step's trained tokens), so the budget changes memory and
  speed, never the result.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sftlab import precision

MB = 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident memory of this process now (MB); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / MB
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory since start or the last reset (MB)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> None:
    """Hand memory that Python and PyTorch freed back to the OS (glibc keeps it otherwise), so
    the phases after training are measured, and run, at what they really hold."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def available_memory_bytes(device: torch.device) -> int:
    """Memory this process could still use: free CUDA memory, or the machine's available RAM
    (bounded by a cgroup limit when one is set)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    available = int(psutil.virtual_memory().available)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = open(path).read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            used = psutil.Process().memory_info().rss
            available = min(available, int(limit) - used)
    return max(available, 0)


class PhaseMemory:
    """Peak memory and time of each phase of a run; a phase that runs several times keeps its max.

        memory = PhaseMemory(device)
        with memory.phase("load model"):
            ...
        memory.summary()  # {"load model": {"peak_mb": ..., "seconds": ..., ...}, ...}

    On CPU a phase's peak is exact when the phase raised the process's high-water mark (VmHWM);
    otherwise it is the highest RSS a sampler thread saw (every 10 ms). The high-water mark is
    never reset, so `/usr/bin/time -v` around the run still reports the whole process's peak.
    On CUDA it is the allocator's peak, reset per phase.
    """

    INTERVAL = 0.01

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.phases: dict[str, dict] = {}
        self._current: str | None = None
        self._sampled = 0.0
        self._stop = threading.Event()
        self._sampler = None
        if not self.cuda and rss_mb() > 0:
            self._sampler = threading.Thread(target=self._sample, name="sftlab-memory", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            if self._current is not None:
                self._sampled = max(self._sampled, rss_mb())

    def close(self) -> None:
        self._stop.set()

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        hwm_before = peak_rss_mb()
        self._sampled, self._current = rss_mb(), name
        started = time.perf_counter()
        try:
            yield
        finally:
            self._current = None
            hwm_after = peak_rss_mb()
            raised = hwm_after > hwm_before + 1
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() / MB
            else:
                peak = max(self._sampled, rss_mb(), hwm_after if raised else 0.0)
            entry = self.phases.setdefault(name, {"peak_mb": 0.0, "raised_process_peak": False, "seconds": 0.0, "count": 0})
            entry["peak_mb"] = round(max(entry["peak_mb"], peak), 1)
            entry["raised_process_peak"] = entry["raised_process_peak"] or raised
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - started, 2)
            entry["count"] += 1

    def summary(self) -> dict:
        return {"process_peak_mb": round(peak_rss_mb(), 1),
                "phases": {name: dict(entry) for name, entry in self.phases.items()}}

    def table(self) -> str:
        unit = "peak MB (CUDA)" if self.cuda else "peak MB (RSS)"
        width = max((len(n) for n in self.phases), default=5)
        lines = [f"{'phase':<{width}}  {unit}  seconds"]
        for name, entry in self.phases.items():
            mark = "  <- process peak" if entry["raised_process_peak"] and not self.cuda else ""
            lines.append(f"{name:<{width}}  {entry['peak_mb']:>13.0f}  {entry['seconds']:>7.1f}{mark}")
        return "\n".join(lines)


# -- the micro-batch token budget -----------------------------------------------------------------

# On CPU, RAM is shared with everything else on the machine: activations may take at most this
# share of the model's own training state (weights + gradients + optimizer), so a run's peak
# stays close to the floor every trainer pays. On CUDA the device's free memory is the limit.
CPU_ACTIVATION_SHARE = 0.5
CUDA_FREE_SHARE = 0.8  # of what is free once gradients and optimizer state are allocated
# On CPU a piece of ~512 tokens already keeps the cores' matmuls at full speed; bigger pieces
# only cost memory. Measured with batch 8 x max_length 512 (whole process): SmolLM2-135M at 512
# tokens a piece 93 tok/s / 3.6 GB, at 641 87 tok/s / 4.5 GB, in one 4,096-token piece
# 87 tok/s / 10.3 GB; Gemma 3 270M no faster at 1,024 than at 512. So on CPU auto stops here
# (or at one max_length row, when that is longer).
CPU_PIECE_TOKENS = 512
# backward's transient buffers on top of the saved tensors (SmolLM2-135M at 512 tokens: 1.28 MB
# a token saved, ~1.9 MB a token of peak RSS per extra token)
ACTIVATION_MARGIN = 1.5


def _saved_bytes(model, length: int, device: torch.device) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of one row of `length`
    tokens through the decoder, each storage counted once, parameters excluded, and so are the
    compute-dtype copies of the weights that autocast saves (a cost of the model, not of tokens)."""
    from sftlab.train.loss import unwrap_model

    decoder = unwrap_model(model).get_decoder()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {(tuple(p.shape), p.dtype) for p in model.parameters() if p.dim() >= 2}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        weight_copy = tensor.dim() >= 2 and any(tuple(tensor.shape) == shape and tensor.dtype != dtype
                                                 for shape, dtype in shapes)
        if storage.data_ptr() not in params and not weight_copy:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.arange(length, device=device)[None] % max(2, unwrap_model(model).config.vocab_size)
    autocast = precision.autocast(device)  # bf16 activations take half the bytes of fp32 ones
    was_training = model.training
    model.train()
    # the probe must not move the random state (LoRA dropout draws from it): forked and restored
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), autocast, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        if not hidden.requires_grad:  # nothing trainable under the decoder
            seen.clear()
    del hidden
    model.train(was_training)
    return sum(seen.values())


PROBE_LENGTHS = (32, 64)


def activation_bytes_per_token(model, length: int, device: torch.device) -> float:
    """Bytes autograd keeps for backward per token of a row of `length` tokens.

    Measured, not guessed: every tensor saved for backward in a forward of the decoder is
    counted once (by storage), which holds for any architecture, attention kernel, LoRA or
    activation checkpointing. The probe rows are short (32 and 64 tokens) and the result is
    extrapolated as a·T + b·T² (attention kernels that keep the score matrix grow with T²):
    a probe at full length would leave its activations' worth of fragmented heap behind on CPU
    (measured: +750 MB on the peak of a Gemma 3 run)."""
    short, long = PROBE_LENGTHS
    if length <= long:
        return _saved_bytes(model, length, device) / length
    per_short = _saved_bytes(model, short, device) / short
    per_long = _saved_bytes(model, long, device) / long
    quadratic = max(0.0, (per_long - per_short) / (long - short))
    linear = per_long - quadratic * long
    return max(linear + quadratic * length, per_long)


def training_state_bytes(model) -> int:
    """Weights + gradients + AdamW's two moments of the trainable parameters."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trainable * (4 + 8)


# Recomputing the decoder's forward in backward (activation checkpointing) costs 2 FLOPs per
# decoder weight and token; a step costs 6 per weight (full) or ~4 (LoRA: no weight gradients).
# Where the output layer dominates (Gemma 3: 168M of 268M weights are its 262k vocabulary),
# the recompute adds little and auto turns checkpointing on.
RECOMPUTE_SHARE_LIMIT = 0.15


def recompute_share(model, method: str) -> float:
    """FLOPs that activation checkpointing adds, as a share of a training step's FLOPs."""
    from torch import nn

    from sftlab.train.loss import unwrap_model

    lm = unwrap_model(model)
    decoder = sum(m.weight.numel() for m in lm.get_decoder().modules()
                  if isinstance(m, nn.Linear) and not type(m).__module__.startswith("peft"))
    output = lm.get_output_embeddings().weight.numel()
    return 2 * decoder / ((6 if method == "full" else 4) * (decoder + output))


def enable_checkpointing(model, method: str) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name since 5.x (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if method == "lora":
        model.enable_input_require_grads()


@dataclass
class MemoryPlan:
    tokens: int  # micro_batch_tokens
    checkpointing: bool
    reason: str
    training_state_bytes: int
    activation_allowance_bytes: float | None = None  # auto budget only
    activation_bytes_per_token: float | None = None  # auto budget only, measured (before the margin)

    def summary(self) -> dict:
        mb = lambda b: None if b is None else round(b / MB, 3)
        return {"training_state_mb": mb(self.training_state_bytes),
                "activation_allowance_mb": mb(self.activation_allowance_bytes),
                "activation_mb_per_token": mb(self.activation_bytes_per_token),
                "gradient_checkpointing": self.checkpointing}


def _activation_allowance(model, device: torch.device, state: int) -> tuple[float, str]:
    if device.type == "cuda":
        to_come = sum(p.numel() for p in model.parameters() if p.requires_grad) * (4 + 8)
        return CUDA_FREE_SHARE * max(available_memory_bytes(device) - to_come, 0), f"{CUDA_FREE_SHARE:.0%} of free GPU memory"
    lean = CPU_ACTIVATION_SHARE * state
    room = 0.5 * max(available_memory_bytes(device) - state, 0)
    if lean <= room:
        return lean, f"{CPU_ACTIVATION_SHARE:.0%} of the {state / 1e9:.2f} GB of weights, gradients and optimizer state"
    return room, "half the available RAM"


def _layer_count(model) -> int:
    from sftlab.train.loss import unwrap_model

    config = unwrap_model(model).config
    config = getattr(config, "text_config", None) or config
    return max(1, int(getattr(config, "num_hidden_layers", 1)))


def plan_memory(model, device: torch.device, max_length: int, method: str,
                budget_setting: str | int = "auto", checkpointing_setting: str | bool = "auto",
                shards: int = 1) -> MemoryPlan:
    """Resolve `gradient_checkpointing` and `micro_batch_tokens` (and turn checkpointing on).

    Checkpointing auto: on when it adds under RECOMPUTE_SHARE_LIMIT of a step's FLOPs, or when
    one max_length row's activations exceed the memory allowance. Budget auto: as many tokens
    as the allowance holds at the measured activation bytes per token, never fewer than one
    max_length row (the smallest piece there is); a number is taken as given. `shards`: the
    processes FSDP2 spreads the training state over (each holds 1/shards of it)."""
    reasons = []
    checkpointing = checkpointing_setting is True
    if checkpointing_setting == "auto":
        share = recompute_share(model, method)
        checkpointing = share < RECOMPUTE_SHARE_LIMIT
        reasons.append(f"activation checkpointing {'on' if checkpointing else 'off'} (auto: recompute adds "
                       f"{share:.0%} to a step's FLOPs, limit {RECOMPUTE_SHARE_LIMIT:.0%})")
    state = training_state_bytes(model) // shards
    if budget_setting != "auto":
        if checkpointing:
            enable_checkpointing(model, method)
        return MemoryPlan(int(budget_setting), checkpointing, "; ".join(["micro_batch_tokens set in the config", *reasons]), state)
    # on CPU the allowance follows the whole model's training state even when FSDP2 shards it:
    # smaller pieces would only mean more all-gathers per step, for memory the shards freed
    allowance, why = _activation_allowance(model, device, state if device.type == "cuda" else state * shards)
    plain = activation_bytes_per_token(model, max_length, device)
    if not checkpointing and checkpointing_setting == "auto" and plain * ACTIVATION_MARGIN * max_length > allowance:
        checkpointing = True
        reasons[-1] = "activation checkpointing on (auto: one max_length row's activations exceed the allowance)"
    measured = plain
    if checkpointing:
        # kept: the checkpointed layers' inputs; in backward one layer at a time is recomputed,
        # its activations and their gradients alive together
        enable_checkpointing(model, method)
        measured = activation_bytes_per_token(model, max_length, device) + 2 * plain / _layer_count(model)
    per_token = measured * ACTIVATION_MARGIN
    tokens = int(allowance / per_token) if per_token > 0 else 1 << 30
    if device.type == "cpu" and tokens > CPU_PIECE_TOKENS:
        tokens, why = CPU_PIECE_TOKENS, why + f", capped at {CPU_PIECE_TOKENS} tokens on CPU (no faster beyond)"
    tokens = max(max_length, tokens)
    reasons.insert(0, f"auto: activations {measured / MB:.2f} MB/token measured at {max_length} tokens; "
                      f"allowance {allowance / 1e9:.2f} GB = {why}")
    return MemoryPlan(tokens, checkpointing, "; ".join(reasons), state, allowance, measured)
