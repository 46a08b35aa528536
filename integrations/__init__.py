"""Model-family integrations, installed as ``integrations``.

Adding a family is adding one module here with an ``Integration`` subclass: every module of this
package is imported and every concrete subclass found is registered.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import AttendFn, Integration, VideoDefaults
from .checkpoints import CheckpointConversion
from .wan import WanIntegration


def _discover() -> tuple[type[Integration], ...]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found = {cls for cls in _subclasses(Integration) if not inspect.isabstract(cls)}
    return tuple(sorted(found, key=lambda cls: cls.name))


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


#: Every supported family, by name.
INTEGRATIONS: tuple[type[Integration], ...] = _discover()
#: The family of the model MemFlow was published on (Wan2.1-T2V-1.3B): where no model is at
#: hand, its declarations are the defaults (the benchmark protocol's video, the published
#: checkpoints' layout and base).
REFERENCE_FAMILY = WanIntegration.name


def supported_model_classes() -> list[str]:
    return [name for integration in INTEGRATIONS for name in integration.model_classes]


def integration_named(name: str) -> type[Integration]:
    """The family called ``name`` (``Integration.name``, as adapters record it)."""
    for integration in INTEGRATIONS:
        if integration.name == name:
            return integration
    raise ValueError(
        f"no model family is called {name!r}; families: "
        f"{', '.join(integration.name for integration in INTEGRATIONS)}"
    )


def reference_integration() -> type[Integration]:
    """The ``REFERENCE_FAMILY``."""
    return integration_named(REFERENCE_FAMILY)


def integration_for_config(config: Mapping[str, Any]) -> type[Integration]:
    """The family of a diffusers transformer config: the one handling its ``_class_name``, or
    the reference family for a config that names no class (``CheckpointConversion.base_config``).
    """
    class_name = config.get("_class_name")
    if class_name is None:
        return reference_integration()
    for integration in INTEGRATIONS:
        if class_name in integration.model_classes:
            return integration
    raise ValueError(
        f"the config's _class_name {class_name!r} is no supported model class; supported: "
        f"{', '.join(supported_model_classes())}"
    )


def find_integration(model: nn.Module) -> Integration:
    """The integration of ``model``'s family, bound to it."""
    for integration in INTEGRATIONS:
        if integration.supports(model):
            return integration(model)
    raise TypeError(
        f"memflow-adapter cannot stream a {type(model).__name__}; supported models: "
        f"{', '.join(supported_model_classes())}"
    )


__all__ = [
    "INTEGRATIONS",
    "REFERENCE_FAMILY",
    "AttendFn",
    "CheckpointConversion",
    "Integration",
    "VideoDefaults",
    "WanIntegration",
    "find_integration",
    "integration_for_config",
    "integration_named",
    "reference_integration",
    "supported_model_classes",
]
