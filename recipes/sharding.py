"""FSDP2 for the recipes (``training.sharding: fsdp2``): torch's ``fully_shard`` per transformer
block, then the root, over a one-dimensional ``DeviceMesh`` of every process.

Each process then holds ``1/world`` of every parameter (dim-0 shards, ``DTensor``), the frozen
base weights included; a forward all-gathers one block at a time. Every FSDP all-gather and
reduce-scatter is a collective, so every process must run the same passes in the same order;
the recipes make sure of that (streaming long tuning draws its decisions from the step's shared
generator) or stop every process before a step's first pass (memory fine-tuning, when the
processes' windows plan different passes). Calls into submodules outside the model's forward
(NAM's text keys) run inside ``unsharded``: FSDP2's own ``unshard`` / ``reshard`` of every
sharded module, in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

#: ``training.sharding`` values: ``none`` (every process holds every weight; DDP on the trained
#: ones) or ``fsdp2`` (every weight sharded across the processes).
SHARDING = ("none", "fsdp2")


def process_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh of every process on ``device``'s type (``cpu``: gloo)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision_policy(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters and fp32 gradient reduction on CUDA; the parameters' own dtype elsewhere
    (CPU runs fp32)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_transformer(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """Shard ``model`` in place: each of ``model.blocks`` is one FSDP unit, the rest (patch and
    condition embedders, output head) the root's. Parameters and their gradients become
    ``DTensor`` shards on dim 0; after every forward and backward the weights are resharded."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"training.sharding=fsdp2 shards a transformer per block, but "
            f"{type(model).__name__} has no `blocks` ModuleList; use training.sharding=none"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The FSDP units of ``model`` in module order (the root first, then its blocks)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every weight of the sharded ``model`` whole inside the block (FSDP2's ``unshard``; a
    collective: every process must enter it at the same point), resharded after. For calls into
    submodules outside the model's forward, which FSDP's forward hooks do not see."""
    modules = fsdp_modules(model)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in reversed(modules):
            module.reshard()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard (an all-gather: a collective), else ``value``."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_parameter_bytes(model: nn.Module) -> int:
    """The bytes of the parameters this process holds (its shards, for a sharded model)."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        total += local.numel() * local.element_size()
    return total


def gather_objects(value: object) -> list[object]:
    """``value`` of every process, by rank (a collective)."""
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
