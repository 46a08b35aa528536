"""The SkyReels-V2 row of the family matrix: a tiny random ``SkyReelsV2Transformer3DModel`` from
the real SkyReels-V2-DF-1.3B config, driven as diffusion forcing drives it: one timestep per
latent frame, cut into chunks along with the latents, and the fps embedding on."""

from __future__ import annotations

import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor
from torch import nn

from matrix import Family, Inputs, wan_chunk, wan_forward, with_self_attention_processors
from tiny_models import TINY_WAN, tiny_from_fixture


def tiny_skyreels_v2(seed: int = 0, **overrides) -> SkyReelsV2Transformer3DModel:
    """A tiny random SkyReels-V2 from tests/fixtures/skyreels-v2-df-1.3b, shrunk as Wan2.1-1.3B
    is (it is that config plus the fps embedding)."""
    return tiny_from_fixture(
        SkyReelsV2Transformer3DModel, "skyreels-v2-df-1.3b", TINY_WAN, seed, **overrides
    )


def per_frame_timesteps(generator: torch.Generator, num_frames: int) -> torch.Tensor:
    """``[1, F]``: a different noise level per latent frame, non-decreasing along the video as in
    diffusion forcing's schedules (earlier frames are cleaner)."""
    return (torch.rand(1, num_frames, generator=generator) * 1000).sort(dim=1).values


def skyreels_v2_inputs(generator: torch.Generator, num_frames: int) -> Inputs:
    """A whole video's inputs: latents ``[1, 16, F, 4, 4]``, timesteps ``[1, F]``, a prompt
    ``[1, 8, 16]`` and fps class 1 (any rate but 16), as ``SkyReelsV2DiffusionForcingPipeline``
    passes them."""
    return {
        "hidden_states": torch.randn(1, 16, num_frames, 4, 4, generator=generator),
        "timestep": per_frame_timesteps(generator, num_frames),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator),
        "enable_diffusion_forcing": True,
        "fps": [1],
    }


def skyreels_v2_chunk(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Latent frames ``start .. stop - 1`` with their own timesteps."""
    return {**wan_chunk(inputs, start, stop), "timestep": inputs["timestep"][:, start:stop]}


class _MaskedSkyReelsV2Processor(SkyReelsV2AttnProcessor):
    """diffusers' own SkyReels-V2 processor under a fixed boolean token mask ``[N, N]``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


def skyreels_v2_masked_forward(
    model: nn.Module, inputs: Inputs, mask: torch.Tensor
) -> torch.Tensor:
    return with_self_attention_processors(
        [block.attn1 for block in model.blocks],
        lambda _: _MaskedSkyReelsV2Processor(mask),
        lambda: wan_forward(model, inputs),
    )


ROWS = {
    "skyreels_v2": Family(
        name="skyreels_v2",
        build=tiny_skyreels_v2,
        latent_size=(4, 4),
        tokens_per_frame=4,
        make_inputs=skyreels_v2_inputs,
        chunk=skyreels_v2_chunk,
        forward=wan_forward,
        masked_forward=skyreels_v2_masked_forward,
    )
}
