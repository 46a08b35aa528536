"""The narrative world's vocabulary and scripts: places, named entities, and six-prompt stories in
which an entity leaves and comes back (A -> B -> A), in the spirit of the MemFlow / LongLive
interactive benchmark.

A script's six segments (``SEGMENT_FRAMES`` latent frames each):

1. an empty place A;
2. entity P (named, described by size, colour and shape) enters place A;
3. P leaves place A (it is gone);
4. in place B, entity Q (named and described) walks;
5. Q leaves place B;
6. back in place A, P comes back: the prompt names P but does not describe it, so what P looks
   like is only in the video's own history (its first appearance, segment 2).

The world comes in two editions (``WorldEdition``), with the same places, names, colours and
story grammar; what differs is the entities' shapes and sizes and the backgrounds' position cue:

* ``v1`` (the packaged models): square / circle / triangle, 8 or 14 pixels, centred anywhere
  inside a 4-pixel token: the shapes differ only inside a token, which the model draws at chance;
* ``v2``: block / bar / pole (a box; half as tall; half as wide), 8 or 16 pixels on the long
  side, every edge on the 4-pixel token grid, so shape and size differ by whole tokens; the
  backgrounds carry a weak absolute position cue (red grows down the frame, blue to the right),
  which a model with relative position codes alone lacks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Latent frames (= pixel frames: the world's autoencoder has no temporal compression) per segment.
SEGMENT_FRAMES = 4

#: Entity colours (RGB in [0, 1]); place colours below stay far from these.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.85, 0.2, 0.85),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
    "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("square", "circle", "triangle")
#: Entity side length in pixels.
SIZES: dict[str, int] = {"small": 8, "big": 14}
NAMES = ("bo", "kip", "zed", "mia", "tok", "lux", "rin", "pim", "dax", "nel", "oru", "vix")


@dataclass(frozen=True)
class WorldEdition:
    """What an edition of the world draws: the entities' ``shapes``, their ``sizes`` (name ->
    pixels on the long side), whether their edges lie on the token grid (``grid_aligned``), and
    the backgrounds' absolute position cue (``position_cue``: how much red grows from the top row
    to the bottom one and blue from the left column to the right one, in ``[0, 1]`` units)."""

    name: str
    shapes: tuple[str, ...]
    sizes: tuple[tuple[str, int], ...]
    grid_aligned: bool
    position_cue: float

    @property
    def size_pixels(self) -> dict[str, int]:
        return dict(self.sizes)


EDITIONS: dict[str, WorldEdition] = {
    edition.name: edition
    for edition in (
        WorldEdition("v1", SHAPES, tuple(SIZES.items()), grid_aligned=False, position_cue=0.0),
        WorldEdition("v2", ("block", "bar", "pole"), (("small", 8), ("big", 16)),
                     grid_aligned=True, position_cue=0.16),
    )
}
#: The edition of the packaged models.
DEFAULT_EDITION = "v1"


def world_edition(name: str) -> WorldEdition:
    """The edition called ``name`` (``v1`` or ``v2``)."""
    if name not in EDITIONS:
        raise ValueError(f"edition must be one of {sorted(EDITIONS)}, got {name!r}")
    return EDITIONS[name]


@dataclass(frozen=True)
class Place:
    """A background: a base colour and a texture (``plain``, ``stripes``, ``checker``, ``dots``)
    drawn in a darker shade of it."""

    name: str
    colour: tuple[float, float, float]
    texture: str


PLACES: dict[str, Place] = {
    place.name: place
    for place in (
        Place("room", (0.2, 0.3, 0.7), "plain"),
        Place("field", (0.3, 0.65, 0.25), "stripes"),
        Place("desert", (0.8, 0.6, 0.35), "plain"),
        Place("cave", (0.45, 0.42, 0.4), "checker"),
        Place("garden", (0.55, 0.75, 0.5), "dots"),
    )
}


@dataclass(frozen=True)
class Entity:
    """A named entity and its looks."""

    name: str
    size: str
    colour: str
    shape: str

    @property
    def description(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


#: What an entity does in a segment: its horizontal centre (pixels) per frame of the segment,
#: ``None`` where it is off screen. Entities stand still in the centre while on screen, so that
#: what a frame shows follows from its prompt and the video's history alone (a model with
#: relative position codes cannot tell how far into a segment a frame is, which moving entities
#: would need).
ACTIONS: dict[str, tuple[int | None, ...]] = {
    "enters": (16,) * SEGMENT_FRAMES,
    "leaves": (None,) * SEGMENT_FRAMES,
    "walks": (16,) * SEGMENT_FRAMES,
}


@dataclass(frozen=True)
class Segment:
    """One prompt's segment: the place, the entity on screen (or none) and its action."""

    prompt: str
    place: Place
    entity: Entity | None
    action: str | None


@dataclass(frozen=True)
class Script:
    """A six-segment story of one world edition. ``returning`` is P (its description appears
    only in segment 2)."""

    segments: tuple[Segment, ...]
    returning: Entity
    first_appearance: int = 1
    return_segment: int = 5
    edition: str = DEFAULT_EDITION

    @property
    def prompts(self) -> list[str]:
        return [segment.prompt for segment in self.segments]

    @property
    def segment_starts(self) -> list[int]:
        return [index * SEGMENT_FRAMES for index in range(len(self.segments))]

    @property
    def num_frames(self) -> int:
        return len(self.segments) * SEGMENT_FRAMES


def random_entity(
    rng: random.Random, name: str, edition: WorldEdition = EDITIONS[DEFAULT_EDITION]
) -> Entity:
    size_names = [size for size, _ in edition.sizes]
    return Entity(name, rng.choice(size_names), rng.choice(list(COLOURS)),
                  rng.choice(edition.shapes))


def make_script(seed: int, edition: str = DEFAULT_EDITION) -> Script:
    """The script of ``seed`` in world ``edition`` (the same seed always gives the same script;
    the editions' scripts of one seed share places, names, colours and size names)."""
    world = world_edition(edition)
    rng = random.Random(seed)
    first_place, second_place = (PLACES[name] for name in rng.sample(sorted(PLACES), 2))
    first_name, second_name = rng.sample(NAMES, 2)
    p, q = random_entity(rng, first_name, world), random_entity(rng, second_name, world)
    a, b = first_place.name, second_place.name
    segments = (
        Segment(f"an empty {a}", first_place, None, None),
        Segment(f"{p.name} , {p.description} , enters the {a}", first_place, p, "enters"),
        Segment(f"{p.name} leaves the {a}", first_place, p, "leaves"),
        Segment(f"in a {b} , {q.name} , {q.description} , walks", second_place, q, "walks"),
        Segment(f"{q.name} leaves the {b}", second_place, q, "leaves"),
        Segment(f"back in the {a} , {p.name} comes back", first_place, p, "enters"),
    )
    return Script(segments, p, edition=edition)


def vocabulary() -> list[str]:
    """Every word the grammar writes, in a fixed order: the first edition's words first, later
    editions' new words appended (so a word keeps its id, and its embedding, across editions)."""
    words = [
        "an", "empty", "a", ",", "enters", "the", "leaves", "in", "walks", "back", "comes",
        *SIZES, *COLOURS, *SHAPES, *PLACES, *NAMES,
    ]
    for edition in EDITIONS.values():
        words += [size for size, _ in edition.sizes] + list(edition.shapes)
    return list(dict.fromkeys(words))
