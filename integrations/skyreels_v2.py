"""diffusers ``SkyReelsV2Transformer3DModel`` (SkyReels-V2: diffusion-forcing long video on the
Wan2.1 architecture) made causal and streaming.

diffusers' ``SkyReelsV2AttnProcessor`` and ``SkyReelsV2RotaryPosEmbed`` compute exactly what
``WanAttnProcessor`` and ``WanRotaryPosEmbed`` compute, from attributes of the same names, and the
cross-attention, patching and VAE are Wan's too, so everything is inherited from
``WanIntegration``. What differs lies outside self-attention:

* Diffusion forcing: with ``enable_diffusion_forcing=True`` the timestep is ``[B, F]``, one noise
  level per latent frame, and the model broadcasts each frame's embedding to that frame's tokens
  (per-token modulation in every block and in the output head). Tokens meet only in attention, so
  a chunk's pass takes the timesteps of its own frames.
* ``inject_sample_info`` (the DF-1.3B checkpoint): an ``fps`` input (0 for 16 fps, 1 otherwise)
  adds one embedding per video to every token's modulation.
* A built-in block-causal mode: ``num_frame_per_block > 1`` (which
  ``SkyReelsV2DiffusionForcingPipeline`` sets from its ``causal_block_size``) masks self-attention
  inside one forward. Streaming masks through the session instead, so that mode must be off.
"""

from __future__ import annotations

from typing import Any

from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel
from torch import nn

from .wan import WanIntegration


class SkyReelsV2Integration(WanIntegration):
    """diffusers ``SkyReelsV2Transformer3DModel``: Wan's layout, ``blocks[i].attn1``
    self-attention, ``attn2`` cross-attention, ``rope`` the 3-D rotary embedding."""

    name = "skyreels_v2"
    context_parallel = False  # not validated under diffusers' context parallelism
    model_classes = ("SkyReelsV2Transformer3DModel",)
    pipeline_class = SkyReelsV2DiffusionForcingPipeline
    # Wan's LoRA targets, VAE and default video (the DF pipeline's own is 544x960) are inherited;
    # its original-format checkpoints load into another class than Wan's conversion builds.
    checkpoints = None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, SkyReelsV2Transformer3DModel)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        frames_per_block = model.config.num_frame_per_block
        if frames_per_block != 1:
            raise ValueError(
                "streaming does the block-causal masking itself, so the model's own causal mode "
                f"must be off: num_frame_per_block must be 1, this {type(model).__name__} has "
                f"num_frame_per_block={frames_per_block} (SkyReelsV2DiffusionForcingPipeline "
                "sets it from causal_block_size); call "
                "model.register_to_config(num_frame_per_block=1) first"
            )

    def conditioning_inputs(self, batch_size: int, fps: int) -> dict[str, Any]:
        """The fps class per video when the model has the fps embedding (0 for 16 fps, 1 for any
        other rate, as ``SkyReelsV2DiffusionForcingPipeline`` computes it)."""
        if not self.model.config.inject_sample_info:
            return {}
        return {"fps": [0 if fps == 16 else 1] * batch_size}
