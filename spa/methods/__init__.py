"""Adapter methods: one module each (config dataclass, layer, fuse rule).

``METHODS`` maps a method name to ``(config class, layer class)``; a new method is one module
plus one line here.
"""

from __future__ import annotations

from metaprune.errors import UnknownNameError
from spa.methods.base import AdaptedLayer, FullLayer, MethodConfig
from spa.methods.full import FullConfig
from spa.methods.hydra import HydraConfig, HydraLayer
from spa.methods.lora import LoRAConfig, LoRALayer
from spa.methods.splora import SPLoRAConfig, SPLoRALayer
from spa.methods.sppara import SPPaRAConfig, SPPaRALayer

METHODS: dict[str, tuple[type[MethodConfig], type[AdaptedLayer]]] = {
    "splora": (SPLoRAConfig, SPLoRALayer),
    "sppara": (SPPaRAConfig, SPPaRALayer),
    "hydra": (HydraConfig, HydraLayer),
    "lora": (LoRAConfig, LoRALayer),
    "full": (FullConfig, FullLayer),
}


def get_method(name: str) -> tuple[type[MethodConfig], type[AdaptedLayer]]:
    """``(config class, layer class)`` of a method; unknown names list the valid ones."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown adapter method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "AdaptedLayer", "FullLayer", "MethodConfig", "get_method",
           "SPLoRAConfig", "SPLoRALayer", "SPPaRAConfig", "SPPaRALayer", "HydraConfig", "HydraLayer",
           "LoRAConfig", "LoRALayer", "FullConfig"]
