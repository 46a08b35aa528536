"""diffusers ``WanTransformer3DModel`` (Wan2.1 / Wan2.2 T2V, and the Self-Forcing, LongLive and
MemFlow checkpoints built on it) made causal and streaming.

Everything below mirrors diffusers' ``WanAttnProcessor`` and ``WanRotaryPosEmbed``; the only
differences are that self-attention is delegated to the session and that RoPE's temporal
positions start at the chunk's absolute latent frame.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanPipeline
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel
from torch import nn

from .base import AttendFn, ChunkwiseDecoder, Integration, LatentDecoder, VideoDefaults
from .checkpoints import CheckpointConversion
from .wan_checkpoints import original_lora_to_diffusers, original_to_diffusers

#: diffusers config of the Wan2.1-T2V-1.3B transformer, the base of Self-Forcing, LongLive and
#: MemFlow (and the default base of published checkpoints in the original layout).
WAN21_T2V_1_3B_TRANSFORMER = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": (1, 2, 2),
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}


def apply_wan_rotary(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    """Wan's interleaved rotary embedding. ``hidden_states``: ``[B, N, H, D]``; freqs
    ``[1, N, 1, D]``."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def shorten_rope_table(model: nn.Module, frames: int) -> None:
    """Keep the first ``frames`` temporal positions of a Wan-layout model's RoPE table: the same
    weights as a model configured with ``rope_max_seq_len=frames`` (a table row does not depend on
    the table's length). For tests and benchmarks of streams past the table."""
    rope = model.rope
    valid = isinstance(frames, int) and not isinstance(frames, bool)
    if not valid or not 1 <= frames <= rope.max_seq_len:
        raise ValueError(f"frames must be an int in 1..{rope.max_seq_len}, got {frames!r}")
    rope.max_seq_len = frames
    rope.freqs_cos = rope.freqs_cos[:frames].clone()
    rope.freqs_sin = rope.freqs_sin[:frames].clone()
    model.register_to_config(rope_max_seq_len=frames)


