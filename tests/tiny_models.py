"""Tiny random-weight models built from the real diffusers configs in tests/fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ModelMixin, WanTransformer3DModel

FIXTURES = Path(__file__).parent / "fixtures"

# Shrinks the width and depth of Wan2.1-T2V-1.3B; keeps its shape rules (16 latent channels,
# 1x2x2 patches, RMS norms across heads, cross-attention norm, 3-D RoPE).
TINY_WAN = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "freq_dim": 16,
    "text_dim": 16,
}


def tiny_from_fixture(
    model_class: type[ModelMixin], fixture: str, shrink: dict, seed: int = 0, **overrides
) -> ModelMixin:
    """A tiny random model: the real config in ``tests/fixtures/<fixture>/transformer`` with the
    ``shrink`` and ``overrides`` values, every parameter drawn from N(0, 0.3) (diffusers
    initialises some projections to zero; random weights make every path matter)."""
    config = json.loads((FIXTURES / fixture / "transformer/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(shrink, **overrides)
    torch.manual_seed(seed)
    model = model_class(**config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def tiny_wan(seed: int = 0, base: str = "wan2.1-t2v-1.3b", **overrides) -> WanTransformer3DModel:
    """A tiny random Wan from the real config of ``base`` (a folder in tests/fixtures)."""
    return tiny_from_fixture(WanTransformer3DModel, base, TINY_WAN, seed, **overrides)
