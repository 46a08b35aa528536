"""The names the ``memflow`` parser offers, declared without importing torch, diffusers or the
world, so that ``memflow --help`` answers at once. ``tests/test_cli.py`` checks each against the
library value it mirrors."""

from __future__ import annotations

#: The embedded tiny random-weight Wan (``memflow_apps.shared.tiny_wan``), and the tiny random
#: feature models of ``memflow eval`` (``memflow_apps.shared.tiny_scorers.TINY_SCORER``): offline,
#: plumbing only.
TINY_RANDOM = "tiny-random"
#: ``integrations.reference_integration().checkpoints.base_model``: the base
#: MemFlow's published checkpoints fine-tune, ``memflow convert``'s default.
REFERENCE_BASE_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
#: ``memflow_adapter.config.PRESETS``.
PRESETS = ("reference", "reference_sma", "longlive", "full_history")
#: ``sorted(memflow_adapter.frame_buffer.CACHE_DTYPES)``.
CACHE_DTYPES = ("float8_e4m3fn", "int8")
#: ``memflow_apps.world.demo``: ``WORLD_DEMO_MODEL.name`` and ``WORLD_OTHER_MODEL.name``.
WORLD_DEMO_MODEL_NAME = "model"
WORLD_OTHER_MODEL_NAME = "student"
#: ``memflow_apps.eval.features``' ``DEFAULT_CLIP_MODEL``, ``DEFAULT_DINO_MODEL`` and
#: ``DEFAULT_AESTHETIC_CLIP_MODEL``.
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
DEFAULT_AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: ``memflow_apps.shared.memories.DEFAULT_MEMORIES``: what ``memflow compare`` runs by default.
DEFAULT_MEMORIES = ("nam", "nam_no_sink", "recency", "uniform", "visual", "nam+sma", "none")