class WanStreamingSelfAttnProcessor:
    """Self-attention of one Wan block, with the attention itself done by the session."""

    def __init__(self, layer: int, attend: AttendFn) -> None:
        self.layer = layer
        self.attend = attend

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "a streaming Wan self-attention takes neither encoder_hidden_states nor "
                "attention_mask: the session decides what each frame attends to"
            )
        if rotary_emb is None:
            raise ValueError("a streaming Wan self-attention needs rotary_emb (post-RoPE keys)")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (
                attn.to_q(hidden_states),
                attn.to_k(hidden_states),
                attn.to_v(hidden_states),
            )
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_wan_rotary(query, *rotary_emb)
        key = apply_wan_rotary(key, *rotary_emb)

        hidden_states = self.attend(self.layer, query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class WanIntegration(Integration):
    """diffusers ``WanTransformer3DModel``: ``blocks[i].attn1`` is self-attention, ``attn2``
    cross-attention, ``rope`` the 3-D rotary embedding (temporal, height, width)."""

    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    pipeline_class = WanPipeline
    context_parallel = True
    #: Every ``nn.Linear`` of the blocks: self- and cross-attention ``to_q``, ``to_k``, ``to_v``,
    #: ``to_out.0`` and the FFN's two (the layout of the published MemFlow LoRA).
    lora_targets = re.compile(
        r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
    )
    #: ``WanPipeline``'s defaults (tests/test_wan.py checks them against its signature).
    default_video = VideoDefaults(height=480, width=832, max_sequence_length=512)
    #: ``AutoencoderKLWan``'s ``scale_factor_temporal``.
    vae_temporal_factor = 4
    #: Self-Forcing, LongLive and MemFlow publish ``WanTransformer3DModel`` weights in the
    #: original Wan2.1 layout (``wan_checkpoints.py``), fine-tuned from Wan2.1-T2V-1.3B.
    checkpoints = CheckpointConversion(
        model_class=WanTransformer3DModel,
        to_diffusers=original_to_diffusers,
        lora_to_diffusers=original_lora_to_diffusers,
        base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        base_config=WAN21_T2V_1_3B_TRANSFORMER,
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, WanTransformer3DModel)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        patch_t = model.config.patch_size[0]
        if patch_t != 1:
            raise ValueError(
                f"streaming needs a temporal patch size of 1 (one token frame per latent frame), "
                f"this {type(model).__name__} has patch_size[0]={patch_t}"
            )

    def self_attention_modules(self) -> list[nn.Module]:
        return [block.attn1 for block in self.model.blocks]

    def self_attention_processor(self, layer: int, attend: AttendFn) -> Any:
        return WanStreamingSelfAttnProcessor(layer, attend)

    def rope_module(self) -> nn.Module:
        return self.model.rope

    def rope_forward(
        self, rope: nn.Module, frame_offset: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope(hidden_states)`` for frames ``frame_offset ..`` (0-d int64 tensor): cos and
        sin ``[1, N, 1, D]``."""
        _, _, num_frames, height, width = hidden_states.shape
        _, p_h, p_w = rope.patch_size
        pph, ppw = height // p_h, width // p_w
        device = rope.freqs_cos.device
        positions = frame_offset.to(device) + torch.arange(num_frames, device=device)
        split_sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        tables = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            frames, rows, cols = table.split(split_sizes, dim=1)
            shape = (num_frames, pph, ppw, -1)
            tables.append(
                torch.cat(
                    [
                        frames.index_select(0, positions).view(num_frames, 1, 1, -1).expand(shape),
                        rows[:pph].view(1, pph, 1, -1).expand(shape),
                        cols[:ppw].view(1, 1, ppw, -1).expand(shape),
                    ],
                    dim=-1,
                ).reshape(1, num_frames * pph * ppw, 1, -1)
            )
        return tables[0], tables[1]

    def rope_frames(self) -> int:
        return self.model.rope.max_seq_len

    def rotate_keys(self, keys: torch.Tensor, frame_shift: torch.Tensor) -> torch.Tensor:
        """Rotate by the temporal rows of RoPE's own table: row ``|shift|``, with the sine's
        sign flipped for a negative shift (``cos`` is even, ``sin`` odd); the height and width
        channels rotate by 0."""
        rope = self.model.rope
        magnitude = frame_shift.abs()
        if int(magnitude.max()) >= rope.max_seq_len:
            raise ValueError(
                f"frame_shift must be smaller than the RoPE table (rope_max_seq_len="
                f"{rope.max_seq_len}) in magnitude, got {int(magnitude.max())}"
            )
        tokens_per_frame = keys.shape[1] // frame_shift.shape[1]
        cos = torch.ones((*frame_shift.shape, keys.shape[-1]), dtype=rope.freqs_cos.dtype,
                         device=keys.device)
        sin = torch.zeros_like(cos)
        table_cos = rope.freqs_cos[:, : rope.t_dim].to(keys.device)
        table_sin = rope.freqs_sin[:, : rope.t_dim].to(keys.device)
        cos[..., : rope.t_dim] = table_cos[magnitude]
        sin[..., : rope.t_dim] = table_sin[magnitude] * frame_shift.sign()[..., None]
        per_token = [table.repeat_interleave(tokens_per_frame, dim=1)[:, :, None]
                     for table in (cos, sin)]
        return apply_wan_rotary(keys, *per_token)

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, p_h, p_w = self.model.config.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch size "
                f"{p_h}x{p_w}"
            )
        return (latent_height // p_h) * (latent_width // p_w)

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """As ``WanPipeline`` does: undo the per-channel latent normalisation, then decode."""
        return vae.decode(denormalise_wan_latents(vae, latents), return_dict=False)[0]

    def latent_decoder(self, vae: nn.Module) -> LatentDecoder:
        """Wan's causal VAE decodes through its temporal feature cache (``WanCausalDecoder``);
        an autoencoder that declares ``decodes_frames_independently`` (no temporal context, as
        the narrative world's) decodes each chunk on its own."""
        if isinstance(vae, AutoencoderKLWan):
            return WanCausalDecoder(vae)
        if getattr(vae, "decodes_frames_independently", False):
            return ChunkwiseDecoder(lambda latents: self.decode_latents(vae, latents))
        raise TypeError(
            f"vae must be an AutoencoderKLWan or an autoencoder with decodes_frames_independently "
            f"= True to decode a stream chunk by chunk, got {type(vae).__name__}"
        )

    def text_keys(self, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        context = self.model.condition_embedder.text_embedder(prompt_embeds)
        keys = []
        for block in self.model.blocks:
            attn = block.attn2
            if attn.fused_projections:
                key = attn.to_kv(context).chunk(2, dim=-1)[0]
            else:
                key = attn.to_k(context)
            keys.append(attn.norm_k(key).unflatten(2, (attn.heads, -1)))
        return keys


def denormalise_wan_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Generated latents ``[B, z, F, h, w]`` -> the VAE's own latent scale (``z * std + mean`` per
    channel), in the VAE's dtype."""
    channels = (1, vae.config.z_dim, 1, 1, 1)
    latents = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(channels).to(latents)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(channels).to(latents)
    return latents / inverse_std + mean


class WanCausalDecoder(LatentDecoder):
    """``AutoencoderKLWan``'s decoding, one latent frame at a time as ``AutoencoderKLWan.decode``
    runs it, with the temporal feature cache kept across calls: latent frame 0 gives 1 video frame,
    every later one ``vae.config.scale_factor_temporal`` frames (4), so a chunk's frames are out
    as soon as the chunk is.

    Args:
        vae: the VAE (no tiling: ``decode`` would tile a large video spatially, which a frame
            stream does not).
        restart_every: start a fresh cache every N latent frames (Helios decodes each chunk of N
            latent frames on its own); default never.
    """

    def __init__(self, vae: AutoencoderKLWan, restart_every: int | None = None) -> None:
        if vae.use_tiling:
            raise ValueError(
                "the VAE has tiling enabled (vae.enable_tiling()); stream decoding runs it "
                "untiled: call vae.disable_tiling() first"
            )
        if restart_every is not None and restart_every < 1:
            raise ValueError(f"restart_every must be None or an int >= 1, got {restart_every}")
        self.vae = vae
        self.restart_every = restart_every
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._cache: list = []
        self._frames_decoded = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        x = vae.post_quant_conv(denormalise_wan_latents(vae, latents))
        frames = []
        for i in range(x.shape[2]):
            restart = self.restart_every or self._frames_decoded + 1
            first = self._frames_decoded % restart == 0
            if first:
                self._cache = [None] * self._num_convs
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=first
                )
            )
            self._frames_decoded += 1
        video = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        return video.clamp(-1.0, 1.0)

    def state(self) -> dict:
        cache = [e.clone() if isinstance(e, torch.Tensor) else e for e in self._cache]
        return {"frames_decoded": self._frames_decoded, "feature_cache": cache}

    def load_state(self, state: dict) -> None:
        frames_decoded, cache = int(state["frames_decoded"]), list(state["feature_cache"])
        if frames_decoded < 0 or (frames_decoded > 0 and len(cache) != self._num_convs):
            raise ValueError(
                f"decoder state must hold {self._num_convs} cache entries after frame 0, got "
                f"{len(cache)} after {frames_decoded} frames"
            )
        self._cache = [e.clone() if isinstance(e, torch.Tensor) else e for e in cache]
        self._frames_decoded = frames_decoded
