"""Deterministic rendering of the narrative world: frames ``[F, 3, H, W]`` in ``[-1, 1]``."""

from __future__ import annotations

import torch

from .grammar import ACTIONS, COLOURS, SIZES, Entity, Place, Script

#: Frame size in pixels.
HEIGHT = WIDTH = 32
#: The row of every entity's centre.
CENTRE_ROW = 16
SHADE = 0.7


def place_background(place: Place, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """``[3, H, W]`` in ``[0, 1]``: the base colour with the texture in a darker shade."""
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    if place.texture == "plain":
        shaded = torch.zeros(height, width, dtype=torch.bool)
    elif place.texture == "stripes":
        shaded = (rows // 4) % 2 == 1
    elif place.texture == "checker":
        shaded = ((rows // 4) + (cols // 4)) % 2 == 1
    elif place.texture == "dots":
        shaded = (rows % 4 == 1) & (cols % 4 == 1)
    else:
        raise ValueError(f"place.texture must be plain, stripes, checker or dots, got "
                         f"{place.texture!r}")
    base = torch.tensor(place.colour)[:, None, None]
    return torch.where(shaded, base * SHADE, base.expand(3, height, width)).clone()


def entity_mask(entity: Entity, centre_col: int, height: int = HEIGHT,
                width: int = WIDTH) -> torch.Tensor:
    """``[H, W]`` bool: the pixels the entity covers with its centre at ``(CENTRE_ROW,
    centre_col)`` (clipped at the frame's edges)."""
    side = SIZES[entity.size]
    rows = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    cols = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    dy, dx = rows - CENTRE_ROW, cols - centre_col
    half = side / 2
    inside_box = (dy.abs() <= half) & (dx.abs() <= half)
    if entity.shape == "square":
        return inside_box
    if entity.shape == "circle":
        return dy**2 + dx**2 <= half**2
    if entity.shape == "triangle":
        # apex up: the width grows linearly from the top row to the base
        depth = (dy + half) / side
        return inside_box & (dx.abs() <= depth * half)
    raise ValueError(f"entity.shape must be square, circle or triangle, got {entity.shape!r}")


def render_script(script: Script) -> torch.Tensor:
    """The script's video ``[F, 3, H, W]`` float32 in ``[-1, 1]``."""
    frames = []
    for segment in script.segments:
        background = place_background(segment.place)
        positions = ACTIONS[segment.action] if segment.action else (None,) * 4
        for centre in positions:
            frame = background.clone()
            if segment.entity is not None and centre is not None:
                mask = entity_mask(segment.entity, centre)
                colour = torch.tensor(COLOURS[segment.entity.colour])[:, None, None]
                frame = torch.where(mask, colour, frame)
            frames.append(frame)
    return torch.stack(frames) * 2.0 - 1.0
