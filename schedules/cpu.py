"""CPU schedule rule for the nested kernels (x86 AVX-512 / AVX2 / SSE, ARM NEON).

``schedule_cpu(func, target)`` schedules a kernel made by ``schedules/kernels.py`` (found by its
``nested.*`` attrs) and returns None for anything else. The schedule is a function of three knobs
(``CPUKnobs``), which a MetaSchedule ``ScheduleFn`` design space samples:

* ``rows_per_task``: output rows per parallel task. The fused row loop is split by it and the outer
  part runs in parallel (1: parallel over every row).
* ``max_vector``: the widest vector of the dense dimension. The innermost dense loop (batch for
  linear, output columns for conv) is split so its inner part, a divisor of the extent that is at
  most ``max_vector``, is vectorised INSIDE the data-dependent loop over a row's non-zeros.
* ``unroll``: ``pragma_auto_unroll_max_step`` on the parallel loop (constant loops inside a row).

Per-target defaults come from one table keyed by target family; the family comes from the LLVM
features of the target's CPU (``avx512f``, ``avx2``, ``neon``...), so a tag, an ``mcpu`` or an
``mattr`` all work.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.s_tir import Schedule
from tvm.target.codegen import llvm_cpu_has_features

from .kernels import ATTR_KERNEL, ATTR_OP, KERNEL_VERSION


@dataclass(frozen=True)
class CPUKnobs:
    """The tunable knobs of the CPU schedule (see the module docstring)."""

    vector_lanes: int  # fp32 lanes of one SIMD register (informational; max_vector is what is used)
    max_vector: int  # widest vectorised dense loop (a few registers of accumulators)
    rows_per_task: int = 1
    unroll: int = 16

    def __post_init__(self):
        for name in ("vector_lanes", "max_vector", "rows_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"CPUKnobs.{name} must be >= 1, got {getattr(self, name)}")
        if self.unroll < 0:
            raise ValueError(f"CPUKnobs.unroll must be >= 0, got {self.unroll}")


# Target family -> default knobs. max_vector = 4 registers of fp32 accumulators.
CPU_KNOBS: dict[str, CPUKnobs] = {
    "x86-avx512": CPUKnobs(vector_lanes=16, max_vector=64),
    "x86-avx2": CPUKnobs(vector_lanes=8, max_vector=32),
    "arm-neon": CPUKnobs(vector_lanes=4, max_vector=16),
    "generic": CPUKnobs(vector_lanes=4, max_vector=16),
}

# The first family whose LLVM CPU feature the target has (order matters: widest first).
_FAMILY_FEATURE: tuple[tuple[str, str], ...] = (
    ("x86-avx512", "avx512f"),
    ("x86-avx2", "avx2"),
    ("arm-neon", "neon"),
)


def _as_target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def target_family(target) -> str:
    """The key of ``CPU_KNOBS`` for an llvm target."""
    target = _as_target(target)
    with target:
        for family, feature in _FAMILY_FEATURE:
            if llvm_cpu_has_features([feature], target):
                return family
    return "generic"


def default_knobs(target) -> CPUKnobs:
    return CPU_KNOBS[target_family(target)]


def is_nested_kernel(func) -> bool:
    attrs = getattr(func, "attrs", None)
    return (isinstance(func, tvm.tirx.PrimFunc) and attrs is not None and ATTR_OP in attrs
            and str(attrs.get(ATTR_KERNEL, "")).endswith(f"/v{KERNEL_VERSION}"))


def vector_extent(extent: int, knobs: CPUKnobs) -> int:
    """The vectorised part of a dense loop: all of it when it fits ``max_vector``, else its largest
    divisor <= max_vector, preferring whole registers (multiples of ``vector_lanes``)."""
    if extent <= knobs.max_vector:
        return extent
    divisors = [d for d in range(1, knobs.max_vector + 1) if extent % d == 0]
    whole = [d for d in divisors if d % knobs.vector_lanes == 0]
    return max(whole or divisors)


def _vectorize_dense(sch: Schedule, block, knobs: CPUKnobs) -> None:
    """Vectorise the innermost (dense) loop of ``block`` in a divisor-sized inner part."""
    loop = sch.get_loops(block)[-1]
    extent = int(sch.get(loop).extent)
    if extent == 1:
        return
    vec = vector_extent(extent, knobs)
    if vec < extent:
        _, loop = sch.split(loop, [None, vec])
    if vec > 1:
        sch.vectorize(loop)


def _dense_depth(sch: Schedule, update) -> int:
    """Loops of the dense dimension(s) between the data-dependent loop and the update block."""
    return len(sch.get(update).iter_vars) - 1


def apply_knobs(sch: Schedule, knobs: CPUKnobs) -> None:
    """Schedule a nested kernel in place with ``knobs`` (the body of a ScheduleFn space too)."""
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    # staging copy of the input: parallel over its outer loops
    for name in ("x_t", "pad"):
        if name in blocks:
            loops = sch.get_loops(blocks[name])
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(outer)
    # rows: fuse, split by rows_per_task, parallel, auto-unroll
    row = blocks["row"]
    loops = sch.get_loops(row)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if knobs.rows_per_task > 1:
        fused, _ = sch.split(fused, [None, knobs.rows_per_task])
    sch.parallel(fused)
    if knobs.unroll:
        sch.annotate(fused, "pragma_auto_unroll_max_step", knobs.unroll)
        sch.annotate(fused, "pragma_unroll_explicit", 1)
    # dense dimension, vectorised inside the data-dependent loop (never around it)
    update = sch.get_sblock("update")
    # the accumulator: a "global"-scope block allocation of constant size becomes a stack alloca
    # (registers after LLVM's SROA); "local" scope is served by TVMBackendAllocWorkspace per row
    sch.set_scope(update, 0, "global")
    j_loop = sch.get_loops(update)[-1 - _dense_depth(sch, update)]
    for block in (update, sch.get_sblock("store")):
        _vectorize_dense(sch, block, knobs)
    # then the accumulator's init leaves the data-dependent loop (its loops keep their kinds)
    sch.decompose_reduction(update, j_loop)


def _fresh_copy(func):
    """A deep copy: ``Schedule`` rewrites the statements of the function it is given in place, and
    a schedule rule must leave its input intact (callers keep and reuse unscheduled kernels)."""
    return tvm.ir.load_json(tvm.ir.save_json(func))


def schedule_cpu(func, target, knobs: CPUKnobs | None = None):
    """Schedule a nested kernel for an llvm (CPU) target; None when the rule does not apply."""
    target = _as_target(target)
    if target.kind.name != "llvm" or not is_nested_kernel(func):
        return None
    knobs = knobs or default_knobs(target)
    sch = Schedule(_fresh_copy(func))
    apply_knobs(sch, knobs)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


__all__ = ["CPUKnobs", "CPU_KNOBS", "target_family", "default_knobs", "is_nested_kernel",
           "apply_knobs", "schedule_cpu"]
