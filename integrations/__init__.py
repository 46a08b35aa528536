"""Model-family integrations, installed as ``memflow_adapter.integrations``.

Adding a family is adding one module here with an ``Integration`` subclass: every module of this
package is imported and every concrete subclass found is registered.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

from .base import AttendFn, Integration
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


def supported_model_classes() -> list[str]:
    return [name for integration in INTEGRATIONS for name in integration.model_classes]


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
    "AttendFn",
    "Integration",
    "WanIntegration",
    "find_integration",
    "supported_model_classes",
]
