"""A narrative world small enough to train on a CPU: procedural six-prompt stories in which an
entity leaves and comes back, their deterministic rendering, exact attribute detectors, and the
pipeline of a tiny streaming Wan model the recipes train on them (see README.md)."""

from .detect import Detection, detect
from .grammar import Script, make_script
from .pipeline import (
    WORLD_GUIDANCE_SCALE,
    WORLD_MEMORY,
    WORLD_SEQUENCE_LENGTH,
    NarrativeWorldPipeline,
    build_world_pipeline,
    load_world_pipeline,
    load_world_student,
)
from .render import render_script

__all__ = [
    "WORLD_GUIDANCE_SCALE",
    "WORLD_MEMORY",
    "WORLD_SEQUENCE_LENGTH",
    "Detection",
    "NarrativeWorldPipeline",
    "Script",
    "build_world_pipeline",
    "detect",
    "load_world_pipeline",
    "load_world_student",
    "make_script",
    "render_script",
]
