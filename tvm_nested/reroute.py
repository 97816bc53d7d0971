"""Profiling for rerouting: the per-stage latency table and the per-call overhead, on the target.

    lib = tvm_nested.build(mod, target, stages=4)
    table = tvm_nested.reroute.profile_stages(lib.runtime(), x)     # or a runtime over RPC
    lib = lib.with_latency_table(table)                             # compiles main_deadline in
    ovh = tvm_nested.reroute.profile_overhead(lib.runtime(), x)     # what the table does not cover
    lib = lib.with_latency_table(table, overhead_us=ovh)
    outs, levels = lib.runtime().run_deadline(x, deadline_ms=5.0, level=0)

The rule itself is stated in ``relay_passes/deadline.py``; it runs on the device.
"""

from __future__ import annotations

import time

import numpy as np

from .build import NestedModule
from .contract import DEADLINE_FUNC
from .runtime import NestedRuntime, example_inputs


def _as_runtime(rt_or_lib) -> NestedRuntime:
    if isinstance(rt_or_lib, NestedModule):
        return rt_or_lib.runtime()
    if not isinstance(rt_or_lib, NestedRuntime):
        raise TypeError(f"expected a NestedRuntime or a NestedModule, got {type(rt_or_lib).__name__}")
    return rt_or_lib


def profile_stages(rt_or_lib, *inputs, number: int = 5, repeat: int = 7, min_repeat_ms: int = 0) -> np.ndarray:
    """Latency (microseconds) of every stage at every level, timed on the runtime's device.

    ``rt_or_lib``: a ``NestedRuntime`` (local, or created from an RPC session's module and device:
    the VM's ``time_evaluator`` runs on the board) or a ``NestedModule`` (runs locally). Each entry is
    the median over ``repeat`` measurements of ``number`` calls. Returns a ``(stages, levels)`` array
    for ``NestedModule.with_latency_table`` / ``build(..., latency_table=)``.
    """
    rt = _as_runtime(rt_or_lib)
    plan = rt.stage_plan
    if plan is None:
        raise ValueError(
            "this module has no stages to profile: build it with stages=K (tvm_nested.build(mod, target, stages=4))"
        )
    if not inputs:
        inputs = example_inputs(rt.info)
    env = rt.stage_inputs(inputs)
    K, L = int(plan["num_stages"]), rt.num_levels
    table = np.zeros((K, L), dtype=np.float64)
    for s, name in enumerate(plan["functions"]):
        args = [env[n] for n in plan["inputs"][s]]
        for lvl in range(L):
            secs = rt.time_function(
                name, [*args, rt.level_tensor(lvl)], number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            table[s, lvl] = float(np.median(secs)) * 1e6
        out = rt.invoke(name, [*args, rt.level_tensor(0)])
        if s < K - 1:  # the activations the next stages read
            env.update(zip(plan["outputs"][s], out))
    return table


def profile_overhead(rt_or_lib, *inputs, calls: int = 200, level: int = 0, repeat: int = 5) -> float:
    """Microseconds a ``main_deadline`` call costs beyond its latency table's stages, as the caller
    sees it: wall time (host clock around the call) of ``main_deadline`` with a deadline it never
    switches under, at ``level`` -- the smallest of ``repeat`` medians over ``calls // repeat`` calls
    each, so a burst of background work does not inflate it -- minus ``sum(table[:, level])``; never
    negative. Needs a module
    with a table (``with_latency_table``); feed the result back with ``with_latency_table(table,
    overhead_us=...)``. Over RPC it includes the network round trip (what that caller sees too)."""
    rt = _as_runtime(rt_or_lib)
    if not inputs:
        inputs = example_inputs(rt.info)
    args = rt.deadline_arguments(inputs, 1e9, level)  # 1e9 ms: never switches
    table = rt.latency_table
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
    return max(0.0, min(medians) * 1e6 - float(np.asarray(table)[:, level].sum()))


__all__ = ["profile_overhead", "profile_stages"]
