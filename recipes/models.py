"""The models a recipe trains: the base pipeline, LoRA on its transformer (or all of its
weights), full-weight starts.

LoRA goes, through diffusers' peft integration, on the modules the model's family names
(``Integration.lora_targets``; for the reference family every ``nn.Linear`` of the transformer
blocks, the layout of the published MemFlow LoRA). Base weights are frozen; LoRA weights are kept
in float32 whatever the base's dtype.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoModel, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from integrations import find_integration, reference_integration
from integrations.checkpoints import check_state_dict_fits
from memflow_adapter import MemFlowAdapter, MemFlowAttachment, MemFlowConfig, apply_memflow
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from .config import ConfigError, check
from .sharding import full_tensor

#: peft adapter name of every LoRA a recipe trains.
ADAPTER_NAME = "memflow"
#: The base a recipe trains by default: the one MemFlow's published checkpoints fine-tune.
REFERENCE_BASE_MODEL = reference_integration().checkpoint_conversion().base_model
#: ``base_model`` recorded in adapters trained on the tiny random pipeline.
TINY_BASE_MODEL = "memflow-adapter/tiny-wan-random"
#: The file of a model trained in full in a recipe checkpoint (``checkpoints.py``), by its name.
CHECKPOINT_FULL_WEIGHTS = "{}_weights.safetensors"
#: The student's, which ``ModelConfig.student_weights`` reads from a checkpoint folder.
CHECKPOINT_STUDENT_WEIGHTS = CHECKPOINT_FULL_WEIGHTS.format("student")
#: What of the student a recipe can train (``model.train``).
TRAINED_WEIGHTS = ("lora", "full")


@dataclass(frozen=True)
class ModelConfig:
    """Where the base pipeline comes from.

    Args:
        base_model: a diffusers Wan pipeline (Hub id or local folder): its transformer is the
            student, its text encoder, tokenizer and VAE serve prompts and validation videos.
        tiny: use ``memflow_apps.shared.tiny_wan`` instead (random weights, offline, CPU-sized).
        pipeline: a ``module:function`` returning the base pipeline instead (called without
            arguments; e.g. ``memflow_apps.world.pipeline:build_world_pipeline``); it must
            hold a Wan transformer and offer ``encode_prompt`` like ``WanPipeline``.
        tiny_seed: weights seed of the tiny pipeline.
        student_weights: optional MemFlowAdapter folder or Hub id whose full transformer weights
            start the student (e.g. a LongLive or MemFlow ``base.pt``), or a recipe checkpoint
            folder of a student trained in full (``checkpoint-<step>/``, its
            ``student_weights.safetensors``: a run that continues another one's weights with
            its own schedule); they are saved with the trained adapter, since its LoRA is trained
            on top of them.
        train: what of the student learns: ``lora`` (a fresh LoRA on the frozen base, the
            ``lora`` section; the default) or ``full`` (every transformer weight, saved as the
            adapter's full weights; for small models trained from scratch, such as the narrative
            world's, where a LoRA on random weights learns far slower).
        fps: the frame rate of the training videos, for families conditioned on it
            (SkyReels-V2-DF-1.3B's fps embedding; ``Integration.conditioning_inputs``).
    """

    base_model: str = REFERENCE_BASE_MODEL
    tiny: bool = False
    tiny_seed: int = 0
    student_weights: str | None = None
    pipeline: str | None = None
    train: str = "lora"
    fps: int = 16

    def __post_init__(self) -> None:
        check(self.fps >= 1, "fps", "an int >= 1", self.fps)
        check(self.train in TRAINED_WEIGHTS, "train", f"one of {TRAINED_WEIGHTS}", self.train)
        check(
            self.pipeline is None or is_pipeline_factory(self.pipeline),
            "pipeline", "'module:function'", self.pipeline,
        )
        check(not (self.tiny and self.pipeline), "tiny", "false when pipeline is set", self.tiny)

    @property
    def adapter_base_model(self) -> str:
        if self.pipeline:
            return self.pipeline
        return TINY_BASE_MODEL if self.tiny else self.base_model

    def build_pipeline(self, dtype: torch.dtype) -> DiffusionPipeline:
        """The base pipeline this config names."""
        if self.pipeline:
            return build_factory_pipeline(self.pipeline, "model.pipeline")
        if self.tiny:
            return build_tiny_wan_pipeline(self.tiny_seed)
        return DiffusionPipeline.from_pretrained(self.base_model, dtype=dtype)

    def build_start(self, dtype: torch.dtype) -> nn.Module:
        """A frozen copy (eval mode) of the transformer the student starts as: the base
        transformer (of the factory's or the tiny pipeline, or ``base_model``'s ``transformer/``
        alone) with ``student_weights`` loaded, if any (a DMD critic's start)."""
        if self.pipeline or self.tiny:
            model = cast_to(self.build_pipeline(dtype).transformer, dtype)
        else:
            model = AutoModel.from_pretrained(self.base_model, subfolder="transformer", dtype=dtype)
        if self.student_weights:
            load_student_weights(model, self.student_weights)
        return model.requires_grad_(False).eval()


def cast_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` (left as it is when it already is: no cast, no diffusers warning)."""
    return model if model.dtype == dtype else model.to(dtype)


def is_pipeline_factory(source: str) -> bool:
    """Whether ``source`` names a pipeline factory (``module:function``), not a Hub id or folder."""
    return re.fullmatch(r"[\w.]+:\w+", source) is not None


def build_factory_pipeline(spec: str, parameter: str) -> DiffusionPipeline:
    """The pipeline the factory ``spec`` (``module:function``, called without arguments)
    returns; a bad spec is a ``ConfigError`` naming ``parameter``."""
    module, function = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{parameter}={spec!r}: {error}") from error
    return factory()


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank and alpha (the paper: 256 and 256)."""

    rank: int = 256
    alpha: float = 256.0

    def __post_init__(self) -> None:
        check(self.rank >= 1, "rank", "an int >= 1", self.rank)
        check(self.alpha > 0, "alpha", "> 0", self.alpha)


@dataclass
class Student:
    """The model being trained.

    Attributes:
        pipe: the base pipeline (text encoder, tokenizer and VAE stay on the CPU until used).
        model: ``pipe.transformer`` on the training device, with LoRA and MemFlow attached.
        attachment: its MemFlow attachment (sessions, NAM text keys).
        weights: the full weights loaded from ``ModelConfig.student_weights``, if any.
    """

    pipe: DiffusionPipeline
    model: nn.Module
    attachment: MemFlowAttachment
    weights: dict[str, torch.Tensor] | None


def build_student(
    config: ModelConfig,
    lora: LoraSettings,
    memflow: MemFlowConfig,
    dtype: torch.dtype,
    device: torch.device,
    gradient_checkpointing: bool,
) -> Student:
    """Load the base pipeline, start its transformer from ``student_weights`` if given, add a
    fresh LoRA (or make every weight trainable, ``config.train == "full"``) and attach MemFlow."""
    pipe = config.build_pipeline(dtype)
    model = pipe.transformer.to(device)
    weights = None
    if config.student_weights:
        weights = load_student_weights(model, config.student_weights)
    if config.train == "lora":
        add_lora(model, lora)
    else:
        model.requires_grad_(True)
        cast_training_params(model, torch.float32)
    attachment = apply_memflow(model, memflow)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return Student(pipe, model.train(), attachment, weights)


def load_teacher(
    source: str, tiny_seed: int | None, dtype: torch.dtype, weights: str | None = None
) -> nn.Module:
    """A frozen transformer (eval mode): the one of the tiny pipeline of ``tiny_seed`` when
    given, else ``source``'s: a pipeline factory's (``module:function``, e.g.
    ``memflow_apps.world.pipeline:load_world_pipeline``), or a diffusers pipeline folder or
    Hub id's ``transformer/``; with the full ``weights`` loaded, if given (an adapter folder or
    a recipe checkpoint, as ``ModelConfig.student_weights``)."""
    if tiny_seed is not None:
        model = build_tiny_wan_pipeline(tiny_seed).transformer
    elif is_pipeline_factory(source):
        model = cast_to(build_factory_pipeline(source, "dmd.teacher").transformer, dtype)
    else:
        model = AutoModel.from_pretrained(source, subfolder="transformer", dtype=dtype)
    if weights:
        load_student_weights(model, weights)
    return model.requires_grad_(False).eval()


def load_student_weights(transformer: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Load the full weights of the adapter ``source`` (or of the recipe checkpoint folder
    ``source`` of a student trained in full) into ``transformer``; returns them."""
    checkpoint_weights = Path(source) / CHECKPOINT_STUDENT_WEIGHTS
    if checkpoint_weights.is_file():
        weights = load_file(checkpoint_weights)
    else:
        weights = MemFlowAdapter.from_pretrained(source).base_weights
    if weights is None:
        raise ValueError(
            f"model.student_weights={source!r} holds no full transformer weights "
            "(transformer.safetensors or a published base.pt)"
        )
    load_full_weights(transformer, weights)
    return weights


def load_full_weights(transformer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (diffusers names) into ``transformer``, every key checked first."""
    check_state_dict_fits(transformer.state_dict(), weights)
    transformer.load_state_dict(weights, strict=True)


def add_lora(transformer: nn.Module, settings: LoraSettings) -> None:
    """Freeze ``transformer`` and give it a fresh LoRA (``lora_B`` zero: it starts as the base)
    on its family's ``lora_targets``."""
    lora_targets = find_integration(transformer).lora_targets
    targets = sorted(
        name
        for name, module in transformer.named_modules()
        if lora_targets.fullmatch(name) and isinstance(module, nn.Linear)
    )
    if not targets:
        raise ValueError(f"{type(transformer).__name__} has no LoRA target module")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets),
        adapter_name=ADAPTER_NAME,
    )
    cast_training_params(transformer, torch.float32)


def trainable_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (the LoRA's, or every weight when trained in full)."""
    return [parameter for parameter in transformer.parameters() if parameter.requires_grad]


def has_lora(transformer: nn.Module) -> bool:
    """Whether ``transformer`` carries the recipes' LoRA (``add_lora``)."""
    return ADAPTER_NAME in getattr(transformer, "peft_config", {})


def trained_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """What a recipe trains of ``transformer``: its LoRA (``lora_state_dict``) when it has one,
    else every weight (diffusers names), as contiguous CPU copies."""
    if has_lora(transformer):
        return lora_state_dict(transformer)
    return {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in transformer.state_dict().items()
    }


def load_trained_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite what a recipe trains of ``transformer`` with ``state`` (``trained_state_dict``)."""
    if has_lora(transformer):
        load_lora_state(transformer, state)
    else:
        load_full_weights(transformer, state)


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in peft layout on diffusers names (``blocks.0.attn1.to_q.lora_A.weight``),
    as contiguous CPU copies; whole ones for a sharded ``transformer`` (gathered in the state
    dict's order: every process must call this)."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {
        key: full_tensor(value).detach().to("cpu", copy=True).contiguous()
        for key, value in state.items()
    }


def load_lora_state(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the LoRA weights with ``state`` (from ``lora_state_dict``); every key must fit."""
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    missing = [key for key in result.missing_keys if f".{ADAPTER_NAME}." in key]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"the LoRA state does not fit: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )
