"""The Helios row of the family matrix: a tiny random ``HeliosTransformer3DModel`` from the real
Helios-Distilled config, streamed on the chunk alone (no history latents)."""

from __future__ import annotations

import torch
from diffusers import HeliosTransformer3DModel
from diffusers.models.transformers.transformer_helios import HeliosAttnProcessor
from torch import nn

from matrix import (
    Family,
    Inputs,
    wan_chunk,
    wan_forward,
    wan_inputs,
    with_self_attention_processors,
)
from tiny_models import tiny_from_fixture

# Shrinks the width and depth of Helios-Distilled; keeps its shape rules (16 latent channels,
# 1x2x2 patches, RMS q/k norms, cross-attention norm, multi-term history patches, guidance
# cross-attention, zero history timestep) and splits the head into even t/h/w RoPE parts.
TINY_HELIOS = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "freq_dim": 16,
    "text_dim": 16,
    "rope_dim": (4, 4, 4),
}


def tiny_helios(seed: int = 0, **overrides) -> HeliosTransformer3DModel:
    """A tiny random Helios from tests/fixtures/helios-distilled."""
    return tiny_from_fixture(
        HeliosTransformer3DModel, "helios-distilled", TINY_HELIOS, seed, **overrides
    )


class _MaskedHeliosProcessor(HeliosAttnProcessor):
    """diffusers' own Helios processor under a fixed boolean token mask ``[N, N]``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        rotary_emb=None,
        original_context_length=None,
    ):
        return super().__call__(
            attn, hidden_states, None, self.mask, rotary_emb, original_context_length
        )


def _helios_masked_forward(model: nn.Module, inputs: Inputs, mask: torch.Tensor) -> torch.Tensor:
    return with_self_attention_processors(
        [block.attn1 for block in model.blocks],
        lambda _: _MaskedHeliosProcessor(mask),
        lambda: wan_forward(model, inputs),
    )


ROWS = {
    "helios": Family(
        name="helios",
        build=tiny_helios,
        latent_size=(4, 4),
        tokens_per_frame=4,
        # Streamed Helios takes Wan's inputs: the chunk's latents, a timestep and the prompt; no
        # history latents, and default frame indices 0 .. F-1 (the hook adds the chunk's start).
        make_inputs=wan_inputs,
        chunk=wan_chunk,
        forward=wan_forward,
        masked_forward=_helios_masked_forward,
    )
}
