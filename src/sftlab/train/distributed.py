"""Many processes with PyTorch's own stack: torchrun's environment, DDP or FSDP2, reductions.

One process is the default and needs nothing here beyond a `World` of size 1. Under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process joins a process
group (gloo on CPU, NCCL on CUDA) and the model is wrapped:

- DDP replicates the model and all-reduces gradients in backward;
- FSDP2 (``fully_shard``) shards parameters, gradients and optimizer state: one group per decoder
  layer plus the root, so a layer's full weights exist only while it runs.

The loss is computed inside the wrapped module's forward (``LossModule``), so DDP's reducer and
FSDP2's unshard / reduce-scatter hooks see every gradient. sftlab's two gradients that bypass
autograd (the fused loss adding into ``lm_head.weight.grad``, the in-place embedding gradient)
would never be reduced, so under distribution they are switched off and the gradients go
through autograd (a weight-sized buffer per micro-batch for the output layer instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from sftlab.train.loss import token_loss_sum, unwrap_model


@dataclass
class World:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce(self, value: float, op) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def broadcast(self, obj):
        """rank 0's Python object, on every rank."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj) -> list:
        """Every rank's Python object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_world(device_preference: str = "auto") -> World:
    """The World of this process: joins the process group when torchrun started several."""
    from sftlab.models.loading import pick_device

    device = pick_device(device_preference)
    if not launched_by_torchrun():
        return World(device=device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (size,))
    return World(rank=rank, size=size, local_rank=local_rank, device=device, mesh=mesh)


class LossModule(nn.Module):
    """The model and its loss in one forward, so DDP / FSDP2 hooks see the whole computation:
    returns the summed token loss of the batch over its trained positions."""

    def __init__(self, model: nn.Module, chunk_size: int = 0, impl: str = "fused"):
        super().__init__()
        self.model = model
        self.chunk_size, self.impl = chunk_size, impl

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, weight_grad_scale=None):
        batch = {"input_ids": input_ids, "labels": labels}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if position_ids is not None:
            batch["position_ids"] = position_ids
        summed, _ = token_loss_sum(self.model, batch, self.chunk_size, self.impl, weight_grad_scale=weight_grad_scale)
        return summed


# DDP when the model, its gradients and AdamW's state take at most this share of one device's
# memory (the rest holds activations); FSDP2 otherwise.
DDP_MEMORY_SHARE = 0.5


def choose_parallelism(setting: str, model: nn.Module, world: World) -> tuple[str, str]:
    """(ddp | fsdp, why) for a multi-process run."""
    from sftlab.train.memory import available_memory_bytes, training_state_bytes

    state = training_state_bytes(model)
    if setting != "auto":
        return setting, "set in the config"
    if world.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(world.device).total_memory
        where = "of one GPU's memory"
    else:
        import psutil

        capacity = min(psutil.virtual_memory().total, available_memory_bytes(world.device) + state) / world.size
        where = "of this process's share of RAM"
    share = state / capacity
    kind = "ddp" if share <= DDP_MEMORY_SHARE else "fsdp"
    return kind, (f"auto: weights, gradients and optimizer state take {state / 1e9:.2f} GB = {share:.0%} {where} "
                  f"({'at most' if kind == 'ddp' else 'more than'} {DDP_MEMORY_SHARE:.0%})")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's blocks, whatever the family calls them (`layers`, GPT-2's `h`, ...): the
    ModuleList of the decoder with one block a hidden layer."""
    lm = unwrap_model(model)
    decoder = lm.get_decoder()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    count = getattr(config, "num_hidden_layers", None)
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m) and (count is None or len(m) == count)]
    if not lists:
        raise ValueError(f"FSDP2: cannot find the decoder layers of {type(decoder).__name__} (a ModuleList of "
                         f"{count} blocks)")
    return list(max(lists, key=len))


def wrap(loss_module: LossModule, kind: str, world: World, cpu_offload: bool = False) -> nn.Module:
    """The LossModule under DDP or FSDP2 (one shard group per decoder layer, then the root)."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        # gradients live in DDP's communication buckets: no copy in and out, no second buffer
        return DistributedDataParallel(loss_module, device_ids=device_ids, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from sftlab import precision

    kwargs = {"mesh": world.mesh}
    current = precision.current()
    mixed = current.mixed if current is not None else world.device.type == "cuda"
    if mixed:  # compute in the run's dtype, reduce gradients in fp32; master weights stay fp32
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=current.dtype if current else torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    kwargs["offload_policy"] = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(loss_module.model):
        fully_shard(layer, **kwargs)
    fully_shard(loss_module, **kwargs)
    return loss_module


def set_gradient_sync(wrapped: nn.Module, kind: str | None, enabled: bool):
    """A context for one backward: gradients are reduced across ranks only when `enabled`
    (the last piece of a step), so accumulation costs one reduction per step."""
    import contextlib

    if kind == "ddp":
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if kind == "fsdp":
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def plain_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 returns the grad norm as one); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_state_bytes(module: nn.Module, optimizer) -> dict:
    """Bytes this rank holds of the weights, their gradients and the optimizer state (with
    FSDP2: its shards; measured from the tensors, not estimated)."""
    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    params = list(module.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {"weights": sum(size(p) for p in params), "gradients": sum(size(g) for g in grads),
            "optimizer": sum(size(v) for v in moments)}
