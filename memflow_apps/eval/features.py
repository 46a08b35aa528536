"""Per-frame feature extractors for the benchmark, loaded through transformers.

* :class:`ClipFeatures`: CLIP image and text embeddings (``CLIPModel`` with its image processor
  and tokenizer) for the CLIP score and background consistency. Default
  ``"openai/clip-vit-base-patch32"``, VBench's background-consistency model.
* :class:`DinoFeatures`: DINO image features (``AutoModel``: the CLS token after the final
  layer norm, ``last_hidden_state[:, 0]``, what DINO's own forward returns) for subject
  consistency. Default ``"facebook/dinov2-base"``; VBench uses DINO ViT-B/16
  (``"facebook/dino-vitb16"``), which loads the same way (its ``pooler_output`` would be an
  untrained pooler, hence the CLS token).
* :class:`LinearAestheticPredictor`: the LAION aesthetic predictor (VBench's aesthetic quality):
  a linear head, or a chain of linear layers as in the improved predictor, over L2-normalised
  CLIP image embeddings (ViT-L/14 for the published heads), scoring 0-10; returned / 10.

Every extractor takes a batch of frames as a ``[B, H, W, 3]`` uint8 array (floats in ``[0, 1]``
are converted) and returns float32 features on the CPU. The classes also take already-built
objects (model, image processor, tokenizer) so that callers and tests can bring their own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from memflow_apps.shared.videos import as_uint8_frames

__all__ = [
    "DEFAULT_AESTHETIC_CLIP_MODEL",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "AestheticPredictor",
    "ClipFeatures",
    "DinoFeatures",
    "LinearAestheticPredictor",
    "as_uint8_frames",
    "load_linear_head",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
DEFAULT_AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"


class AestheticPredictor(Protocol):
    """Scores frames ``[B, H, W, 3]`` (uint8) on a 0-1 scale: a ``[B]`` tensor."""

    def __call__(self, frames: np.ndarray) -> torch.Tensor: ...


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pooled(output: Any) -> torch.Tensor:
    """transformers 4.x returns tensors from ``get_*_features``; 5.x a ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    return output.last_hidden_state[:, 0]


class _ImageFeatures:
    """Shared batching: frames -> processor -> model -> features, ``batch_size`` at a time."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _default_device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.batch_size = batch_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        inputs = self.image_processor(images=list(frames), return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.dtype)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, frames: Any) -> torch.Tensor:
        """``[B, D]`` float32 CPU features of ``[B, H, W, 3]`` frames."""
        frames = as_uint8_frames(frames)
        batches = [
            self._forward(self._pixels(frames[i : i + self.batch_size])).float().cpu()
            for i in range(0, len(frames), self.batch_size)
        ]
        if not batches:
            raise ValueError("no frames to encode")
        return torch.cat(batches)


class ClipFeatures(_ImageFeatures):
    """CLIP image and text embeddings (projected, not normalised).

    Args:
        model: a ``transformers.CLIPModel`` (or any model with ``get_image_features`` and
            ``get_text_features``).
        image_processor: turns a list of HWC frames into ``pixel_values``.
        tokenizer: turns prompts into ``input_ids``; long prompts are truncated to the text
            model's positions (77 for OpenAI CLIP).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        tokenizer: Any,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(model, image_processor, device, batch_size)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_CLIP_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> ClipFeatures:
        """Load ``CLIPModel``, ``AutoImageProcessor`` and ``AutoTokenizer`` from a Hub id or a
        folder."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        name = str(name_or_path)
        return cls(
            CLIPModel.from_pretrained(name),
            AutoImageProcessor.from_pretrained(name),
            AutoTokenizer.from_pretrained(name),
            device=device,
            batch_size=batch_size,
        )

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` float32 CPU text embeddings."""
        config = getattr(self.model.config, "text_config", self.model.config)
        max_length = getattr(config, "max_position_embeddings", None) or 77
        inputs = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        output = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
        )
        return _pooled(output).float().cpu()


class DinoFeatures(_ImageFeatures):
    """DINO / DINOv2 image features: the CLS token of ``last_hidden_state`` (after the final
    layer norm; for DINOv2 this is also its ``pooler_output``)."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_DINO_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> DinoFeatures:
        """Load ``AutoModel`` and ``AutoImageProcessor`` from a Hub id or a folder."""
        from transformers import AutoImageProcessor, AutoModel

        name = str(name_or_path)
        return cls(
            AutoModel.from_pretrained(name),
            AutoImageProcessor.from_pretrained(name),
            device=device,
            batch_size=batch_size,
        )

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class LinearAestheticPredictor:
    """LAION-style aesthetic predictor: linear layers over normalised CLIP image embeddings.

    ``score = head(normalize(clip_image(frame))) / 10`` (the head scores 0-10). ``head`` is the
    chain of ``torch.nn.Linear`` layers read from a state dict: ``{"weight", "bias"}`` (the
    linear head VBench uses, ``sa_0_4_vit_l_14_linear.pth``) or ``{"layers.0.weight", ...}``
    (the improved predictor's MLP, whose layers have no activations between them).
    """

    def __init__(self, clip: ClipFeatures, head: torch.nn.Module, scale: float = 10.0) -> None:
        self.clip = clip
        self.head = head.to(torch.float32).eval()
        self.scale = scale

    @classmethod
    def from_files(
        cls,
        head: str | os.PathLike[str],
        clip_model: str | os.PathLike[str] = DEFAULT_AESTHETIC_CLIP_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> LinearAestheticPredictor:
        return cls(
            ClipFeatures.from_pretrained(clip_model, device=device, batch_size=batch_size),
            load_linear_head(head),
        )

    @torch.no_grad()
    def __call__(self, frames: Any) -> torch.Tensor:
        embeddings = self.clip.encode_images(frames)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(embeddings).reshape(-1).double() / self.scale


def load_linear_head(path: str | os.PathLike[str]) -> torch.nn.Sequential:
    """A chain of ``torch.nn.Linear`` layers from a LAION aesthetic-head state dict file."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of linear layers")
    prefixes = sorted(
        {key[: -len("weight")] for key in state if key.endswith("weight")},
        key=lambda prefix: [int(p) if p.isdigit() else p for p in prefix.split(".") if p],
    )
    layers = []
    for prefix in prefixes:
        weight = state[prefix + "weight"]
        if weight.ndim != 2:
            raise ValueError(f"{path}: {prefix}weight is not a linear layer's weight")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=prefix + "bias" in state)
        layer.weight.data.copy_(weight)
        if layer.bias is not None:
            layer.bias.data.copy_(state[prefix + "bias"])
        layers.append(layer)
    if not layers:
        raise ValueError(f"{path}: no linear layer weights found")
    for before, after in zip(layers, layers[1:], strict=False):
        if before.out_features != after.in_features:
            raise ValueError(f"{path}: layer sizes do not chain ({before} then {after})")
    return torch.nn.Sequential(*layers)
