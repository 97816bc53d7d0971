"""The rerouting rule and the clock as TIR functions, compiled into a staged module.

``relay_passes/deadline.py`` states the rule and adds these functions to a module built with
stages; ``decide`` is the NumPy reference the tests compare the compiled rule against.

* ``nested_elapsed_us(t0_ns, stage)``: microseconds since the start (``clock_gettime(CLOCK_MONOTONIC)``
  through ``call_extern`` to libc with a stack ``timespec``: links in any TVM-exported Linux .so,
  x86-64 and aarch64 alike, and in the in-process JIT);
* ``nested_reroute_rule(elapsed_us, deadline_us, level, spent_us, table, stage)``: the rule.
"""

from __future__ import annotations

import math

import numpy as np
import tvm

from ..contract import T

TABLE_FUNC = "nested_latency_table"
RULE_FUNC = "nested_reroute_rule"
ELAPSED_FUNC = "nested_elapsed_us"
CLOCK_FUNC = "nested_clock_ns"
CLOCK_MONOTONIC = 1  # <time.h> on Linux, every architecture


def check_table(table, num_stages: int, num_levels: int) -> np.ndarray:
    """A latency table as float64 ``(stages, levels)`` microseconds; ValueError naming the problem."""
    t = np.asarray(table, dtype=np.float64)
    if t.shape != (num_stages, num_levels):
        raise ValueError(
            f"latency table must have shape (stages, levels) = ({num_stages}, {num_levels}), got {t.shape}"
        )
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("latency table entries must be finite, non-negative microseconds")
    return t


def reroute_rule(
    num_stages: int, num_levels: int, level_dtype: str = "int32", adaptive: bool = True, overhead_us: float = 0.0
) -> tvm.tirx.PrimFunc:
    """The decision rule as a PrimFunc (see the module docstring); ``stage`` = stages already run.

    ``spent_us`` is the table's prediction for the stages before ``stage - 1``; the rule adds the stage
    just run (at ``level``) and returns it as ``spent_out``. ``adaptive``: predictions are scaled by
    the observed slowdown ``clamp(elapsed / spent, 1, 100)`` (the machine is busier than when it was
    profiled); otherwise the table is taken as is. ``overhead_us`` (a compile-time constant, see
    ``profile_overhead``): the per-call time the stage table does not cover, reserved in every prediction.
    """
    if num_stages < 1 or num_levels < 1:
        raise ValueError(f"reroute_rule needs num_stages >= 1 and num_levels >= 1, got {num_stages}, {num_levels}")
    K, L = int(num_stages), int(num_levels)
    adapt = 1 if adaptive else 0
    ovh = float(overhead_us)
    if not math.isfinite(ovh) or ovh < 0:
        raise ValueError(f"overhead_us must be a finite number >= 0, got {overhead_us!r}")

    @T.prim_func(private=True)
    def rule(
        elapsed_us: T.Buffer((), "float64"),
        deadline_us: T.Buffer((), "float64"),
        level: T.Buffer((), level_dtype),
        spent_us: T.Buffer((), "float64"),
        table: T.Buffer((K, L), "float64"),
        stage: T.int32,
        out: T.Buffer((), level_dtype),
        spent_out: T.Buffer((), "float64"),
    ):
        rem = T.alloc_buffer((L,), "float64")
        factor = T.alloc_buffer((1,), "float64")
        cur = T.max(T.min(T.Cast("int32", level[()]), L - 1), 0)
        spent_out[()] = spent_us[()] + table[T.max(T.min(stage - 1, K - 1), 0), cur]
        factor[0] = T.float64(1)
        if adapt == 1 and spent_out[()] > T.float64(0):
            factor[0] = T.min(T.max(elapsed_us[()] / spent_out[()], T.float64(1)), T.float64(100))
        for l in range(L):
            rem[l] = T.float64(0)
            for s in range(K):
                if s >= stage:
                    rem[l] = rem[l] + table[s, l]
            rem[l] = (rem[l] + T.float64(ovh)) * factor[0]
        out[()] = T.Cast(level_dtype, cur)
        if elapsed_us[()] + rem[cur] > deadline_us[()]:
            out[()] = T.Cast(level_dtype, L - 1)
            for i in range(L - 1):
                l = L - 2 - i  # from the sparsest-but-one towards the densest: the last fit wins
                if l > cur and elapsed_us[()] + rem[l] <= deadline_us[()]:
                    out[()] = T.Cast(level_dtype, l)

    return rule


def clock_ns(dep_dtype: str = "int32") -> tvm.tirx.PrimFunc:
    """Monotonic clock in ns; ``dep`` (the level) only anchors the call so nothing folds it."""

    @T.prim_func(private=True)
    def clock(dep: T.Buffer((), dep_dtype), out: T.Buffer((), "int64")):
        ts = T.alloc_buffer((2,), "int64")  # struct timespec {time_t tv_sec; long tv_nsec;} on LP64 Linux
        T.evaluate(T.call_extern("int32", "clock_gettime", CLOCK_MONOTONIC, T.address_of(ts[0])))
        out[()] = ts[0] * T.int64(1000000000) + ts[1] + T.Cast("int64", dep[()]) * T.int64(0)

    return clock


def elapsed_us() -> tvm.tirx.PrimFunc:
    """Microseconds since ``t0_ns``; ``stage`` makes every call site distinct (no CSE merges two)."""

    @T.prim_func(private=True)
    def elapsed(t0_ns: T.Buffer((), "int64"), stage: T.int32, out: T.Buffer((), "float64")):
        ts = T.alloc_buffer((2,), "int64")
        T.evaluate(T.call_extern("int32", "clock_gettime", CLOCK_MONOTONIC, T.address_of(ts[0])))
        out[()] = T.Cast("float64", ts[0] * T.int64(1000000000) + ts[1] - t0_ns[()]) * T.float64(1e-3) + T.Cast(
            "float64", stage
        ) * T.float64(0)

    return elapsed


def decide(
    table,
    elapsed_us_: float,
    deadline_us: float,
    level: int,
    stage: int,
    spent_us: float = 0.0,
    adaptive: bool = True,
    overhead_us: float = 0.0,
) -> tuple[int, float]:
    """NumPy reference of ``nested_reroute_rule``: (next level, predicted time spent so far)."""
    table = np.asarray(table, dtype=np.float64)
    K, L = table.shape
    cur = min(max(int(level), 0), L - 1)
    spent = spent_us + table[min(max(stage - 1, 0), K - 1), cur]
    factor = min(max(elapsed_us_ / spent, 1.0), 100.0) if adaptive and spent > 0 else 1.0
    rem = (table[stage:].sum(axis=0) + overhead_us) * factor
    if elapsed_us_ + rem[cur] <= deadline_us:
        return cur, spent
    fits = [lvl for lvl in range(cur + 1, L) if elapsed_us_ + rem[lvl] <= deadline_us]
    return (fits[0] if fits else L - 1), spent


__all__ = [
    "CLOCK_FUNC",
    "ELAPSED_FUNC",
    "RULE_FUNC",
    "TABLE_FUNC",
    "check_table",
    "clock_ns",
    "decide",
    "elapsed_us",
    "reroute_rule",
]
