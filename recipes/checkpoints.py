"""Training checkpoints through accelerate's ``save_state`` / ``load_state``.

``output_dir/checkpoints/checkpoint-<step>/`` holds the optimizer, LR scheduler and RNG states
(accelerate's files, one RNG file per process), ``<model>_lora.safetensors`` per trained model
(the LoRA only: accelerate's full-model files are replaced through its state hooks, since the base
weights are frozen and come from the base model; ``<model>_weights.safetensors`` for a model
trained in full) and ``training_state.json`` (the step). Loading one restores everything a run
needs to continue bit-identically (the recipes draw their randomness from the step number).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from torch import nn

from .models import has_lora, load_trained_state, trained_state_dict

logger = get_logger(__name__)

STATE_NAME = "training_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class Checkpointer:
    """Saves and restores the training state of ``models`` (unwrapped, by name)."""

    def __init__(
        self,
        accelerator: Accelerator,
        models: dict[str, nn.Module],
        directory: Path,
        total_limit: int | None,
    ) -> None:
        self.accelerator = accelerator
        self.models = models
        self.directory = directory
        self.total_limit = total_limit
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

    def save(self, step: int) -> Path:
        folder = self.directory / f"checkpoint-{step}"
        self.accelerator.save_state(str(folder))
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
        self.accelerator.load_state(str(folder))
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


def _file_name(name: str, model: nn.Module) -> str:
    return f"{name}_lora.safetensors" if has_lora(model) else f"{name}_weights.safetensors"
