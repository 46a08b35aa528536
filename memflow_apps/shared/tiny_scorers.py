"""Tiny random-weight feature models for offline smoke runs of ``memflow eval``.

``memflow eval --clip-model tiny-random --dino-model tiny-random`` scores with these: a 2-layer
CLIP (the tiny Wan's tokenizer) and a 2-layer DINOv2, both on 32x32 inputs, built and saved
locally, so nothing is downloaded. Their scores mean nothing; they exercise the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_wan import build_tiny_wan_tokenizer

#: The option value that selects these models.
TINY_SCORER = "tiny-random"
#: Input size (pixels) of both models.
TINY_SCORER_SIZE = 32
#: The packaged prompt groups for a smoke run (``memflow eval --prompts sample``): four groups of
#: six successive prompts, written for this project, in the public interactive benchmark's format.
SAMPLE_PROMPTS = Path(__file__).with_name("sample_groups.jsonl")


def save_tiny_clip(folder: Path) -> Path:
    """Save a tiny random CLIP (seed 0), its tokenizer and its image processor into ``folder``."""
    # imported here: transformers warns at import of image processors without torchvision
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_tiny_wan_tokenizer()
    size = TINY_SCORER_SIZE
    config = CLIPConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path) -> Path:
    """Save a tiny random DINOv2 (seed 1) and its image processor into ``folder``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    size = TINY_SCORER_SIZE
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=size,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor.save_pretrained(folder)
    return folder
