"""The training loop both recipes share, and their command line.

A recipe (a ``Recipe`` subclass) builds its models and says, per step, which of its trained models
to update and how to compute and backpropagate their losses. The loop does the rest with
accelerate: one process per device (``accelerate launch`` / ``torchrun``), the trained models
replicated (DDP) or, with ``training.sharding: fsdp2``, every transformer sharded across the
processes (``sharding.py``; what differs between the two is a strategy built at set-up,
``strategy.py``), bf16 autocast on CUDA, AdamW on the LoRA (or full) weights with a diffusers LR
schedule, gradient clipping, a stop with a clear error on a non-finite loss, checkpoints with
exact resume, a checkpoint and a stop on Ctrl-C (``interrupt.py``), validation rollouts, tqdm
and logging (``metrics.jsonl``), and the final ``MemFlowAdapter`` folder.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from torch import nn
from tqdm.auto import tqdm

from integrations import find_integration
from memflow_adapter import MemFlowAdapter, MemFlowAttachment, MemFlowConfig, StreamingSession
from memflow_adapter.outputs import peak_process_memory_bytes
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine
from memflow_apps.shared.videos import VideoReadError

from .checkpoints import CheckpointFolders
from .config import ConfigError, check, load_config, to_dict
from .flow import StepRandomness
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .models import (
    LoraSettings,
    ModelConfig,
    build_student,
    has_lora,
    trainable_parameters,
    trained_state_dict,
)
from .sharding import SHARDING
from .strategy import STRATEGIES
from .validation import ValidationConfig, run_validation

logger = get_logger(__name__)

MIXED_PRECISION = ("auto", "no", "bf16")
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops before the optimizer applies it."""


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation and the run's bookkeeping.

    Args:
        output_dir: checkpoints, validation, ``metrics.jsonl``, ``config.yaml`` and ``adapter/``.
        max_steps: optimizer steps (of each updated model, per recipe step).
        learning_rate: the student's AdamW learning rate.
        lr_scheduler: a diffusers schedule name (``constant``, ``cosine``, ``linear``, ...).
        max_grad_norm: gradient clipping (0: none).
        mixed_precision: ``auto`` (bf16 on CUDA, none on CPU), ``no`` or ``bf16``.
        gradient_checkpointing: recompute transformer blocks in backward (less memory).
        checkpoint_every: save a checkpoint every N steps (and after the last).
        checkpoints_total_limit: keep only the newest N checkpoints.
        resume_from: a checkpoint folder, or ``latest`` (this run's newest, if any).
        log_every: log a metrics line every N steps.
        seed: seeds model initialisation and every random draw of every step.
        sharding: ``none`` (every process holds every weight; the trained ones are DDP-
            replicated) or ``fsdp2`` (the student, the critic and the teacher are sharded per
            transformer block across the processes with torch's FSDP2; LoRA training only, 2 or
            more processes).
    """

    output_dir: Path = Path("outputs/recipe")
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 250
    checkpoints_total_limit: int | None = None
    resume_from: str | None = None
    log_every: int = 10
    seed: int = 0
    sharding: str = "none"

    def __post_init__(self) -> None:
        for name in ("max_steps", "checkpoint_every", "log_every"):
            check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", "an int >= 0", self.lr_warmup_steps)
        check(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        check(self.max_grad_norm >= 0, "max_grad_norm", ">= 0", self.max_grad_norm)
        check(
            self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"one of {LR_SCHEDULERS}",
            self.lr_scheduler,
        )
        check(
            self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"one of {MIXED_PRECISION}",
            self.mixed_precision,
        )
        check(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "checkpoints_total_limit", "null or an int >= 1", self.checkpoints_total_limit,
        )
        check(self.sharding in SHARDING, "sharding", f"one of {SHARDING}", self.sharding)

    @property
    def resolved_mixed_precision(self) -> str:
        if self.mixed_precision == "auto":
            return "bf16" if torch.cuda.is_available() else "no"
        return self.mixed_precision


@dataclass(frozen=True)
class RecipeConfig:
    """The sections every recipe config has."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    memflow: MemFlowConfig = field(default_factory=MemFlowConfig.reference)
    schedule: FlowMatchSchedule = field(default_factory=FlowMatchSchedule)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass(frozen=True)
class Trainable:
    """A trained model (unwrapped; its trainable parameters are its LoRA, or all of its weights
    with ``model.train: full``), its learning rate and
    how many optimizer steps it takes over the whole run (for the LR schedule)."""

    model: nn.Module
    learning_rate: float
    num_updates: int


class Recipe(ABC):
    """What the loop drives. The student (``self.student``: LoRA + MemFlow, on the device) is
    built here; subclasses add their own models and data in ``__init__``.

    After ``accelerate.prepare``, ``self.prepared`` maps each trained model's name to its
    prepared (e.g. DDP-wrapped) form: use it for passes that carry gradient, and the unwrapped
    model for the others (they then take no part in DDP's collectives). Sharded
    (``training.sharding: fsdp2``), every model is sharded in place, ``self.prepared[name]`` is
    the model itself, and every pass of every process is collective.
    """

    def __init__(self, config: RecipeConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        bf16 = accelerator.mixed_precision == "bf16"
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.student = build_student(
            config.model,
            config.lora,
            config.memflow,
            self.dtype,
            self.device,
            config.training.gradient_checkpointing,
        )
        self.prepared: dict[str, nn.Module] = {}

    @abstractmethod
    def trainables(self) -> dict[str, Trainable]:
        """The trained models by name, ``"student"`` first."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """The videos of one process's step (its share of the step's global batch)."""

    def transformers(self) -> dict[str, nn.Module]:
        """Every transformer the recipe runs, trained or frozen, by name (those sharded with
        ``training.sharding: fsdp2``); default the trained ones."""
        return {name: trainable.model for name, trainable in self.trainables().items()}

    def attachments(self) -> list[MemFlowAttachment]:
        """Every MemFlow attachment of the recipe's transformers; default the student's."""
        return [self.student.attachment]

    @property
    def sharded(self) -> bool:
        return self.config.training.sharding == "fsdp2"

    @abstractmethod
    def phases(self, step: int) -> list[str]:
        """The trained models updated at ``step`` (0-based), in order."""

    @abstractmethod
    def train_phase(self, name: str, step: int, randomness: StepRandomness) -> torch.Tensor:
        """Compute ``name``'s loss and backpropagate it (``self.accelerator.backward``);
        return the detached scalar loss."""

    def student_engine(self, session: StreamingSession, batch_size: int) -> ChunkEngine:
        """The core's chunk engine over the student in ``session`` (bound by the caller):
        gradient passes go through the prepared student, the others through the bare one."""
        return ChunkEngine(
            self.student.model,
            session,
            self.config.schedule,
            dtype=self.dtype,
            conditioning=self.conditioning_inputs(self.student.model, batch_size),
            trained=self.prepared["student"],
        )

    def conditioning_inputs(self, model: nn.Module, batch_size: int) -> dict[str, Any]:
        """``model``'s family's extra forward inputs for ``batch_size`` training videos."""
        integration = find_integration(model)
        return integration.conditioning_inputs(batch_size, self.config.model.fps)

    def validate(self, folder: Path, write: bool = True) -> Path:
        """A validation rollout written into ``folder`` when ``write`` (sharded, every process
        generates it and the main process writes)."""
        return run_validation(
            self.config.validation,
            self.student.pipe,
            self.config.memflow,
            self.config.schedule,
            folder,
            self.device,
            write,
        )

    def adapter(self) -> MemFlowAdapter:
        """The trained student as a MemFlow adapter: its LoRA, and its starting weights if they
        replaced the base model's; or, trained in full, all of its weights. Sharded, the LoRA
        is gathered: every process must call this."""
        model = self.student.model
        trained = trained_state_dict(model)
        lora = has_lora(model)
        return MemFlowAdapter.for_model(
            model,
            self.config.memflow,
            self.config.model.adapter_base_model,
            lora_state=trained if lora else None,
            lora_alpha=self.config.lora.alpha if lora else None,
            base_weights=self.student.weights if lora else trained,
        )


def _forget_metrics_after(metrics: Path, step: int) -> None:
    """Drop the rows of ``metrics`` (``metrics.jsonl``) past ``step``: those of a run interrupted
    after its last checkpoint, which the resumed run logs again."""
    if not metrics.is_file():
        return
    rows = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [row for row in rows if json.loads(row)["step"] <= step]
    if len(kept) < len(rows):
        metrics.write_text("".join(kept), encoding="utf-8")


def train(recipe_type: type[Recipe], config: RecipeConfig) -> Path:
    """Run (or resume) a recipe; returns the output adapter folder."""
    training = config.training
    # Without CUDA, processes launched by torchrun / accelerate run on the CPU (gloo).
    accelerator = Accelerator(
        mixed_precision=training.resolved_mixed_precision, cpu=not torch.cuda.is_available()
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes}: "
            "each would train alone; check the launcher's device settings"
        )
    _refuse_accelerate_fsdp(accelerator)
    strategy = STRATEGIES[training.sharding]()
    strategy.check(config, accelerator)
    set_seed(training.seed)
    recipe = recipe_type(config, accelerator)
    trainables = recipe.trainables()
    strategy.distribute(recipe)
    optimizers = {name: _adamw(trainable, training) for name, trainable in trainables.items()}
    ticks = strategy.scheduler_ticks(accelerator)
    schedulers = {
        name: get_scheduler(
            training.lr_scheduler,
            optimizers[name],
            num_warmup_steps=training.lr_warmup_steps * ticks,
            num_training_steps=trainable.num_updates * ticks,
        )
        for name, trainable in trainables.items()
    }
    models = {name: trainable.model for name, trainable in trainables.items()}
    optimizers, schedulers, checkpointer = strategy.prepare(
        accelerator, recipe, models, optimizers, schedulers, training.output_dir / "checkpoints",
        training.checkpoints_total_limit,
    )
    start = checkpointer.resume(training.resume_from)
    output_dir = training.output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _forget_metrics_after(output_dir / "metrics.jsonl", start)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    progress = tqdm(
        total=training.max_steps,
        initial=start,
        desc=recipe_type.__name__,
        disable=not accelerator.is_local_main_process,
    )
    with progress, StopOnInterrupt(announce=accelerator.is_main_process) as interrupt:
        for step in range(start, training.max_steps):
            began = time.perf_counter()
            metrics = _train_step(recipe, trainables, optimizers, schedulers, checkpointer, step)
            done = step + 1
            metrics["seconds"] = time.perf_counter() - began
            metrics["peak_memory_gib"] = _peak_memory(accelerator.device) / 2**30
            progress.update(1)
            progress.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.endswith("_loss")})
            if accelerator.is_main_process:
                with (output_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                if done % training.log_every == 0 or done == training.max_steps:
                    logger.info(" | ".join(f"{k} {_format(v)}" for k, v in metrics.items()))
            saved = None
            if done % training.checkpoint_every == 0 or done == training.max_steps:
                saved = checkpointer.save(done)
            if config.validation.due(done, training.max_steps):
                if strategy.runs_outside_steps(accelerator):
                    with torch.no_grad(), accelerator.autocast():
                        folder = output_dir / "validation" / f"step-{done:06d}"
                        recipe.validate(folder, write=accelerator.is_main_process)
                    logger.info("validation rollout written to %s", folder)
                accelerator.wait_for_everyone()
            if done < training.max_steps and interrupt.agreed(accelerator):
                saved = saved or checkpointer.save(done)
                raise TrainingInterrupted(
                    f"interrupted after step {done} of {training.max_steps}: checkpoint saved "
                    f"to {saved}; resume with training.resume_from={saved}",
                    saved,
                    report=accelerator.is_main_process,
                )

    adapter_dir = output_dir / "adapter"
    adapter = recipe.adapter() if strategy.runs_outside_steps(accelerator) else None
    if accelerator.is_main_process:
        adapter.save_pretrained(adapter_dir)
        logger.info("adapter written to %s", adapter_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter_dir


def _train_step(
    recipe: Recipe,
    trainables: dict[str, Trainable],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    checkpointer: CheckpointFolders,
    step: int,
) -> dict[str, Any]:
    """Step ``step`` (0-based) of every phase: loss and backward, gradient clipping, optimizer and
    scheduler step; returns the step's metrics (losses, gradient norms, learning rates)."""
    accelerator, training = recipe.accelerator, recipe.config.training
    randomness = StepRandomness.for_step(
        training.seed, step, accelerator.process_index * recipe.batch_size, recipe.batch_size
    )
    metrics: dict[str, Any] = {"step": step + 1}
    for name in recipe.phases(step):
        with accelerator.autocast():
            loss = recipe.train_phase(name, step, randomness)
        metrics[f"{name}_loss"] = _finite_mean(accelerator, name, loss, step + 1, checkpointer)
        if training.max_grad_norm > 0:
            # DTensor-aware: the norm of the whole gradient, over every process's shards.
            norm = accelerator.clip_grad_norm_(
                trainable_parameters(trainables[name].model), training.max_grad_norm
            )
            metrics[f"{name}_grad_norm"] = norm.item()
        optimizers[name].step()
        schedulers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        metrics[f"{name}_lr"] = schedulers[name].get_last_lr()[0]
    return metrics


def _adamw(trainable: Trainable, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over ``trainable``'s trainable parameters (its ``DTensor`` shards when sharded)."""
    return torch.optim.AdamW(
        trainable_parameters(trainable.model),
        lr=trainable.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        weight_decay=training.adam_weight_decay,
        eps=training.adam_epsilon,
    )


def _refuse_accelerate_fsdp(accelerator: Accelerator) -> None:
    """accelerate's FSDP plugin is refused rather than silently run as something else (on the
    CPU it falls back to DDP): the recipes shard with FSDP2 themselves (``training.sharding``)."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    plugin = getattr(accelerator.state, "fsdp_plugin", None) is not None
    if requested or plugin or accelerator.distributed_type == DistributedType.FSDP:
        raise RuntimeError(
            "the recipes do not support FSDP through accelerate's plugin (--use_fsdp / "
            "fsdp_config / ACCELERATE_USE_FSDP; on the CPU it silently runs DDP): launch without "
            "it and set training.sharding=fsdp2 to shard with FSDP2"
        )


def _finite_mean(
    accelerator: Accelerator, name: str, loss: torch.Tensor, step: int,
    checkpointer: CheckpointFolders,
) -> float:
    """The loss averaged over processes; raises on every process if any holds a non-finite one."""
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if not torch.isfinite(losses).all():
        latest = checkpointer.latest()
        raise NonFiniteLossError(
            f"the {name} loss is not finite at step {step} (per process: {losses.tolist()}); "
            "stopping before the optimizer step. Last checkpoint: "
            f"{latest if latest else 'none'}. Lower training.learning_rate or check the data."
        )
    return losses.mean().item()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_process_memory_bytes()


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def exit_on_bad_input(name: str, run: Callable[[], object]) -> None:
    """Run a recipe's command line: bad input (a missing or broken dataset, prompt file,
    checkpoint or model folder) ends in one line on stderr and exit status 2 instead of a
    traceback (``MEMFLOW_TRACEBACK=1`` shows it); Ctrl-C ends in one line saying how to resume
    and exit status 130 (``interrupt.py``)."""
    prog = f"python -m recipes.{name}"
    try:
        run()
    except (ValueError, OSError, VideoReadError) as error:
        if os.environ.get("MEMFLOW_TRACEBACK"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as stop:
        if stop.report:
            print(f"{prog}: {stop}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(
            f"{prog}: stopped at once; the steps since the last checkpoint are lost; resume "
            "from it with training.resume_from=latest (and the same training.output_dir)",
            file=sys.stderr,
        )
        sys.exit(130)


def main(
    name: str,
    config_type: type[RecipeConfig],
    recipe_type: type[Recipe],
    argv: Sequence[str] | None = None,
) -> Path:
    """``python -m recipes.<name> [--config FILE | --tiny] [section.key=value]``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m recipes.{name}",
        description=inspect.getdoc(recipe_type),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config", type=Path, help=f"a YAML config (default: the packaged {name}.yaml)"
    )
    source.add_argument(
        "--tiny",
        action="store_true",
        help=f"the packaged {name}_tiny.yaml: random tiny models, offline, CPU-sized",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)"
    )
    args = parser.parse_args(argv)
    packaged = Path(__file__).with_name(f"{name}_tiny.yaml" if args.tiny else f"{name}.yaml")
    path = args.config or packaged
    try:
        config = load_config(config_type, path, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    return train(recipe_type, config)
