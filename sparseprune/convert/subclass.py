"""Which subclasses of a convertible layer type may be converted like their base.

A subclass that keeps its base's computation (adds attributes or methods, changes __init__) is
converted like the base. One that overrides the computation (e.g. a Conv2d that pads inside its
own forward, as TF-"same" EfficientNet ports do) would silently lose it in a sparse module that
runs the base computation, so convert() leaves it as it is unless the subclass itself is
registered (which declares its forward equivalent).
"""
from __future__ import annotations

from typing import Optional, Type

# The methods that define what a layer computes: nn.Conv2d.forward calls _conv_forward.
COMPUTE_METHODS = ("forward", "_conv_forward")


def overridden_method(cls: Type, base: Type) -> Optional[str]:
    """The first of COMPUTE_METHODS that `cls` defines differently from `base`, else None."""
    for name in COMPUTE_METHODS:
        if getattr(cls, name, None) is not getattr(base, name, None):
            return name
    return None
