"""Every row of the family matrix (tests/test_families.py): the Wan rows here, and the
``ROWS`` of every ``tests/family_<name>.py`` module. Adding a family to the library is adding its
integration module and such a module (building on tests/matrix.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

from matrix import Family, wan_chunk, wan_forward, wan_inputs, wan_masked_forward
from tiny_models import tiny_wan

WAN = Family(
    name="wan",
    build=tiny_wan,
    latent_size=(4, 4),
    tokens_per_frame=4,
    make_inputs=wan_inputs,
    chunk=wan_chunk,
    forward=wan_forward,
    masked_forward=wan_masked_forward,
)

WAN22 = Family(
    name="wan",
    build=lambda: tiny_wan(base="wan2.2-ti2v-5b"),
    latent_size=(4, 4),
    tokens_per_frame=4,
    make_inputs=lambda generator, frames: wan_inputs(generator, frames, channels=48),
    chunk=wan_chunk,
    forward=wan_forward,
    masked_forward=wan_masked_forward,
)


def _discover_rows() -> dict[str, Family]:
    """The Wan rows plus ``ROWS`` of every ``tests/family_<name>.py`` module."""
    rows = {"wan2.1": WAN, "wan2.2": WAN22}
    for path in sorted(Path(__file__).parent.glob("family_*.py")):
        rows.update(importlib.import_module(path.stem).ROWS)
    return rows


#: Every row of the matrix, by test id.
FAMILIES: dict[str, Family] = _discover_rows()
