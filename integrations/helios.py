"""diffusers ``HeliosTransformer3DModel`` (Helios-Base, -Mid and -Distilled: real-time,
minute-long video from a fine-tuned Wan2.1-T2V-14B) streamed with MemFlow memory.

Helios already generates long videos chunk by chunk, but it conditions each chunk on *compressed
history*: recent latent frames patchified 1x, 2x and 4x coarser (``latents_history_short``,
``_mid``, ``_long``), prepended to the chunk's tokens at window-relative frame indices. Under
MemFlow the session's cache is the history: the model is called on the chunk alone, without
history latents, and its tokens are rotated at their absolute latent-frame positions.

Everything below mirrors diffusers' ``HeliosAttnProcessor`` and ``HeliosRotaryPosEmbed``. What
differs from Wan:

* RoPE takes explicit frame indices (``indices_hidden_states``, ``0 .. F-1`` by default) and
  returns one tensor holding cos and sin, applied by ``apply_rotary_emb_transposed``. Under MemFlow
  those indices are relative to the pass: the rope hook adds the session's
  ``pass_rope_position``, so the core calls every family with the same inputs.
* The self-attention processor also receives ``original_context_length``; tokens before it are
  history (and only they get Helios's history key amplification). Streaming refuses them.
* Latents are encoded and decoded one Helios chunk (9 latent frames) at a time.

Denoising runs at one resolution, as ``HeliosPipeline`` does: ``HeliosPyramidPipeline``'s
coarse-to-fine stages change the tokens per frame inside a chunk, which one session's cache cannot
hold.

Blocks, cross-attention, patching, token geometry and the VAE are Wan's, so the rest is inherited
from ``WanIntegration``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import HeliosPipeline
from diffusers.models.transformers.transformer_helios import (
    HeliosAttention,
    HeliosRotaryPosEmbed,
    HeliosTransformer3DModel,
    _get_qkv_projections,
    apply_rotary_emb_transposed,
)
from torch import nn

from .base import AttendFn, LatentDecoder
from .wan import WanCausalDecoder, WanIntegration

#: ``HeliosPipeline``'s chunk length in latent frames: it encodes and decodes its VAE latents one
#: such chunk at a time, each chunk on its own.
HELIOS_LATENT_FRAMES_PER_CHUNK: int = (
    inspect.signature(HeliosPipeline.__call__).parameters["num_latent_frames_per_chunk"].default
)


#: The temporal positions a streaming Helios rotates to before it re-bases. Its RoPE computes
#: angles on the fly (no table), but Helios itself only ever rotates window-relative indices, and
#: its base Wan2.1-T2V-14B's table holds 1024 frames: keeping positions below that keeps every
#: angle as precise (float32) as the positions the weights were trained on.
HELIOS_ROPE_FRAMES = 1024


class HeliosStreamingSelfAttnProcessor:
    """Self-attention of one Helios block over the pass's own tokens, with the attention itself
    done by the session."""

    def __init__(self, layer: int, attend: AttendFn) -> None:
        self.layer = layer
        self.attend = attend

    def __call__(
        self,
        attn: HeliosAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        original_context_length: int | None = None,
    ) -> torch.Tensor:
        """``hidden_states``: ``[B, N, C]``; ``rotary_emb``: ``[B, N, 2 * D]`` (cos then sin).
        Returns ``[B, N, C]``."""
        _check_streamable(
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            rotary_emb,
            original_context_length,
        )
        # diffusers' own helper (private), so that fused projections follow the model.
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_rotary_emb_transposed(query, rotary_emb)
        key = apply_rotary_emb_transposed(key, rotary_emb)

        hidden_states = self.attend(self.layer, query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _check_streamable(
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    rotary_emb: torch.Tensor | None,
    original_context_length: int | None,
) -> None:
    """Refuse what a streaming self-attention cannot honour rather than ignore it."""
    if encoder_hidden_states is not None or attention_mask is not None:
        raise ValueError(
            "a streaming Helios self-attention takes neither encoder_hidden_states nor "
            "attention_mask: the session decides what each frame attends to"
        )
    if rotary_emb is None:
        raise ValueError("a streaming Helios self-attention needs rotary_emb (post-RoPE keys)")
    num_tokens = hidden_states.shape[1]
    if original_context_length is not None and original_context_length != num_tokens:
        raise ValueError(
            "a streaming Helios model takes no history latents (latents_history_short/mid/long): "
            "the MemFlow cache is its history; got "
            f"{num_tokens - original_context_length} history tokens before "
            f"{original_context_length} chunk tokens, expected 0"
        )


class HeliosIntegration(WanIntegration):
    """diffusers ``HeliosTransformer3DModel``: Wan's blocks (``blocks[i].attn1`` self-attention,
    ``attn2`` cross-attention), ``rope`` the 3-D rotary embedding over explicit frame indices."""

    name = "helios"
    context_parallel = False  # not validated under diffusers' context parallelism
    model_classes = ("HeliosTransformer3DModel",)
    pipeline_class = HeliosPipeline
    # Wan's LoRA targets, VAE and default video (HeliosPipeline's own is 384x640) are inherited;
    # its original-format checkpoints are not Wan's.
    checkpoints = None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, HeliosTransformer3DModel)

    def self_attention_processor(self, layer: int, attend: AttendFn) -> Any:
        return HeliosStreamingSelfAttnProcessor(layer, attend)

    def rope_forward(
        self,
        rope: nn.Module,
        frame_offset: torch.Tensor,
        frame_indices: torch.Tensor,
        height: int,
        width: int,
        device: torch.device,
    ) -> torch.Tensor:
        """``rope(frame_indices, height, width, device)`` with the pass-relative
        ``frame_indices`` ``[B, F]`` moved to start at latent frame ``frame_offset``:
        ``[B, 2 * D, F, height, width]``."""
        # The class's forward, not ``rope(...)``: the MemFlow hook has replaced the instance's.
        return HeliosRotaryPosEmbed.forward(
            rope, frame_indices + frame_offset.to(frame_indices.device), height=height, width=width,
            device=device,
        )

    def rope_frames(self) -> int:
        return HELIOS_ROPE_FRAMES

    def rotate_keys(self, keys: torch.Tensor, frame_shift: torch.Tensor) -> torch.Tensor:
        """The model's RoPE at frame indices ``frame_shift`` on a 1x1 grid (height and width
        rotate by 0), applied as the processor applies it."""
        rope = self.model.rope
        freqs = HeliosRotaryPosEmbed.forward(rope, frame_shift, height=1, width=1,
                                             device=keys.device)  # [B, 2D, n, 1, 1]
        freqs = freqs.flatten(2).transpose(1, 2)  # [B, n, 2D]
        tokens_per_frame = keys.shape[1] // frame_shift.shape[1]
        return apply_rotary_emb_transposed(keys, freqs.repeat_interleave(tokens_per_frame, dim=1))

    def latent_decoder(self, vae: nn.Module) -> LatentDecoder:
        """Wan's causal decoder with a fresh cache every ``HELIOS_LATENT_FRAMES_PER_CHUNK`` latent
        frames: the same video as ``decode_latents``, frame by frame."""
        return WanCausalDecoder(vae, restart_every=HELIOS_LATENT_FRAMES_PER_CHUNK)

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """As ``HeliosPipeline`` does: each chunk of ``HELIOS_LATENT_FRAMES_PER_CHUNK`` latent
        frames decoded on its own (Wan's normalisation and VAE), the videos concatenated.
        ``[B, C, F, h, w]`` -> ``[B, 3, frames, H, W]``, 33 frames per full chunk (the pipeline's
        final trim to ``4k + 1`` frames is left out: no frame is dropped)."""
        decode = super().decode_latents
        chunks = latents.split(HELIOS_LATENT_FRAMES_PER_CHUNK, dim=2)
        return torch.cat([decode(vae, chunk) for chunk in chunks], dim=2)
