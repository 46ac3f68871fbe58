"""Which precision sftlab computes in, and why: `precision: auto | fp32 | bf16 | fp16`.

    | precision | weights a full fine-tune keeps | frozen weights (LoRA base) | compute             |
    |-----------|--------------------------------|----------------------------|---------------------|
    | fp32      | fp32                           | fp32                       | fp32                |
    | bf16      | fp32 master weights + AdamW    | bf16                       | bf16 autocast       |
    | fp16      | fp32 master weights + AdamW    | fp16                       | fp16 autocast, with |
    |           |                                |                            | a loss scaler       |

The loss and its reductions are fp32 in every case (sftlab.train.loss upcasts the logits of
each chunk). `auto` is bf16 where the hardware multiplies bf16 natively: a CUDA device that
supports bf16, or a CPU whose ISA level (torch.backends.cpu.get_cpu_capability) or flags show
AMX or AVX512-BF16; fp32 elsewhere. Machines differ, so it is detected at start, and the run
says which it took and why.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    reason: str  # why (auto's detection, or "set in the config")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self, device: torch.device):
        """The compute context: autocast to the compute dtype, or nothing for fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16), and what showed it."""
    capability = ""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older or unusual builds: fall back to the kernel's flags
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if "AMX" in capability.upper() or "amx_bf16" in flags:
        return True, f"the CPU has AMX (ISA level {capability or 'unknown'}, flag amx_bf16: {'amx_bf16' in flags})"
    if "avx512_bf16" in flags:
        return True, "the CPU has AVX512-BF16"
    return False, f"the CPU has neither AMX nor AVX512-BF16 (ISA level {capability or 'unknown'})"


def resolve(setting: str, device: torch.device) -> Precision:
    """The precision a run computes in on `device`."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r}: use one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision: bf16, but this GPU does not support bf16; use fp16 or fp32")
        return Precision(setting, "set in the config")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16")
    if device.type == "cpu":
        native, why = cpu_bf16_support()
        return Precision("bf16" if native else "fp32", f"auto: {why}")
    return Precision("fp32", f"auto: no native bf16 known on {device.type}")


# -- the run's precision, for the code that computes under it -------------------------------------

_CURRENT: ContextVar[Precision | None] = ContextVar("sftlab_precision", default=None)
_SCALER: ContextVar[object | None] = ContextVar("sftlab_grad_scaler", default=None)


@contextlib.contextmanager
def use(precision: Precision, device: torch.device):
    """Compute under `precision` inside this block (training sets it for the whole run); fp16
    gets a gradient scaler (`scaler()`)."""
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    token, scaler_token = _CURRENT.set(precision), _SCALER.set(scaler)
    try:
        yield precision
    finally:
        _CURRENT.reset(token)
        _SCALER.reset(scaler_token)


def current() -> Precision | None:
    return _CURRENT.get()


def scaler():
    """fp16's loss scaler in the current run (None otherwise)."""
    return _SCALER.get()


def autocast(device: torch.device):
    """The one autocast of sftlab's compute: the current run's precision; outside a run, bf16 on
    CUDA (sftlab's default there) and none elsewhere."""
    precision = _CURRENT.get()
    if precision is None:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    return precision.autocast(device)


def inference_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype inference loads weights in for a run trained with `setting`: its compute dtype
    on this device (fp16 only on CUDA)."""
    precision = resolve(setting if setting in PRECISIONS else "auto", device)
    if precision.name == "fp16" and device.type != "cuda":
        return torch.float32
    return precision.dtype
