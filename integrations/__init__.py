"""Model-family integrations, installed as ``memflow_adapter.integrations``.

Adding a family is adding one module with an ``Integration`` subclass and listing it here.
"""

from __future__ import annotations

from torch import nn

from .base import AttendFn, Integration
from .wan import WanIntegration

#: Every supported family, tried in order.
INTEGRATIONS: tuple[type[Integration], ...] = (WanIntegration,)


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
