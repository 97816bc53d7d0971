"""Default CPU schedules for the dense remainder of a model (what the nested kernels do not cover).

TVM 0.27's CPU pipeline legalizes Relax ops into plain loop nests and schedules none of them
(pooling, elementwise, softmax, any conv/matmul left dense run serial and scalar).
``schedule_dense_func`` gives one legalized PrimFunc that is not a nested kernel and not scheduled
yet one simple schedule, block by block (root children only):

* spatial-only (injective) block: all loops fused, split by a vector, outer part parallel, inner
  part vectorised;
* block with reduction loops (conv2d, matmul, pooling, softmax's max/sum): the spatial loops fused
  and parallel, except the innermost spatial loop's vector part, which moves inside the reduction
  loops and is vectorised (a register-resident row of outputs, as in a direct conv); the init is
  decomposed out of the reduction;
* a block that reads or writes a ``bool`` buffer (the masks of ``slice_scatter``, ``where``) is
  parallel but never vectorised: TVM 0.27 keeps bool as int8 in memory and i1 in registers, and its
  vectoriser mixes the two (``dtype mismatch on BufferStore: ... T.bool ... T.int8x10``).

A block the rule cannot schedule (non-constant extents, opaque structure) keeps its loops; the
functions left wholly unscheduled are reported (``relay_passes.ReportUnscheduled``). Tuning
(``tvm_nested.tune``) replaces these defaults where it has records.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from ..contract import IS_SCHEDULED, Schedule, as_target, detect_linear_equation, fresh_copy
from .cpu import VECTOR_LANES, target_family
from .kernel import is_nested_kernel


@dataclass(frozen=True)
class DenseKnobs:
    """Vector width (fp32 lanes per vectorised loop) and the smallest parallel extent worth it."""

    max_vector: int = 16
    min_parallel: int = 2


def _vector(extent: int, max_vector: int) -> int:
    """Largest divisor of ``extent`` that is <= max_vector, preferring multiples of 4."""
    divs = [d for d in range(1, min(extent, max_vector) + 1) if extent % d == 0]
    whole = [d for d in divs if d % 4 == 0]
    return max(whole or divs)


def _const_extents(sch: Schedule, loops) -> list[int] | None:
    out = []
    for lp in loops:
        ext = sch.get(lp).extent
        if not isinstance(ext, tvm.tirx.IntImm):
            return None
        out.append(int(ext))
    return out


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tvm.tirx.analysis.undefined_vars(expr))


def _innermost_in_reads(block, var) -> bool:
    """True when every read that depends on ``var`` has it in its last (contiguous) dimension only."""
    for region in block.reads:
        dims = [r.min for r in region.region]
        if any(_uses(d, var) for d in dims[:-1]):
            return False
    return True


def _unit_stride_in_reads(block, var) -> bool:
    """True unless a read indexes its last dimension with ``var`` times a constant other than 1
    (a strided pool or conv: vectorising over ``var`` would gather)."""
    for region in block.reads:
        last = region.region[-1].min
        if _uses(last, var):
            coef = detect_linear_equation(last, [var])
            if not coef or not isinstance(coef[0], tvm.tirx.IntImm) or int(coef[0]) != 1:
                return False
    return True


def _inline_producers(sch: Schedule, block) -> None:
    """Compute the spatial-only producers that only ``block`` reads (a pad) where ``block`` reads
    them: no padded copy goes through memory."""
    for producer in sch.get_producers(block):
        iters = sch.get(producer).iter_vars
        if any(int(iv.iter_type) != 0 for iv in iters) or len(sch.get_consumers(producer)) != 1:
            continue
        try:
            sch.compute_inline(producer)
        except Exception:  # not inlinable (e.g. more than one store): leave it at the root
            continue


def _touches_bool(block) -> bool:
    return any(str(r.source.dtype) == "bool" for r in [*block.reads, *block.writes])


def _schedule_block(sch: Schedule, block, knobs: DenseKnobs) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = _const_extents(sch, loops)
    if extents is None:
        return
    iters = sch.get(block).iter_vars
    kinds = ["R" if int(iv.iter_type) == 2 else "S" for iv in iters]  # 2 = CommReduce
    if any(k not in "SR" for k in kinds) or len(iters) != len(loops):
        return
    # loops must be bound one-to-one in order (the legalized form): S... then R...
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce_ = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    if reduce_:
        sch.reorder(*spatial, *reduce_)
    last = spatial[-1]
    last_ext = int(sch.get(last).extent)
    vec = _vector(last_ext, knobs.max_vector)
    last_var = [iv.var for iv, k in zip(iters, kinds) if k == "S"][-1]
    strided = reduce_ and not _unit_stride_in_reads(sch.get(block), last_var)
    if reduce_ and (strided or not _innermost_in_reads(sch.get(block), last_var)):
        vec = 1  # e.g. x @ W.T: the output column strides through W; keep the reduction innermost
    if _touches_bool(sch.get(block)):
        vec = 1  # bool vectors do not lower in TVM 0.27 (module docstring)
    outer_sp = spatial[:-1]
    if vec > 1 and vec < last_ext:
        lo, vi = sch.split(last, [None, vec])
        outer_sp = [*outer_sp, lo]
    elif vec == last_ext and vec > 1:
        vi = last
    else:
        vi = None
        # a strided window keeps its last spatial loop serial (no div/mod per output)
        outer_sp = spatial[:-1] if strided and len(spatial) > 1 else spatial
    par = sch.fuse(*outer_sp) if len(outer_sp) > 1 else (outer_sp[0] if outer_sp else None)
    if reduce_ and vi is not None:
        sch.reorder(*reduce_, vi)
    if par is not None and int(sch.get(par).extent) >= knobs.min_parallel:
        sch.parallel(par)
    if vi is not None:
        sch.vectorize(vi)
    if strided:
        # a strided window (max pool 3x3/2): the pad inlined and the window unrolled, scalar,
        # reads each input row once from cache (ResNet-50's pool: 1.1 -> 0.25 ms, 1 thread)
        _inline_producers(sch, block)
        if all(int(sch.get(r).extent) <= 16 for r in reduce_):
            for r in reduce_:
                sch.unroll(r)
    if reduce_:
        sch.decompose_reduction(block, reduce_[0])


def schedule_dense_func(func, target, knobs: DenseKnobs | None = None):
    """Schedule one legalized dense PrimFunc for an llvm target; None when the rule does not apply."""
    target = as_target(target)
    if target.kind.name != "llvm" or not isinstance(func, tvm.tirx.PrimFunc) or is_nested_kernel(func):
        return None
    attrs = func.attrs
    if attrs is not None and bool(attrs.get(IS_SCHEDULED, False)):
        return None
    if knobs is None:
        knobs = DenseKnobs(max_vector=2 * VECTOR_LANES[target_family(target)])
    try:
        sch = Schedule(fresh_copy(func))
        root = sch.get_sblock("root")
    except Exception:
        return None
    done = 0
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    for name in reversed(names):  # consumers first: one may inline its producer
        if name not in {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}:
            continue
        trial = sch.copy()
        try:
            _schedule_block(trial, trial.get_sblock(name), knobs)
        except Exception:
            continue
        sch = trial
        done += 1
    if not done:
        return None
    return sch.mod["main"].with_attr(IS_SCHEDULED, True)


def has_blocks(func) -> bool:
    """Whether ``func`` is TensorIR with blocks (hand-written plain loops are not)."""
    try:
        Schedule(func).get_sblock("root")
    except Exception:
        return False
    return True


__all__ = ["DenseKnobs", "has_blocks", "schedule_dense_func"]
