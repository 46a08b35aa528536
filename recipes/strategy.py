"""What differs between replicated and sharded training (``training.sharding``), built once at
set-up, so that the training loop (``training.train``) is one loop for both.

``Replicated`` (``none``): every process holds every weight; accelerate prepares the trained
models (DDP), their optimizers and LR schedulers, and saves their state (``Checkpointer``).
``Sharded`` (``fsdp2``): every transformer is sharded per block with FSDP2 (``sharding.py``);
the trained models' shards and AdamW state go to ``torch.distributed.checkpoint``
(``ShardedCheckpointer``), and every pass is a collective, so every process runs the validation
rollouts and gathers the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn

from .checkpoints import Checkpointer, CheckpointFolders, ShardedCheckpointer
from .config import ConfigError
from .sharding import mixed_precision_policy, process_mesh, shard_transformer, unsharded

if TYPE_CHECKING:
    from .training import Recipe, RecipeConfig


class TrainingStrategy(ABC):
    """How a run spreads its models over the processes, step by step of ``train``'s set-up."""

    @abstractmethod
    def check(self, config: RecipeConfig, accelerator: Accelerator) -> None:
        """Refuse a config or a launch the strategy cannot run, before any model is built."""

    @abstractmethod
    def distribute(self, recipe: Recipe) -> None:
        """Place ``recipe``'s models over the processes, before their optimizers are made."""

    @abstractmethod
    def scheduler_ticks(self, accelerator: Accelerator) -> int:
        """How many times an LR scheduler is stepped per optimizer step."""

    @abstractmethod
    def prepare(
        self,
        accelerator: Accelerator,
        recipe: Recipe,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        checkpoints: Path,
        total_limit: int | None,
    ) -> tuple[dict[str, Any], dict[str, Any], CheckpointFolders]:
        """Set ``recipe.prepared`` (each trained model by name, in the form its gradient passes
        run through); return the optimizers and schedulers to step, by name, and the
        checkpointer of ``checkpoints/checkpoint-N`` folders."""

    @abstractmethod
    def runs_outside_steps(self, accelerator: Accelerator) -> bool:
        """Whether this process runs the passes outside a training step (validation rollouts,
        gathering the adapter)."""


class Replicated(TrainingStrategy):
    """``training.sharding: none``: every process holds every weight; the trained ones are
    DDP-replicated by accelerate."""

    def check(self, config: RecipeConfig, accelerator: Accelerator) -> None:
        """Any config and launch."""

    def distribute(self, recipe: Recipe) -> None:
        """Nothing to place: accelerate wraps the trained models in ``prepare``."""

    def scheduler_ticks(self, accelerator: Accelerator) -> int:
        # accelerate steps a prepared scheduler once per process at each optimizer step
        return accelerator.num_processes

    def prepare(
        self,
        accelerator: Accelerator,
        recipe: Recipe,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        checkpoints: Path,
        total_limit: int | None,
    ) -> tuple[dict[str, Any], dict[str, Any], CheckpointFolders]:
        names = list(models)
        prepared = accelerator.prepare(
            *(models[n] for n in names), *(optimizers[n] for n in names),
            *(schedulers[n] for n in names),
        )
        count = len(names)
        recipe.prepared = dict(zip(names, prepared[:count], strict=True))
        return (
            dict(zip(names, prepared[count : 2 * count], strict=True)),
            dict(zip(names, prepared[2 * count :], strict=True)),
            Checkpointer(accelerator, models, checkpoints, total_limit),
        )

    def runs_outside_steps(self, accelerator: Accelerator) -> bool:
        return accelerator.is_main_process


class Sharded(TrainingStrategy):
    """``training.sharding: fsdp2``: the student, the critic and the teacher sharded per block
    over every process (LoRA training, 2 or more processes)."""

    def check(self, config: RecipeConfig, accelerator: Accelerator) -> None:
        if config.model.train != "lora":
            raise ConfigError(
                f"model.train={config.model.train!r} is not supported with "
                "training.sharding=fsdp2 (it trains LoRA weights on sharded frozen bases): use "
                "model.train=lora, or training.sharding=none"
            )
        if accelerator.num_processes < 2:
            raise ConfigError(
                f"training.sharding=fsdp2 shards across processes but "
                f"{accelerator.num_processes} was launched: launch 2 or more (torchrun "
                "--nproc_per_node N), or use training.sharding=none"
            )

    def distribute(self, recipe: Recipe) -> None:
        """Shard every transformer of ``recipe`` per block over all processes, and make NAM's
        text keys (computed outside a forward) see each attached model's whole weights."""
        device = recipe.device
        mesh, policy = process_mesh(device), mixed_precision_policy(device)
        for model in recipe.transformers().values():
            shard_transformer(model, mesh, policy)
        for attachment in recipe.attachments():
            attachment.outside_forward = lambda model=attachment.model: unsharded(model)

    def scheduler_ticks(self, accelerator: Accelerator) -> int:
        return 1  # the schedulers are not prepared by accelerate

    def prepare(
        self,
        accelerator: Accelerator,
        recipe: Recipe,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        checkpoints: Path,
        total_limit: int | None,
    ) -> tuple[dict[str, Any], dict[str, Any], CheckpointFolders]:
        recipe.prepared = dict(models)  # fully_shard shards in place
        checkpointer = ShardedCheckpointer(
            accelerator, models, optimizers, schedulers, checkpoints, total_limit
        )
        return optimizers, schedulers, checkpointer

    def runs_outside_steps(self, accelerator: Accelerator) -> bool:
        return True  # every pass is a collective


#: ``training.sharding`` values and their strategies.
STRATEGIES: dict[str, type[TrainingStrategy]] = {"none": Replicated, "fsdp2": Sharded}
