"""The CPU rule for nested kernels (x86 AVX-512 / AVX2, ARM NEON): the target's kernel form.

On CPUs a nested kernel is not a fixed loop nest to be rescheduled: its structure (position tile,
input-channel blocks, staged row alignment, shifted copies, partial sums, prefetch) decides how the
weights are packed (each non-zero's input offset, the sub-rows), so the CPU "schedule" is a choice
of knobs made before packing (``cpu_conv2d.py``, ``cpu_linear.py``); the kernel then needs no
schedule. ``specialize`` turns a lowered kernel's spec and packed weights into the CPU form with
knobs (the defaults of the target's family, or a tuning log's choice); ``knob_space`` is what the
tuner measures.

The vector width comes from the target's LLVM CPU features (``avx512f``, ``avx2``, ``neon``), so a
tag, an ``mcpu`` or an ``mattr`` all work; the thread count the kernels plan for is the target's
``num-cores``.
"""

from __future__ import annotations

import dataclasses

from tvm.target.codegen import llvm_cpu_has_features

from ..contract import as_target
from . import cpu_conv2d, cpu_linear
from .format import NestedCSR
from .kernel import kernel
from .spec import Packed, spec_of

# Target family -> fp32 lanes of one vector register; the first family whose LLVM feature the
# target has wins (widest first).
VECTOR_LANES: dict[str, int] = {"x86-avx512": 16, "x86-avx2": 8, "arm-neon": 4, "generic": 4}
_FAMILY_FEATURE: tuple[tuple[str, str], ...] = (("x86-avx512", "avx512f"), ("x86-avx2", "avx2"), ("arm-neon", "neon"))
_OPS = {"conv2d": cpu_conv2d, "linear": cpu_linear}


def target_family(target) -> str:
    """The key of ``VECTOR_LANES`` for an llvm target."""
    target = as_target(target)
    with target:
        for family, feature in _FAMILY_FEATURE:
            if llvm_cpu_has_features([feature], target):
                return family
    return "generic"


def _vl_threads(target) -> tuple[int, int]:
    target = as_target(target)
    return VECTOR_LANES[target_family(target)], int(target.attrs.get("num-cores", 1) or 1)


def default_knobs(spec, target):
    """The knobs an untuned build uses for ``spec`` (a rows-layout spec) on ``target``."""
    return _OPS[spec.op].default_knobs(spec, *_vl_threads(target))


def knob_space(spec, target) -> list:
    """The knob candidates the tuner measures for ``spec`` on ``target`` (defaults first)."""
    return _OPS[spec.op].knob_space(spec, *_vl_threads(target))


def specialize(spec, fmt: NestedCSR, knobs):
    """The CPU form of a lowered kernel: ``(spec, packed weights)`` for ``knobs``. A conv repacks
    its non-zeros by input offset (``cpu_conv2d.repack``); a linear keeps its operands."""
    if spec.layout != "rows":
        raise ValueError(f"specialize takes a lowered (rows layout) kernel, got layout {spec.layout!r}")
    if spec.op == "conv2d":
        return cpu_conv2d.repack(fmt, spec, knobs)
    return dataclasses.replace(spec, layout="cpu", knobs=knobs, packed=Packed.of(fmt)), fmt


def schedule_cpu(func, target):
    """A nested kernel in its CPU form needs no schedule: returned as it is; None for anything else
    (a rows-layout kernel on a CPU is specialised by the pipeline's kernels phase first)."""
    spec = spec_of(func)
    if as_target(target).kind.name != "llvm" or spec is None or spec.layout != "cpu":
        return None
    return func


def cpu_kernel(spec, fmt: NestedCSR, knobs):
    """The compiled-ready CPU kernel and its operands for ``knobs`` (what the tuner measures)."""
    cpu_spec, packed = specialize(spec, fmt, knobs)
    return kernel(cpu_spec), packed


__all__ = ["VECTOR_LANES", "cpu_kernel", "default_knobs", "knob_space", "schedule_cpu", "specialize", "target_family"]
