"""The Integration protocol: what a model family declares so the core can stream it
(architecture s.5).

An integration never holds generation state; it only says where the attention modules are, how the
model computes its self-attention queries/keys/values and its RoPE, how many tokens a latent frame
has, and how the prompt's cross-attention keys are computed. It also declares, as data, what the
applications would otherwise have to know about the family: its LoRA targets, its default video,
its VAE's temporal factor and the conversion of its original-format checkpoints.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .checkpoints import CheckpointConversion

#: ``attend(layer, query, key, value) -> output``, all ``[B, n * T_f, H, D]``: the session's
#: memory-aware attention for one layer.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VideoDefaults:
    """The video a family's own diffusers pipeline makes when told nothing else: ``height`` x
    ``width`` pixels, prompts encoded to ``max_sequence_length`` text tokens."""

    height: int
    width: int
    max_sequence_length: int


class Integration(ABC):
    """One model family, bound to one model instance.

    Args:
        model: the transformer to stream (already checked with ``supports``).
    """

    #: Short family name used in configs, adapters and error messages.
    name: ClassVar[str]
    #: The model classes this integration handles, for error messages.
    model_classes: ClassVar[tuple[str, ...]]
    #: The diffusers pipeline class whose components (text encoder, VAE) go with this family.
    pipeline_class: ClassVar[type]
    #: Whether the family streams under diffusers' Ulysses context parallelism (architecture
    #: s.6): the model's ``_cp_plan`` splits the tokens and RoPE's output by sequence, and the
    #: processor hands ``attend`` the queries, keys and values of this rank's tokens.
    context_parallel: ClassVar[bool] = False
    #: The module names (below the transformer, ``fullmatch``) that a fresh LoRA targets; only
    #: those that are an ``nn.Linear`` receive one.
    lora_targets: ClassVar[re.Pattern[str]]
    #: Height, width and text tokens of a video when the caller gives none.
    default_video: ClassVar[VideoDefaults]
    #: Video frames per latent frame of the family's VAE after the first (a causal video VAE
    #: decodes latent frame 0 to 1 frame and every later one to this many).
    vae_temporal_factor: ClassVar[int]
    #: How original-format checkpoints of the family become diffusers weights; ``None``: the
    #: family has no such conversion (``checkpoint_conversion`` refuses by name).
    checkpoints: ClassVar[CheckpointConversion | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""

    @classmethod
    def checkpoint_conversion(cls) -> CheckpointConversion:
        """``checkpoints``, or a ``ValueError`` naming the family when it declares none."""
        if cls.checkpoints is None:
            raise ValueError(
                f"the {cls.name!r} family ({', '.join(cls.model_classes)}) declares no conversion "
                "of original-format checkpoints; load its diffusers weights instead"
            )
        return cls.checkpoints

    @abstractmethod
    def self_attention_modules(self) -> list[nn.Module]:
        """The self-attention modules, one per layer in forward order; each must accept
        ``set_processor`` (diffusers' ``AttentionModuleMixin``)."""

    @abstractmethod
    def self_attention_processor(self, layer: int, attend: AttendFn) -> Any:
        """An attention processor for ``layer`` computing q/k/v the model's way (projections,
        norms, RoPE), delegating the attention itself to ``attend``, then projecting out."""

    @abstractmethod
    def rope_module(self) -> nn.Module:
        """The module that computes the rotary embedding for a whole forward."""

    @abstractmethod
    def rope_forward(
        self, rope: nn.Module, frame_offset: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        """``rope``'s output for its usual inputs, with temporal positions starting at latent
        frame ``frame_offset`` (a 0-d int64 tensor, the session's ``pass_rope_position``)
        instead of 0. Tensor ops only: no host sync and no Python branch on its value, so a
        compiled model serves every chunk with one graph. The session keeps it inside
        ``rope_frames()``."""

    @abstractmethod
    def rope_frames(self) -> int:
        """How many temporal positions the model's RoPE rotates to (``0 .. n - 1``); a longer
        stream is re-based to fit (architecture s.2b)."""

    @abstractmethod
    def rotate_keys(self, keys: torch.Tensor, frame_shift: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys`` ``[B, n * T_f, H, D]`` of ``n`` frames, rotated as if RoPE had put
        frame ``i`` of batch element ``b`` ``frame_shift[b, i]`` positions later (``[B, n]``
        int64, ``|shift| < rope_frames()``; negative moves earlier). Only the temporal part of
        the rotation changes."""

    def attention_heads(self) -> int:
        """The heads of every self-attention layer."""
        return self.model.config.num_attention_heads

    @abstractmethod
    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """``T_f``: tokens of one latent frame of the given latent size."""

    @abstractmethod
    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Decode generated latents ``[B, C, F, h, w]`` to a video ``[B, 3, frames, H, W]`` in
        ``[-1, 1]``, undoing the family's latent normalisation."""

    @abstractmethod
    def latent_decoder(self, vae: nn.Module) -> LatentDecoder:
        """A decoder that turns a streamed video's latents into frames chunk by chunk, each call
        continuing the previous ones, with output equal to ``decode_latents`` of the whole
        video (up to the kernels' float noise)."""

    def conditioning_inputs(self, batch_size: int, fps: int) -> dict[str, Any]:
        """Keyword inputs of the model's forward besides latents, timestep and prompt embeddings,
        for ``batch_size`` videos meant for ``fps`` frames per second. None by default."""
        return {}

    @abstractmethod
    def text_keys(self, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the keys its cross-attention computes for ``prompt_embeds`` (the text
        encoder's output, padding included): ``[B, L_text, H, D]`` each."""


class LatentDecoder(ABC):
    """Decodes a streamed video as it is made: ``decode`` takes the next latent frames and returns
    the video frames they complete, continuing from every earlier call (a causal VAE's temporal
    feature cache lives here, not in the VAE, so two streams can share one VAE). ``state`` and
    ``load_state`` save and restore it between calls (a paused stream)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames ``[B, C, n, h, w]`` (normalised, as generated) -> the video
        frames ``[B, 3, m, H, W]`` in ``[-1, 1]`` that follow the ones already returned."""

    @abstractmethod
    def state(self) -> Any:
        """A snapshot of what the next ``decode`` continues from (independent of later calls)."""

    @abstractmethod
    def load_state(self, state: Any) -> None:
        """Continue from a ``state()`` snapshot."""


class ChunkwiseDecoder(LatentDecoder):
    """For autoencoders that decode every latent frame on its own (no temporal compression, no
    temporal context): each call decodes its frames alone with ``decode`` (the family's
    ``decode_latents``, bound to its VAE), so the decoder holds no state."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._decode = decode

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)

    def state(self) -> None:
        return None

    def load_state(self, state: Any) -> None:
        if state is not None:
            raise ValueError(
                f"a chunkwise decoder has no state to load, got {type(state).__name__}"
            )
