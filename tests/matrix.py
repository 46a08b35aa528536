"""The family matrix's building blocks: ``Family`` (one row) and helpers shared by rows.

A row says how to build a tiny random-weight model from the family's real diffusers config, how
to make inputs for a whole video and cut them into chunks, how to run the model on them, and how
to run the model's *own* attention processors under a token mask (the block-causal reference).
Rows live in families.py (Wan) and in ``tests/family_<name>.py`` modules (``ROWS``), which import
from here, never from families.py (that module imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """How the family-independent tests drive one model family.

    Attributes:
        name: the integration's name.
        build: a tiny random model (seeded) from the family's real config.
        latent_size: latent ``(height, width)`` of the inputs ``make_inputs`` builds.
        tokens_per_frame: tokens of one latent frame at that size.
        make_inputs: ``(generator, num_frames) -> inputs`` of a whole video.
        chunk: ``(inputs, start, stop) -> inputs`` of latent frames ``start .. stop - 1``.
        forward: ``(model, inputs) -> output`` with latent frames on dimension ``frame_dim``.
        masked_forward: ``(model, inputs, mask) -> output``: the model's own processors, every
            self-attention restricted by the boolean token mask ``[N, N]``.
        frame_dim: the frame dimension of ``forward``'s output.
    """

    name: str
    build: Callable[[], nn.Module]
    latent_size: tuple[int, int]
    tokens_per_frame: int
    make_inputs: Callable[[torch.Generator, int], Inputs]
    chunk: Callable[[Inputs, int, int], Inputs]
    forward: Callable[[nn.Module, Inputs], torch.Tensor]
    masked_forward: Callable[[nn.Module, Inputs, torch.Tensor], torch.Tensor]
    frame_dim: int = 2


def with_self_attention_processors(
    modules: list[nn.Module], make: Callable[[Any], Any], run: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Run ``run()`` with each module's processor replaced by ``make(original)``, restoring them."""
    originals = [module.processor for module in modules]
    for module, original in zip(modules, originals, strict=True):
        module.set_processor(make(original))
    try:
        return run()
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.set_processor(original)


# ------------------------------------------------------------------------------------------ Wan
class _MaskedWanProcessor(WanAttnProcessor):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


def wan_inputs(generator: torch.Generator, num_frames: int, channels: int = 16) -> Inputs:
    return {
        "hidden_states": torch.randn(1, channels, num_frames, 4, 4, generator=generator),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator),
    }


def wan_chunk(inputs: Inputs, start: int, stop: int) -> Inputs:
    return {**inputs, "hidden_states": inputs["hidden_states"][:, :, start:stop]}


def wan_forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def wan_masked_forward(model: nn.Module, inputs: Inputs, mask: torch.Tensor) -> torch.Tensor:
    return with_self_attention_processors(
        [block.attn1 for block in model.blocks],
        lambda _: _MaskedWanProcessor(mask),
        lambda: wan_forward(model, inputs),
    )
