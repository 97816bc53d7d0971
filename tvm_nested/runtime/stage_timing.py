"""Timing the stages of a staged module on its device: the latency table and what a decision costs.

Both run through the module's own functions, so they time the device a runtime drives (this
process, or a board over RPC) without a host round trip inside the measurement:

* ``profile_stages``: ``nested_stage_times`` (every stage at one level, the device clock read after
  each), levels taken in turn pass after pass so each stage meets the caches a request leaves it;
* ``decision_cost_us``: ``main_deadline`` that never switches against ``main``, paired calls timed
  by the VM's ``time_evaluator``: what one decision point (the stage call, the clock, the rule)
  adds to a request.
"""

from __future__ import annotations

import numpy as np

from ..contract import DEADLINE_FUNC
from .vm import NestedRuntime

NEVER_MS = 1e9  # a deadline no request reaches: main_deadline never switches


def profile_stages(rt: NestedRuntime, inputs, *, repeat: int = 7, warmup: int = 1) -> np.ndarray:
    """``(stages, levels)`` microseconds: each entry the median over ``repeat`` passes (after
    ``warmup``) of the stage's time between the clock reads around it, on ``rt``'s device."""
    plan = rt.stage_plan
    if plan is None:
        raise ValueError(
            "this module has no stages to profile: build it with stages=K (tvm_nested.build(mod, target, stages=4))"
        )
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}")
    K, L = int(plan["num_stages"]), rt.num_levels
    samples = np.zeros((repeat, K, L))
    for r in range(warmup + repeat):
        for i in range(L):
            lvl = (i + r) % L  # a different level before each one, pass after pass
            ends = rt.stage_times(*inputs, level=lvl)
            if r >= warmup:
                samples[r - warmup, :, lvl] = np.diff(np.concatenate([[0.0], ends]))
    return np.median(samples, axis=0)


def decision_cost_us(rt: NestedRuntime, inputs, *, pairs: int = 15, level: int | None = None) -> float:
    """Microseconds one decision point adds: the median over ``pairs`` paired measurements of
    (``main_deadline`` that never switches - ``main``) / stages, at ``level`` (default: the
    sparsest, whose calls are shortest and so least disturbed by load); never negative."""
    K = rt.num_stages
    if K is None or rt.latency_table is None:
        raise ValueError("decision_cost_us needs a staged module with a latency table (main_deadline)")
    lvl = rt.num_levels - 1 if level is None else rt.check_level(level)
    main_args = rt.arguments(inputs, lvl)
    state = rt.new_deadline_state()
    diffs = []
    for _ in range(max(1, pairs)):
        dl_args = rt.deadline_arguments(inputs, NEVER_MS, lvl, "paper", 0.0, state)
        t_main = min(rt.time_function("main", main_args, number=1, repeat=3))
        t_dl = min(rt.time_function(DEADLINE_FUNC, dl_args, number=1, repeat=3))
        diffs.append((t_dl - t_main) * 1e6 / K)
    return max(0.0, float(np.median(diffs)))


__all__ = ["NEVER_MS", "decision_cost_us", "profile_stages"]
