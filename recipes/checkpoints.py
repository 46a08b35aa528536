"""Training checkpoints: accelerate's ``save_state`` / ``load_state`` (replicated training), or
``torch.distributed.checkpoint`` shards (``training.sharding: fsdp2``).

Replicated: ``output_dir/checkpoints/checkpoint-<step>/`` holds the optimizer, LR scheduler and
RNG states (accelerate's files, one RNG file per process), ``<model>_lora.safetensors`` per
trained model (the LoRA only: accelerate's full-model files are replaced through its state hooks,
since the base weights are frozen and come from the base model; ``<model>_weights.safetensors``
for a model trained in full) and ``training_state.json`` (the step).

Sharded: ``checkpoint-<step>/sharded/`` is one ``torch.distributed.checkpoint`` folder (a file per
process and the metadata) with each trained model's LoRA shards and AdamW state; the LR
scheduler states are in ``schedulers.pt``, the step in ``training_state.json``. A run resumes it
on as many processes as wrote it (the case tested).

Loading either restores everything a run needs to continue bit-identically (the recipes draw
their randomness from the step number).
"""

from __future__ import annotations

import json
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .models import CHECKPOINT_FULL_WEIGHTS, has_lora, load_trained_state, trained_state_dict

logger = get_logger(__name__)

STATE_NAME = "training_state.json"
SHARDED_NAME = "sharded"
SCHEDULERS_NAME = "schedulers.pt"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class CheckpointFolders(ABC):
    """``directory/checkpoint-<step>/`` folders: saving, pruning to the newest ``total_limit``,
    finding the latest, resuming; subclasses write and read a folder's contents."""

    def __init__(self, accelerator: Accelerator, directory: Path, total_limit: int | None) -> None:
        self.accelerator = accelerator
        self.directory = directory
        self.total_limit = total_limit

    @abstractmethod
    def _write(self, folder: Path) -> None:
        """Write the training state into ``folder`` (every process takes part)."""

    @abstractmethod
    def _read(self, folder: Path) -> None:
        """Restore the training state from ``folder`` (every process takes part)."""

    def save(self, step: int) -> Path:
        folder = self.directory / f"checkpoint-{step}"
        self._write(folder)
        if self.accelerator.is_main_process:
            (folder / STATE_NAME).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
            self._prune()
        self.accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", folder)
        return folder

    def latest(self) -> Path | None:
        checkpoints = self._checkpoints()
        return checkpoints[-1] if checkpoints else None

    def resume(self, resume_from: str | None) -> int:
        """Load ``resume_from`` (a checkpoint folder, or ``"latest"`` in this run's folder, which
        starts from scratch when there is none); returns the step to continue from."""
        if resume_from is None:
            return 0
        folder = self.latest() if resume_from == "latest" else Path(resume_from)
        if folder is None:
            logger.info("no checkpoint in %s: starting from step 0", self.directory)
            return 0
        state = folder / STATE_NAME
        if not state.is_file():
            raise FileNotFoundError(
                f"training.resume_from={resume_from!r}: {folder} is not a checkpoint "
                f"(no {STATE_NAME})"
            )
        self._read(folder)
        step = json.loads(state.read_text(encoding="utf-8"))["step"]
        logger.info("resumed from %s at step %d", folder, step)
        return step

    def _checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [
            (int(match.group(1)), path)
            for path in self.directory.iterdir()
            if (match := _CHECKPOINT.fullmatch(path.name)) and (path / STATE_NAME).is_file()
        ]
        return [path for _, path in sorted(found)]

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for folder in self._checkpoints()[: -self.total_limit]:
            shutil.rmtree(folder)


class Checkpointer(CheckpointFolders):
    """Saves and restores the training state of ``models`` (unwrapped, by name) through
    accelerate (the optimizers and schedulers it prepared)."""

    def __init__(
        self,
        accelerator: Accelerator,
        models: dict[str, nn.Module],
        directory: Path,
        total_limit: int | None,
    ) -> None:
        super().__init__(accelerator, directory, total_limit)
        self.models = models
        accelerator.register_save_state_pre_hook(self._save_trained)
        accelerator.register_load_state_pre_hook(self._load_trained)

    def _save_trained(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for name, model in self.models.items():
                save_file(trained_state_dict(model), Path(output_dir) / _file_name(name, model))
        weights.clear()

    def _load_trained(self, models: list, input_dir: str) -> None:
        for name, model in self.models.items():
            path = Path(input_dir) / _file_name(name, model)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {input_dir} has no {path.name}")
            # read on the CPU: safetensors rejects the "cpu:0" accelerate names under its launcher
            load_trained_state(model, load_file(path))
        models.clear()

    def _write(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def _read(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))


class ShardedCheckpointer(CheckpointFolders):
    """Saves and restores the training state of FSDP2-sharded ``models`` (by name): their
    trainable parameters' shards and their ``optimizers``' state through
    ``torch.distributed.checkpoint``, their ``schedulers``' state from the main process."""

    def __init__(
        self,
        accelerator: Accelerator,
        models: dict[str, nn.Module],
        optimizers: dict[str, Optimizer],
        schedulers: dict[str, LRScheduler],
        directory: Path,
        total_limit: int | None,
    ) -> None:
        super().__init__(accelerator, directory, total_limit)
        self.models = models
        self.optimizers = optimizers
        self.schedulers = schedulers

    def _sharded_state(self) -> dict[str, dict]:
        """Per model: ``model`` (its trainable parameters, ``DTensor`` shards by name) and
        ``optimizer`` (AdamW's state, shards by parameter name)."""
        state = {}
        for name, model in self.models.items():
            trained = {key for key, p in model.named_parameters() if p.requires_grad}
            weights = get_model_state_dict(model)
            state[name] = {
                "model": {key: value for key, value in weights.items() if key in trained},
                "optimizer": get_optimizer_state_dict(model, self.optimizers[name]),
            }
        return state

    def _write(self, folder: Path) -> None:
        dcp.save(self._sharded_state(), checkpoint_id=folder / SHARDED_NAME)
        if self.accelerator.is_main_process:
            states = {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()}
            torch.save(states, folder / SCHEDULERS_NAME)

    def _read(self, folder: Path) -> None:
        sharded = folder / SHARDED_NAME
        if not sharded.is_dir():
            raise FileNotFoundError(
                f"checkpoint {folder} has no {SHARDED_NAME}/ (torch.distributed.checkpoint); a "
                "checkpoint of a run with training.sharding=none resumes with that setting"
            )
        # The templates hold this run's shards; dcp.load fills them in place.
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=sharded)
        partial = StateDictOptions(strict=False)  # the trainable parameters only
        for name, model in self.models.items():
            set_model_state_dict(model, state[name]["model"], options=partial)
            set_optimizer_state_dict(model, self.optimizers[name], state[name]["optimizer"])
        schedulers = torch.load(folder / SCHEDULERS_NAME, weights_only=True)
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(schedulers[name])


def _file_name(name: str, model: nn.Module) -> str:
    return f"{name}_lora.safetensors" if has_lora(model) else CHECKPOINT_FULL_WEIGHTS.format(name)
