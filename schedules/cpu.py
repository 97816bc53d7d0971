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

import dataclasses
from dataclasses import dataclass

from tvm.target.codegen import llvm_cpu_has_features

from ..contract import IS_SCHEDULED, Schedule, as_target, fresh_copy
from .kernel import is_nested_kernel, kernel
from .spec import spec_of


@dataclass(frozen=True)
class CPUKnobs:
    """The tunable knobs of the CPU schedule (see the module docstring)."""

    vector_lanes: int  # fp32 lanes of one SIMD register (informational; max_vector is what is used)
    max_vector: int  # widest vectorised dense loop (a few registers of accumulators)
    rows_per_task: int = 1
    unroll: int = 16
    # linear kernels: interleaved partial sums per row (LinearSpec.lanes); 0 = by batch size
    # (``linear_lanes``). A kernel structure, not a loop transformation: ``schedule_cpu`` applies
    # it before ``apply_knobs``, which only schedules whatever structure the kernel has.
    lanes: int = 0

    def __post_init__(self):
        for name in ("vector_lanes", "max_vector", "rows_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"CPUKnobs.{name} must be >= 1, got {getattr(self, name)}")
        if self.lanes < 0:
            raise ValueError(f"CPUKnobs.lanes must be >= 0, got {self.lanes}")
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


def target_family(target) -> str:
    """The key of ``CPU_KNOBS`` for an llvm target."""
    target = as_target(target)
    with target:
        for family, feature in _FAMILY_FEATURE:
            if llvm_cpu_has_features([feature], target):
                return family
    return "generic"


def default_knobs(target) -> CPUKnobs:
    return CPU_KNOBS[target_family(target)]


def vector_extent(extent: int, knobs: CPUKnobs) -> int:
    """The vectorised part of a dense loop: all of it when it fits ``max_vector``, else its largest
    divisor <= max_vector, preferring whole registers (multiples of ``vector_lanes``)."""
    if extent <= knobs.max_vector:
        return extent
    divisors = [d for d in range(1, knobs.max_vector + 1) if extent % d == 0]
    whole = [d for d in divisors if d % knobs.vector_lanes == 0]
    return max(whole or divisors)


def linear_lanes(batch: int, knobs: CPUKnobs) -> int:
    """Partial sums per row of a linear kernel: ``knobs.lanes``, or by batch when it is 0.

    Batch 1 (GEMV): one vector of lanes (the interleaved entries are the vector dimension);
    small batches (one or two vectors wide): 4 independent vector accumulators; wider: 1.
    """
    if knobs.lanes:
        return knobs.lanes
    if batch == 1:
        return knobs.vector_lanes
    if batch < 2 * knobs.vector_lanes:
        return 4
    return 1


def _vectorize_dense(sch: Schedule, block, knobs: CPUKnobs, depth: int = 1) -> None:
    """Vectorise the ``depth``-th innermost (dense) loop of ``block`` in a divisor-sized inner part."""
    loop = sch.get_loops(block)[-depth]
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


def _tail(sch: Schedule):
    try:
        return sch.get_sblock("tail")
    except Exception:
        return None


def _has_block(sch: Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:
        return None


def _parallel_outer(sch: Schedule, block, keep: int = 1) -> None:
    """Fuse all but the ``keep`` innermost loops of ``block`` and run them in parallel."""
    loops = sch.get_loops(block)
    outer = loops[:-keep] if keep else loops
    if not outer:
        return
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)


def _parallel_rows(sch: Schedule, row, knobs: CPUKnobs) -> None:
    """Output rows: fused, split by ``rows_per_task``, parallel, auto-unrolled."""
    loops = sch.get_loops(row)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if knobs.rows_per_task > 1:
        fused, _ = sch.split(fused, [None, knobs.rows_per_task])
    sch.parallel(fused)
    if knobs.unroll:
        sch.annotate(fused, "pragma_auto_unroll_max_step", knobs.unroll)
        sch.annotate(fused, "pragma_unroll_explicit", 1)


def _apply_flat(sch: Schedule, knobs: CPUKnobs) -> None:
    """The flat conv layout (``kernels.nested_conv2d_flat``): staging parallel over planes; rows
    parallel; the tile of positions vectorised inside the data-dependent loop; the dense path (if
    compiled in) parallel over its channel blocks with a vectorised, register-blocked tile."""
    _parallel_outer(sch, sch.get_sblock("stage"))
    _parallel_rows(sch, sch.get_sblock("row"), knobs)
    update = sch.get_sblock("update")
    sch.set_scope(update, 0, "global")
    j_loop = sch.get_loops(update)[-2]
    _vectorize_dense(sch, update, knobs)
    sch.decompose_reduction(update, j_loop)
    if _has_block(sch, "dense_row") is not None:
        zero = sch.get_sblock("dense_zero")
        _parallel_outer(sch, zero)
        _vectorize_dense(sch, zero, knobs)
        # "dense_scatter" stays serial: nnz stores (an opaque block: no parallel loop over it)
        drow = sch.get_sblock("dense_row")
        loops = sch.get_loops(drow)
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        dupd = sch.get_sblock("dense_update")
        sch.set_scope(dupd, 0, "global")
        dl = sch.get_loops(dupd)
        ci = dl[-5]
        sch.vectorize(dl[-1])
        sch.unroll(dl[-2])
        sch.decompose_reduction(dupd, ci)


def apply_knobs(sch: Schedule, knobs: CPUKnobs) -> None:
    """Schedule a nested kernel in place with ``knobs`` (the body of a ScheduleFn space too)."""
    if getattr(spec_of(sch.mod["main"]), "layout", None) == "flat":
        _apply_flat(sch, knobs)
        return
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    # staging copy of the input: parallel over its outer loops
    for name in ("x_t", "pad"):
        if name in blocks:
            loops = sch.get_loops(blocks[name])
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(outer)
    # rows: fuse, split by rows_per_task, parallel, auto-unroll
    _parallel_rows(sch, blocks["row"], knobs)
    # dense dimension, vectorised inside the data-dependent loop (never around it)
    reductions = [sch.get_sblock("update")] + ([blocks_tail] if (blocks_tail := _tail(sch)) else [])
    j_loops = []
    for red in reductions:
        # the accumulator: a "global"-scope block allocation of constant size becomes a stack
        # alloca (registers after LLVM's SROA); "local" scope is a TVMBackendAllocWorkspace per row
        sch.set_scope(red, 0, "global")
        j_loops.append(sch.get_loops(red)[-1 - _dense_depth(sch, red)])
    update = reductions[0]
    loops = sch.get_loops(update)
    if _dense_depth(sch, update) == 2 and int(sch.get(loops[-1]).extent) == 1 and blocks_tail:
        _vectorize_dense(sch, update, knobs, depth=2)  # GEMV with lanes: the lanes are the vector
    else:
        _vectorize_dense(sch, update, knobs)
    for block in [*reductions[1:], sch.get_sblock("store")]:
        _vectorize_dense(sch, block, knobs)
    # then the accumulators' inits leave the data-dependent loops (their loops keep their kinds)
    for red, j_loop in zip(reductions, j_loops):
        sch.decompose_reduction(red, j_loop)


def specialize_cpu(func, target, knobs: CPUKnobs | None = None):
    """The CPU structure of a nested kernel (same params): a linear kernel gets its partial sums
    (``linear_lanes``, when it has none yet), a conv kernel in the rows layout the flat layout
    (``conv2d_flat.py``: full-width contiguous vectors, strides by phase planes).
    A kernel already specialised, or any other function, is returned as it is. ``build`` and
    ``tune`` call this BEFORE tuning and applying a log, so a log records the kernel that runs."""
    if not is_nested_kernel(func):
        return func
    target = as_target(target)
    knobs = knobs or default_knobs(target)
    spec = spec_of(func)
    if spec.op == "linear" and spec.lanes == 1:
        lanes = linear_lanes(spec.batch, knobs)
        if lanes > 1:
            return kernel(dataclasses.replace(spec, lanes=lanes))  # a new function: the input stays intact
    if spec.op == "conv2d" and spec.layout == "rows":
        return kernel(dataclasses.replace(spec, layout="flat"))
    return func


def schedule_cpu(func, target, knobs: CPUKnobs | None = None):
    """Schedule a nested kernel for an llvm (CPU) target; None when the rule does not apply."""
    target = as_target(target)
    if target.kind.name != "llvm" or not is_nested_kernel(func):
        return None
    knobs = knobs or default_knobs(target)
    func = specialize_cpu(func, target, knobs)
    sch = Schedule(fresh_copy(func))
    apply_knobs(sch, knobs)
    return sch.mod["main"].with_attr(IS_SCHEDULED, True)


__all__ = [
    "CPU_KNOBS",
    "CPUKnobs",
    "apply_knobs",
    "default_knobs",
    "is_nested_kernel",
    "linear_lanes",
    "schedule_cpu",
    "specialize_cpu",
    "target_family",
]
