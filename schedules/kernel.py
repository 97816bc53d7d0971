"""``kernel(spec)``: the nested kernel a spec describes, whatever its op (one file per op beside)."""

from __future__ import annotations

from ..contract import PrimFunc
from .conv2d import conv2d
from .linear import linear
from .spec import spec_of

FACTORIES = {"linear": linear, "conv2d": conv2d}


def kernel(spec) -> PrimFunc:
    """The unscheduled nested kernel of ``spec`` (a ``LinearSpec`` or ``Conv2dSpec``)."""
    return FACTORIES[spec.op](spec)


def is_nested_kernel(func) -> bool:
    """A PrimFunc made by ``kernel`` (it carries its spec)."""
    return isinstance(func, PrimFunc) and spec_of(func) is not None


__all__ = ["FACTORIES", "is_nested_kernel", "kernel"]
