"""Tiny random-weight models built from the real diffusers configs in tests/fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

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


def tiny_wan(seed: int = 0, base: str = "wan2.1-t2v-1.3b", **overrides) -> WanTransformer3DModel:
    """A tiny random Wan from the real config of ``base`` (a folder in tests/fixtures)."""
    config = json.loads((FIXTURES / base / "transformer/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(TINY_WAN, **overrides)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    # diffusers initialises some projections to zero; random weights make every path matter.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model
