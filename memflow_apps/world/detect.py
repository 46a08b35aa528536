"""Exact attribute detectors for the narrative world's frames (generated or rendered).

The world is synthetic, so a frame's place and entity can be read back: the place is the nearest
place background (mean squared distance over the whole frame, the entity's pixels excluded), the
entity is the largest 8-connected blob of pixels far from that background (scattered specks of
noise are no entity), its colour the nearest entity colour to the blob's mean, its size and shape
from the blob's bounding box and fill ratio. On rendered frames the detectors are exact (tested
on every combination); on generated frames they say what a viewer would name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import COLOURS, DEFAULT_EDITION, EDITIONS, PLACES, world_edition
from .render import place_background

#: A pixel belongs to the entity when it is this far (RGB distance in [0, 1] units) from the
#: place's background.
ENTITY_DISTANCE = 0.3
#: A blob of fewer pixels than this is no entity (the smallest fully visible entity covers 36
#: pixels).
MIN_ENTITY_PIXELS = 20
#: Bounding-box height splitting small (8) from big (14).
SIZE_SPLIT = 11
#: Fill ratios: square ~1.0, circle ~0.8, triangle ~0.55.
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.67
#: Edition v2: the long side splitting small (8) from big (16), and the aspect ratio (width over
#: height) above which a box is a bar (2) and below whose inverse it is a pole (1/2); a block is 1.
LONG_SIDE_SPLIT = 12
BAR_ASPECT = 1.5


@dataclass(frozen=True)
class Detection:
    """What a frame shows: the place, and the entity's looks (``None`` when no entity is
    seen; ``size`` and ``shape`` are ``None`` when it touches the frame's side edges)."""

    place: str
    colour: str | None = None
    size: str | None = None
    shape: str | None = None

    @property
    def looks(self) -> tuple[str | None, str | None, str | None]:
        return self.colour, self.size, self.shape


_BACKGROUNDS = {
    edition: {name: place_background(place, edition=EDITIONS[edition])
              for name, place in PLACES.items()}
    for edition in EDITIONS
}
_COLOURS = torch.tensor(list(COLOURS.values()))


def detect(frame: torch.Tensor, edition: str = DEFAULT_EDITION) -> Detection:
    """Read one frame ``[3, H, W]`` in ``[-1, 1]`` of world ``edition``."""
    world = world_edition(edition)
    backgrounds = _BACKGROUNDS[edition]
    image = (frame.float().clamp(-1, 1) + 1) / 2
    place = min(backgrounds, key=lambda name: _background_error(image, backgrounds[name]))
    distance = (image - backgrounds[place]).norm(dim=0)
    mask = largest_blob(distance > ENTITY_DISTANCE)
    if int(mask.sum()) < MIN_ENTITY_PIXELS:
        return Detection(place)
    mean = image[:, mask].mean(dim=1)
    colour = list(COLOURS)[int((_COLOURS - mean).norm(dim=1).argmin())]
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    if cols[0] == 0 or cols[-1] == mask.shape[1] - 1:
        return Detection(place, colour)
    height = int(rows[-1] - rows[0] + 1)
    width = int(cols[-1] - cols[0] + 1)
    if world.grid_aligned:
        return Detection(place, colour, *_box_looks(height, width))
    fill = float(mask.sum()) / (height * width)
    size = "big" if height > SIZE_SPLIT else "small"
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return Detection(place, colour, size, shape)


def _box_looks(height: int, width: int) -> tuple[str, str]:
    """Edition v2's size (by the long side) and shape (by the aspect ratio) of a bounding box."""
    size = "big" if max(height, width) > LONG_SIDE_SPLIT else "small"
    aspect = width / height
    shape = "bar" if aspect > BAR_ASPECT else "pole" if aspect < 1 / BAR_ASPECT else "block"
    return size, shape


def largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a boolean mask ``[H, W]`` (all ``False`` when the
    mask is empty; ties go by raster order)."""
    height, width = mask.shape
    # every pixel takes the largest label of its 8 neighbours until the labels stop changing
    labels = torch.arange(1, height * width + 1, dtype=torch.float32).view(height, width)
    labels = labels * mask
    while True:
        spread = torch.nn.functional.max_pool2d(labels[None, None], 3, stride=1, padding=1)
        spread = spread[0, 0] * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    found, counts = labels[mask].unique(return_counts=True)
    if found.numel() == 0:
        return mask
    return labels == found[counts.argmax()]


def _background_error(image: torch.Tensor, background: torch.Tensor) -> float:
    """Mean squared distance over the pixels closer than ``ENTITY_DISTANCE`` to the background
    (the entity's pixels do not count), plus a penalty for the rest."""
    distance = (image - background).norm(dim=0)
    near = distance <= ENTITY_DISTANCE
    penalty = torch.full_like(distance, ENTITY_DISTANCE**2)
    return float(torch.where(near, distance**2, penalty).mean())
