"""Optional dependencies, imported where they are used, with an error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or an ``ImportError`` that says which extra installs it.

    Args:
        module: the module to import (e.g. ``"matplotlib.figure"``).
        extra: the memflow-adapter extra that provides it (e.g. ``"video"``).
        purpose: what needs it, for the message (e.g. ``"drawing the memory timeline"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'memflow-adapter[{extra}]'"
        ) from error
