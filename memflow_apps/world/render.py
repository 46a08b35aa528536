"""Deterministic rendering of the narrative world: frames ``[F, 3, H, W]`` in ``[-1, 1]``."""

from __future__ import annotations

import torch

from .grammar import (
    ACTIONS,
    COLOURS,
    DEFAULT_EDITION,
    EDITIONS,
    Entity,
    Place,
    Script,
    WorldEdition,
)

#: Frame size in pixels.
HEIGHT = WIDTH = 32
#: The row of every entity's centre.
CENTRE_ROW = 16
SHADE = 0.7
#: Pixels per token side: the autoencoder folds 2x2 pixels, the transformer patches 2x2 latents.
TOKEN_PIXELS = 4


def place_background(
    place: Place,
    height: int = HEIGHT,
    width: int = WIDTH,
    edition: WorldEdition = EDITIONS[DEFAULT_EDITION],
) -> torch.Tensor:
    """``[3, H, W]`` in ``[0, 1]``: the base colour with the texture in a darker shade, plus the
    edition's position cue (red grows down the frame, blue to the right)."""
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
    background = torch.where(shaded, base * SHADE, base.expand(3, height, width)).clone()
    if edition.position_cue:
        background[0] += edition.position_cue * rows / (height - 1)
        background[2] += edition.position_cue * cols / (width - 1)
    return background.clamp(0.0, 1.0)


def entity_mask(
    entity: Entity,
    centre_col: int,
    height: int = HEIGHT,
    width: int = WIDTH,
    edition: WorldEdition = EDITIONS[DEFAULT_EDITION],
) -> torch.Tensor:
    """``[H, W]`` bool: the pixels the entity covers with its centre at ``(CENTRE_ROW,
    centre_col)`` (clipped at the frame's edges)."""
    if edition.grid_aligned:
        return _grid_box(entity, centre_col, height, width, edition)
    side = edition.size_pixels[entity.size]
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


def _grid_box(
    entity: Entity, centre_col: int, height: int, width: int, edition: WorldEdition
) -> torch.Tensor:
    """A box on the token grid: ``block`` long x long, ``bar`` long wide and half as tall,
    ``pole`` half as wide and long tall (long: the size's pixels), its top-left corner the grid
    point at or before where the centred box would start."""
    long_side = edition.size_pixels[entity.size]
    extents = {"block": (long_side, long_side), "bar": (long_side // 2, long_side),
               "pole": (long_side, long_side // 2)}
    if entity.shape not in extents:
        raise ValueError(f"entity.shape must be one of {sorted(extents)}, got {entity.shape!r}")
    box_height, box_width = extents[entity.shape]
    top = (CENTRE_ROW - box_height // 2) // TOKEN_PIXELS * TOKEN_PIXELS
    left = (centre_col - box_width // 2) // TOKEN_PIXELS * TOKEN_PIXELS
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return ((rows >= top) & (rows < top + box_height)
            & (cols >= left) & (cols < left + box_width))


def render_script(script: Script) -> torch.Tensor:
    """The script's video ``[F, 3, H, W]`` float32 in ``[-1, 1]`` (drawn in its edition)."""
    edition = EDITIONS[script.edition]
    frames = []
    for segment in script.segments:
        background = place_background(segment.place, edition=edition)
        positions = ACTIONS[segment.action] if segment.action else (None,) * 4
        for centre in positions:
            frame = background.clone()
            if segment.entity is not None and centre is not None:
                mask = entity_mask(segment.entity, centre, edition=edition)
                colour = torch.tensor(COLOURS[segment.entity.colour])[:, None, None]
                frame = torch.where(mask, colour, frame)
            frames.append(frame)
    return torch.stack(frames) * 2.0 - 1.0
