"""The narrative world's fixed (untrained) components: a lossless pixel-space autoencoder and an
offline text encoder over the grammar's vocabulary.

* ``PixelAutoencoder``: latents are 2x2 pixel patches folded into channels
  (``[B, 3, F, H, W]`` <-> ``[B, 12, F, H/2, W/2]``, ``torch.pixel_unshuffle``), no temporal
  compression; it exposes what the Wan integration reads from ``AutoencoderKLWan``
  (``config.z_dim``, ``config.latents_mean``, ``config.latents_std``, ``decode``).
* ``WorldTokenizer`` + ``WorldTextEncoder``: word ids (lower-cased, split on spaces; ``<unk>`` for
  words outside the grammar), a seeded random embedding per word plus a sinusoidal position
  code, zero past the prompt's last token as Wan's UMT5 embeddings are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional

from .grammar import vocabulary

PAD, UNK = "<pad>", "<unk>"


class PixelAutoencoder(ModelMixin, ConfigMixin):
    """Pixels ``[-1, 1]`` <-> latents by 2x2 space-to-channel folding (exact inverse).

    Normalised latents (what the transformer sees) are ``(z - latents_mean) / latents_std``.
    """

    #: Every latent frame decodes on its own, so a stream decodes each chunk alone
    #: (``WanIntegration.latent_decoder``).
    decodes_frames_independently = True

    @register_to_config
    def __init__(self, patch: int = 2, latents_std: float = 0.5) -> None:
        super().__init__()
        z_dim = 3 * patch * patch
        self.register_to_config(
            z_dim=z_dim, latents_mean=[0.0] * z_dim, latents_std=[latents_std] * z_dim
        )
        # a parameter-free model still needs a dtype and a device for diffusers
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def encode_normalised(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, z, F, H/p, W/p]``."""
        frames = video.transpose(1, 2).flatten(0, 1)
        folded = functional.pixel_unshuffle(frames, self.config.patch)
        batch, num_frames = video.shape[0], video.shape[2]
        latents = folded.unflatten(0, (batch, num_frames)).transpose(1, 2)
        return latents / self.config.latents_std[0]

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Un-normalised latents ``[B, z, F, h, w]`` -> video ``[B, 3, F, p*h, p*w]``."""
        frames = latents.transpose(1, 2).flatten(0, 1)
        unfolded = functional.pixel_shuffle(frames, self.config.patch)
        video = unfolded.unflatten(0, (latents.shape[0], latents.shape[2])).transpose(1, 2)
        video = video.clamp(-1.0, 1.0)
        return DecoderOutput(sample=video) if return_dict else (video,)


class WorldTokenizer:
    """Word-level tokenizer over the grammar's vocabulary (id 0 pads, 1 is unknown)."""

    def __init__(self) -> None:
        self.words = [PAD, UNK, *vocabulary()]
        self.ids = {word: index for index, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``[B, max_length]`` (padded; longer prompts are cut) and their mask."""
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.ids.get(word, 1) for word in text.lower().split()][:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, ids != 0


class WorldTextEncoder(ModelMixin, ConfigMixin):
    """Fixed embeddings: ``[B, L]`` ids -> ``[B, L, dim]`` (zero at padding)."""

    @register_to_config
    def __init__(self, vocab_size: int, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embedding = nn.Embedding(vocab_size, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(vocab_size, dim, generator=generator))
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        return (self.embedding(ids) + self._position_code(positions)) * mask[..., None]

    def _position_code(self, positions: torch.Tensor) -> torch.Tensor:
        dim = self.config.dim
        frequencies = torch.exp(
            -math.log(100.0) * torch.arange(0, dim, 2, device=positions.device) / dim
        )
        angles = positions[:, None] * frequencies[None]
        code = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return code.to(self.embedding.weight.dtype)
