"""MetaSchedule design spaces for the nested kernels: the knobs of ``schedules/cpu.py``, searched.

The space is the grid of ``CPUKnobs`` values (rows per parallel task x widest vector x unroll
depth), each point scheduled by the very ``apply_knobs`` that ``schedule_cpu`` uses, so a tuned
kernel is always one ``schedule_cpu`` could have produced with other knobs.

Why a grid of design spaces and not sampling instructions: ``apply_knobs`` takes plain ints (the
vector split is computed in Python from the dense extent), so a ``sample_categorical`` decision
would be frozen into constant split factors in the trace and every replay or mutation would give
the same schedule. One design space per knob point, deduplicated by structure, lets MetaSchedule's
evolutionary search (XGBoost cost model) choose which points to measure.

No postprocessors: ``DisallowDynamicLoop`` (in the default CPU set) rejects the data-dependent
loop over a row's non-zeros that every nested kernel has (tvm027-cookbook section 4).
"""

from __future__ import annotations

import dataclasses
import itertools

import tvm
import tvm_ffi

from .cpu import CPUKnobs, apply_knobs, default_knobs
from .kernel import is_nested_kernel

# Values tried for each knob (beside the target family's defaults, always included).
_ROWS_PER_TASK = (1, 2, 4, 8, 16)
_VECTOR_MULTIPLES = (1, 2, 4)  # max_vector in SIMD registers of fp32
_UNROLL = (0, 16, 64)


def _row_count(sch) -> int:
    n = 1
    for loop in sch.get_loops(sch.get_sblock("row")):
        n *= int(sch.get(loop).extent)
    return n


def knob_grid(sch, target) -> list[CPUKnobs]:
    """The knob points worth trying for the kernel in ``sch`` (defaults first)."""
    base = default_knobs(target)
    cores = int(target.attrs.get("num-cores", 1) or 1)
    rows = _row_count(sch)
    # at least one parallel task per core; never more rows per task than that leaves
    rows_per_task = sorted({r for r in (*_ROWS_PER_TASK, base.rows_per_task) if r == 1 or r * cores <= rows})
    vectors = sorted({base.max_vector, *(base.vector_lanes * m for m in _VECTOR_MULTIPLES)})
    unrolls = sorted({base.unroll, *_UNROLL})
    grid = [base]
    for r, v, u in itertools.product(rows_per_task, vectors, unrolls):
        knobs = dataclasses.replace(base, rows_per_task=r, max_vector=v, unroll=u)
        if knobs != base:
            grid.append(knobs)
    return grid


def cpu_space(target) -> tvm.s_tir.meta_schedule.space_generator.ScheduleFn:
    """A ``ScheduleFn`` design space over ``knob_grid``: one design space per distinct schedule."""
    from tvm.s_tir import meta_schedule as ms

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)

    def _space(sch):
        if not is_nested_kernel(sch.mod["main"]):
            raise ValueError(f"cpu_space schedules nested kernels only, got {sch.mod['main'].attrs}")
        spaces, seen = [], set()
        for knobs in knob_grid(sch, target):
            candidate = sch.copy()
            apply_knobs(candidate, knobs)
            key = tvm_ffi.structural_hash(candidate.mod)
            if key not in seen:
                seen.add(key)
                spaces.append(candidate)
        return spaces

    return ms.space_generator.ScheduleFn(_space, sch_rules=[], postprocs=[], mutator_probs={})


__all__ = ["cpu_space", "knob_grid"]
