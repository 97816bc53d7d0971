"""CUDA schedule rule for the nested kernels (NVIDIA GPUs), same one-module design as the CPU rule.

``schedule_cuda(func, target)`` schedules a kernel made by ``schedules/kernel.py`` (the "rows" form,
found by its ``nested.*`` attrs; the compute definition is not changed) and returns None for
anything else. The level stays a run-time input: every thread reads ``level_len[level, row]``
inside the kernel, so one launch configuration serves every level and a sparser level only runs
shorter loops.

Linear (``"row"`` = one output feature ``m``): **a warp per output row.**
  The row loop is split into ``blockIdx.x`` x ``threadIdx.y`` (``rows_per_block`` rows per block);
  the data-dependent loop over the row's non-zeros is split by ``lanes`` and its inner part bound
  to ``threadIdx.x``, so consecutive lanes read consecutive ``values`` / ``col`` entries (coalesced)
  and TVM's cross-thread reduction sums the lanes with warp shuffles. The batch loop is moved out
  of the non-zero loop (one reduction per (row, batch) pair). The dense operand ``x`` is read at
  scattered columns, so it is staged once per block in shared memory (``"x_t"`` becomes a shared
  transpose; for batch 1 a cache_read of ``x``) when ``batch * cols * 4`` bytes fit the budget.

Conv2d (``"row"`` = one output channel ``o`` x a tile of output rows ``t``): **a block of output
channels per tile, a thread per output position.** The row loops are ordered ``(n, t, o)`` and
split into ``blockIdx.x`` x ``threadIdx.y`` with ``channels_per_block`` a divisor of O, so the
channels of one block share one tile of input; the dense positions of the tile (``TR x OW``) move
out of the data-dependent loop and bind to ``threadIdx.x``: every thread of a channel reads the
same ``values[j]`` / ``col[j]`` (a broadcast) and neighbouring output columns read neighbouring
input columns. The zero-padded input window of the block (``"pad"``, or a cache_read of ``x``) is
staged in shared memory by the whole block (a cooperative, coalesced copy) when it fits.

The schedule is a function of explicit knobs (``CUDAKnobs``); defaults come from one table keyed by
the GPU generation of the target's ``arch``, and ``cuda_space(target)`` is a MetaSchedule
``ScheduleFn`` space that samples the same knobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..contract import ATTR_OP, IS_SCHEDULED, Schedule, as_target, fresh_copy
from .conv2d import tile_rows
from .kernel import is_nested_kernel

# CUDA's limit for statically sized shared memory per block (larger needs dynamic shared memory).
_STATIC_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class CUDAKnobs:
    """The tunable knobs of the CUDA schedule (see the module docstring)."""

    lanes: int = 32  # linear: threads that share one row's non-zeros (a warp)
    rows_per_block: int = 4  # linear: rows (warps) per thread block
    threads_per_block: int = 256  # conv: target block size (channels_per_block * tile positions)
    stage_shared: bool = True  # stage the dense operand in shared memory when it fits
    shared_fraction: float = 0.5  # of the target's shared memory per block a kernel may take

    def __post_init__(self):
        for name in ("lanes", "rows_per_block", "threads_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CUDAKnobs.{name} must be an int >= 1, got {value!r}")
        if self.lanes & (self.lanes - 1) or self.lanes > 32:
            raise ValueError(f"CUDAKnobs.lanes must be a power of two <= 32 (a warp), got {self.lanes}")
        if not 0.0 < self.shared_fraction <= 1.0:
            raise ValueError(f"CUDAKnobs.shared_fraction must be in (0, 1], got {self.shared_fraction}")


# GPU generation (from the target's arch) -> default knobs. Older parts have fewer registers and
# less shared memory per SM: smaller blocks and half the shared budget keep several blocks resident.
CUDA_KNOBS: dict[str, CUDAKnobs] = {
    "sm_90": CUDAKnobs(rows_per_block=8, threads_per_block=256, shared_fraction=1.0),  # Hopper
    "sm_80": CUDAKnobs(rows_per_block=4, threads_per_block=256, shared_fraction=1.0),  # Ampere, Ada
    "sm_70": CUDAKnobs(rows_per_block=4, threads_per_block=256),  # Volta, Turing (sm_75)
    "generic": CUDAKnobs(rows_per_block=2, threads_per_block=128),
}


def target_family(target) -> str:
    """The key of ``CUDA_KNOBS`` for a cuda target: the generation of its ``arch`` (``sm_XY``)."""
    target = as_target(target)
    match = re.fullmatch(r"sm_(\d+)[a-z]?", str(target.attrs.get("arch", "")))
    if not match:
        return "generic"
    major = int(match.group(1)) // 10
    for family in ("sm_90", "sm_80", "sm_70"):
        if major >= int(family[3:]) // 10:
            return family
    return "generic"


def default_knobs(target) -> CUDAKnobs:
    return CUDA_KNOBS[target_family(target)]


def target_limits(target) -> tuple[int, int, int]:
    """(max threads per block, shared memory bytes per block for static allocations, warp size)."""
    target = as_target(target)
    attrs = target.attrs
    threads = int(attrs.get("max_threads_per_block", attrs.get("max_num_threads", 1024)))
    shared = min(int(attrs.get("max_shared_memory_per_block", _STATIC_SHARED_LIMIT)), _STATIC_SHARED_LIMIT)
    warp = int(attrs.get("thread_warp_size", 32))
    return threads, shared, warp


# ------------------------------------------------------------------------------- launch shapes
def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _shape(func, name: str) -> tuple[int, ...]:
    for p in func.params:
        if p.name == name:
            return tuple(int(s) for s in p.ty.shape)
    raise ValueError(f"nested kernel {func.attrs.get('global_symbol', '?')} has no param {name!r}")


@dataclass(frozen=True)
class LaunchShape:
    """Threads of one block of a nested kernel: ``threadIdx.x`` x ``threadIdx.y``."""

    op: str
    threads_x: int  # lanes (linear) or tile positions TR*OW (conv)
    threads_y: int  # rows (linear) or output channels (conv) per block

    @property
    def threads(self) -> int:
        return self.threads_x * self.threads_y


def launch_shape(func, target, knobs: CUDAKnobs | None = None) -> LaunchShape:
    """The block shape the schedule gives ``func`` on ``target`` under ``knobs``."""
    target = as_target(target)
    knobs = knobs or default_knobs(target)
    max_threads, _, _ = target_limits(target)
    op = str(func.attrs[ATTR_OP])
    if op == "linear":
        rows = _shape(func, "out")[1]
        tx = min(knobs.lanes, max_threads)
        return LaunchShape(op, tx, max(1, min(knobs.rows_per_block, rows, max_threads // tx)))
    if op == "conv2d":
        _, o, _, ow = _shape(func, "out")
        tx = tile_rows(_shape(func, "out")[2], ow) * ow
        if tx > max_threads:
            raise ValueError(f"conv tile of {tx} output positions exceeds the target's {max_threads} threads per block")
        ty = _largest_divisor(o, max(1, min(knobs.threads_per_block, max_threads) // tx))
        return LaunchShape(op, tx, ty)
    raise ValueError(f"no CUDA schedule for nested op {op!r}")


# ------------------------------------------------------------------------------- the schedule
def _bind_cooperative(sch: Schedule, block, ty, tx) -> None:
    """A staging copy done by the whole block: its loops fused, split over (threadIdx.y, x)."""
    loops = sch.get_loops(block)[1:]  # below blockIdx.x
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ly, lx = sch.split(fused, [None, ty, tx])
    sch.bind(ly, "threadIdx.y")
    sch.bind(lx, "threadIdx.x")


def _staged_elements(sch: Schedule, block) -> int:
    """Elements a staging block copies per thread block (its loops below blockIdx.x), before the
    cooperative split."""
    n = 1
    for loop in sch.get_loops(block)[1:]:
        n *= int(sch.get(loop).extent)
    return n


def _stage(sch: Schedule, bx, stage: bool, staging_block: str):
    """Shared-memory staging of the dense operand at ``bx``; the staging block, or None.

    ``staging_block`` is the kernel's own staging copy (``"x_t"``: the linear transpose, ``"pad"``:
    the zero-padded conv input), which becomes a shared buffer; a kernel without one gets a
    cache_read of ``x``. Without staging, the kernel's copy is inlined into its reader.
    """
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if staging_block in blocks:
        if not stage:
            sch.compute_inline(blocks[staging_block])
            return None
        block = blocks[staging_block]
        sch.set_scope(block, 0, "shared")
    elif stage:
        block = sch.cache_read(blocks["row"], "x", "shared")
    else:
        return None
    sch.compute_at(block, bx)
    return block


def apply_knobs(sch: Schedule, shape: LaunchShape, stage: bool, ty_rv=None, tx_rv=None):
    """Schedule a nested kernel in place for the block ``shape`` (the body of a ScheduleFn too).

    ``ty_rv`` / ``tx_rv``: sampled factors (MetaSchedule ExprRVs) standing for ``shape``'s
    ``threads_y`` / linear ``threads_x``, so a traced schedule replays with mutated decisions.
    Returns the shared-memory staging block, or None when nothing is staged.
    """
    ty = ty_rv if ty_rv is not None else shape.threads_y
    row = sch.get_sblock("row")
    update = sch.get_sblock("update")
    store = sch.get_sblock("store")
    if shape.op == "linear":
        tx = tx_rv if tx_rv is not None else shape.threads_x
        (m,) = sch.get_loops(row)
        bx, ly = sch.split(m, [None, ty])
        sch.bind(bx, "blockIdx.x")
        sch.bind(ly, "threadIdx.y")
        j, b = sch.get_loops(update)[-2:]
        sch.reorder(b, j)  # one cross-thread reduction per (row, batch)
        outer, lanes = sch.split(j, [None, tx])
        sch.reorder(lanes, outer)
        sch.bind(lanes, "threadIdx.x")  # lowered to a warp-shuffle reduction by TVM
        staged = _stage(sch, bx, stage, "x_t")
    else:
        tx = shape.threads_x
        n, o, t = sch.get_loops(row)
        sch.reorder(n, t, o)  # channels of one block share the tile's input window
        bx, ly = sch.split(sch.fuse(n, t, o), [None, ty])
        sch.bind(bx, "blockIdx.x")
        sch.bind(ly, "threadIdx.y")
        j, r, ow = sch.get_loops(update)[-3:]
        sch.reorder(r, ow, j)  # positions of the tile out of the data-dependent loop
        sch.bind(sch.fuse(r, ow), "threadIdx.x")
        sch.bind(sch.fuse(*sch.get_loops(store)[-2:]), "threadIdx.x")
        # the accumulator's init leaves the data-dependent loop
        sch.decompose_reduction(update, sch.get_loops(update)[-1])
        staged = _stage(sch, bx, stage, "pad")
    if staged is not None:
        _bind_cooperative(sch, staged, ty, tx)
    return staged


def schedule_with(func, target, knobs: CUDAKnobs):
    """``func`` scheduled for ``target`` with explicit ``knobs`` (a deep copy; ``func`` is kept)."""
    target = as_target(target)
    shape = launch_shape(func, target, knobs)
    _, max_shared, _ = target_limits(target)
    budget = int(max_shared * knobs.shared_fraction)
    stage = knobs.stage_shared
    sch = Schedule(fresh_copy(func))
    staged = apply_knobs(sch, shape, stage)
    if staged is not None and 4 * _staged_elements(sch, staged) > budget:
        # the block's window does not fit the budget: read the dense operand from global memory
        sch = Schedule(fresh_copy(func))
        apply_knobs(sch, shape, False)
    return sch.mod["main"].with_attr(IS_SCHEDULED, True)


def schedule_cuda(func, target, knobs: CUDAKnobs | None = None):
    """Schedule a nested kernel for a cuda target; None when the rule does not apply."""
    target = as_target(target)
    if target.kind.name != "cuda" or not is_nested_kernel(func):
        return None
    return schedule_with(func, target, knobs or default_knobs(target))


# ------------------------------------------------------------------------ MetaSchedule space
def _candidates(func, target, knobs: CUDAKnobs) -> tuple[list[int], list[int]]:
    """(threadIdx.y choices, threadIdx.x choices) the space samples for ``func``."""
    max_threads, _, warp = target_limits(target)
    shape = launch_shape(func, target, knobs)
    if shape.op == "linear":
        rows = _shape(func, "out")[1]
        xs = [lanes for lanes in (8, 16, 32) if lanes <= warp]
        ys = [y for y in (1, 2, 4, 8, 16) if y <= rows and y * max(xs) <= max_threads]
        return ys or [1], xs
    o = _shape(func, "out")[1]
    ys = [d for d in range(1, o + 1) if o % d == 0 and d * shape.threads_x <= min(max_threads, 1024)][-6:]
    return ys, [shape.threads_x]


def _space_fn(target, knobs: CUDAKnobs | None = None):
    """The body of ``cuda_space``: schedule one nested kernel with sampled block shapes."""
    target = as_target(target)
    knobs = knobs or default_knobs(target)

    def fn(sch: Schedule) -> Schedule:
        func = sch.mod["main"]
        if not is_nested_kernel(func):
            raise ValueError("cuda_space schedules nested kernels only (tvm_nested.schedules.kernel)")
        ys, xs = _candidates(func, target, knobs)
        # staging is decided once per workload (not sampled): it is kept only when the widest
        # sampled block's window fits, so every sample stays within the shared-memory budget
        # (linear: the window is all of x whatever the shape; conv: it grows with the channels)
        widest = replace(knobs, threads_per_block=max(ys) * max(xs))
        stage = knobs.stage_shared and _stages(func, target, widest)
        ty = sch.sample_categorical(ys, [1.0 / len(ys)] * len(ys))
        tx = sch.sample_categorical(xs, [1.0 / len(xs)] * len(xs)) if len(xs) > 1 else None
        shape = LaunchShape(str(func.attrs[ATTR_OP]), max(xs), max(ys))
        apply_knobs(sch, shape, stage, ty_rv=ty, tx_rv=tx)
        return sch

    return fn


def _stages(func, target, knobs: CUDAKnobs) -> bool:
    """Whether ``schedule_with(func, target, knobs)`` keeps its shared-memory staging."""
    scheduled = schedule_with(func, target, knobs)
    return "shared" in scheduled.script()


def cuda_space(target, knobs: CUDAKnobs | None = None):
    """A MetaSchedule ``ScheduleFn`` design space over the CUDA schedule's block shapes.

    It samples ``threadIdx.y`` (rows / output channels per block) and, for linear, the lanes per
    row, as ``sample_categorical`` decisions whose values feed the splits directly, so a trace
    replays under any decision. No generic rules, postprocs or mutators: the nested kernels'
    data-dependent loops are outside what TVM's default CUDA space accepts (DisallowDynamicLoop);
    the search draws fresh decisions for its population instead of mutating them.
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.ScheduleFn(_space_fn(target, knobs), sch_rules=[], postprocs=[], mutator_probs={})


__all__ = [
    "CUDA_KNOBS",
    "CUDAKnobs",
    "LaunchShape",
    "apply_knobs",
    "cuda_space",
    "default_knobs",
    "launch_shape",
    "schedule_cuda",
    "schedule_with",
    "target_family",
    "target_limits",
]
