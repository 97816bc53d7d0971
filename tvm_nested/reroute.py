"""Profiling for rerouting: the per-stage latency table and the per-call overhead, on the target.

    lib = tvm_nested.build(mod, target, stages="auto")             # cuts and table measured here
    # or, for a board or another thread count:
    table = tvm_nested.reroute.profile_stages(rt, x)                # rt: lib.runtime() or over RPC
    lib = lib.with_latency_table(table)                             # compiles main_deadline in
    ovh = tvm_nested.reroute.profile_overhead(lib.runtime(), x)     # what the table does not cover
    lib = lib.with_latency_table(table, overhead_us=ovh)
    outs, levels = lib.runtime().run_deadline(x, deadline_ms=5.0, level=0)

The rules themselves are stated in ``relay_passes/deadline.py``; they run on the device.
"""

from __future__ import annotations

import time

import numpy as np

from .build import NestedModule
from .contract import DEADLINE_FUNC
from .runtime import NestedRuntime, example_inputs
from .runtime import profile_stages as _profile_on_device
from .runtime.stage_timing import NEVER_MS


def _as_runtime(rt_or_lib) -> NestedRuntime:
    if isinstance(rt_or_lib, NestedModule):
        return rt_or_lib.runtime()
    if not isinstance(rt_or_lib, NestedRuntime):
        raise TypeError(f"expected a NestedRuntime or a NestedModule, got {type(rt_or_lib).__name__}")
    return rt_or_lib


def profile_stages(rt_or_lib, *inputs, repeat: int = 7, warmup: int = 1) -> np.ndarray:
    """Latency (microseconds) of every stage at every level, timed on the runtime's device.

    ``rt_or_lib``: a ``NestedRuntime`` (local, or created from an RPC session's module and device)
    or a ``NestedModule`` (runs locally). The module's ``nested_stage_times`` runs every stage at
    one level and reads the device clock after each; levels alternate pass after pass, so each
    stage meets the caches a request leaves it. Each entry is the median over ``repeat`` passes.
    Returns a ``(stages, levels)`` array for ``NestedModule.with_latency_table`` /
    ``build(..., latency_table=)``.
    """
    rt = _as_runtime(rt_or_lib)
    return _profile_on_device(rt, inputs or example_inputs(rt.info), repeat=repeat, warmup=warmup)


def profile_overhead(rt_or_lib, *inputs, calls: int = 200, level: int = 0, repeat: int = 5, table=None) -> float:
    """Microseconds a ``main_deadline`` call costs beyond its latency table's stages, as the caller
    sees it: wall time (host clock around the call) of ``main_deadline`` with a deadline it never
    switches under, at ``level`` -- the smallest of ``repeat`` medians over ``calls // repeat`` calls
    each, so a burst of background work does not inflate it -- minus ``sum(table[:, level])``
    (``table``: the compiled-in one unless given, e.g. a table profiled at another thread count for
    the same stages); never negative. Needs a module with a table (``with_latency_table``); feed the
    result back with ``with_latency_table(table, overhead_us=...)``. Over RPC it includes the
    network round trip (what that caller sees too)."""
    rt = _as_runtime(rt_or_lib)
    if not inputs:
        inputs = example_inputs(rt.info)
    state = rt.new_deadline_state()
    args = rt.deadline_arguments(inputs, NEVER_MS, level, "paper", 0.0, state)
    table = rt.latency_table if table is None else np.asarray(table, dtype=np.float64)
    for _ in range(max(5, calls // 10)):
        rt.invoke(DEADLINE_FUNC, args)
    medians = []
    for _ in range(max(1, repeat)):
        ts = []
        for _ in range(max(1, calls // max(1, repeat))):
            t = time.perf_counter()
            rt.invoke(DEADLINE_FUNC, args)
            ts.append(time.perf_counter() - t)
        medians.append(float(np.median(ts)))
    return max(0.0, min(medians) * 1e6 - float(table[:, level].sum()))


__all__ = ["profile_overhead", "profile_stages"]
