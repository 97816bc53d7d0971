"""AddDeadlineFunction: ``main_deadline``, rerouting under a latency deadline decided on the device
(arXiv 2112.10930).

A module built with ``stages=`` runs the network as K stage functions (``relay_passes/stages.py``)
that each take the level, activations carried over, kernels and packed weights shared with ``main``.
With a per-stage, per-level latency table (profiled on the target with ``profile_stages``) compiled
in, the module gains::

    main_deadline(*inputs, level, deadline_us: float64[], policy: int32[], aggressiveness: float64[],
                  state: float64[2]) -> (*outputs, levels: int32[K], state: float64[2],
                                         stage_end_us: float64[K])

It reads a monotonic clock at the start and, before every stage s (s = 0..K-1), calls the rule
(``schedules/reroute_rule.py``, the TIR functions and their NumPy references) with the elapsed time
``e``; the stage runs at the level the rule returns. No host round trip between stages: it works
the same over RPC. With ``T(l) = sum(table[s:, l]) + overhead`` the table's time left at level
``l``:

* ``policy`` 0, ``paper``: the seed paper's plain rule. Stage 0 runs at ``level``; after each
  stage, keep the level while ``e + T(level) <= deadline``, else move to the densest sparser level
  that fits (the sparsest if none does). It only ever moves sparser.
* ``policy`` 1, ``evidence``: acts on what it has seen. ``f`` is the slowdown against the table,
  estimated from the stages this request has run (each stage's observed / profiled time, forgotten
  with a time constant of a tenth of a request) and, before the first one, from the earlier
  requests (``state``). Before every stage, stage 0 included, it picks the densest level ``l``
  from ``level`` down for which both fit: ``e + f * T(l) <= deadline`` (this level to the end, at
  the slowdown seen) and ``e + f * (1 + a) * (table[s, l] + sum(table[s+1:, L-1]) + overhead) <=
  deadline`` (the escape: this stage at ``l``, then the sparsest level to the end, still fits if
  the slowdown grows by ``1 + a``; ``a = aggressiveness``, 0: no reserve). The escape leaves a
  request dense while it has slack and binds only late or under load, whatever the deadline's
  slack. It returns to denser levels when the slowdown passes; it never runs denser than ``level``.

``overhead`` (microseconds, compiled in, 0 unless given) is what a call costs beyond the table's
stages: the caller's dispatch before the clock starts, the decisions themselves and the return;
``profile_overhead`` measures it as the caller sees it. It is reserved whole at every decision.

``state`` is explicit: the caller passes it in and gets the next one back (``NestedRuntime`` keeps
it on the device between calls: ``run_deadline(..., state=)``); zeros mean no history. Its two
numbers are the last request's slowdown estimate and the clock when it ended (the prior fades as
that ages). ``stage_end_us``: when each stage ended, microseconds from the start (what the rule saw).

Deadline 0: every stage after the first at L-1 (``evidence``: the first too). A huge deadline:
never switches. The table lives inside the artifact: the ``main_deadline`` constant, the function
``nested_latency_table()`` and the ``latency_table_us`` entry of the ``nested_info`` metadata::

    lib = tvm_nested.build(mod, target, stages="auto")     # cuts chosen and the table profiled here
    # or: lib = tvm_nested.build(mod, target, stages=4)
    #     lib = lib.with_latency_table(tvm_nested.reroute.profile_stages(lib.runtime(), x))
    outs, levels = tvm_nested.load("model.so").run_deadline(x, deadline_ms=5.0, level=0)
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from ..contract import DEADLINE_FUNC, LEVEL, REROUTE_ATTR, REROUTE_POLICIES, dtype_of
from ..schedules.reroute_rule import (
    ACC_SIZE,
    DEFAULT_AGGRESSIVENESS,
    DEFAULT_POLICY,
    FINISH_FUNC,
    RULE_FUNC,
    START_FUNC,
    STATE_SIZE,
    TABLE_FUNC,
    check_overhead,
    check_table,
    reroute_finish,
    reroute_rule,
    reroute_start,
)
from .level_guard import guard_function, read_num_levels
from .stage_timer import add_clock, add_function, elapsed_since, flatten_result, run_stage
from .stages import read_stage_plan


def check_policy(policy: str | None, aggressiveness: float | None) -> tuple[str, float]:
    """A rule name and margin, checked (None: the defaults); ValueError naming the problem."""
    policy = DEFAULT_POLICY if policy is None else policy
    aggressiveness = DEFAULT_AGGRESSIVENESS if aggressiveness is None else aggressiveness
    if policy not in REROUTE_POLICIES:
        raise ValueError(f"unknown rerouting policy {policy!r}: choose one of {', '.join(REROUTE_POLICIES)}")
    a = float(aggressiveness)
    if not np.isfinite(a) or a < 0:
        raise ValueError(f"aggressiveness must be a finite number >= 0, got {aggressiveness!r}")
    return policy, a


def _add_deadline_function(
    mod: tvm.IRModule, table, num_levels: int, policy: str, aggressiveness: float, overhead_us: float
) -> tvm.IRModule:
    """Add ``main_deadline`` (stages + on-device rule over ``table``) and ``nested_latency_table``."""
    plan = read_stage_plan(mod)
    if plan is None:
        raise ValueError("the module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))")
    K = int(plan["num_stages"])
    table = check_table(table, K, num_levels)
    overhead_us = check_overhead(overhead_us)
    main = mod["main"]
    ldt = dtype_of(next(p for p in main.params if p.name == LEVEL))

    bb = relax.BlockBuilder(mod)
    clock_gv, elapsed_gv = add_clock(bb, ldt)
    rule_gv = add_function(bb, RULE_FUNC, reroute_rule(table, ldt, overhead_us))
    start_gv = add_function(bb, START_FUNC, reroute_start(table))
    finish_gv = add_function(bb, FINISH_FUNC, reroute_finish(table, ldt))
    table_const = relax.const(table, "float64")
    stage_gvs = [bb.get().get_global_var(n) for n in plan["functions"]]

    params = [relax.Var(p.name, p.ty) for p in main.params]
    deadline = relax.Var("deadline_us", relax.TensorType((), "float64"))
    policy_v = relax.Var("policy", relax.TensorType((), "int32"))  # an index into REROUTE_POLICIES
    margin = relax.Var("aggressiveness", relax.TensorType((), "float64"))
    state = relax.Var("state", relax.TensorType((STATE_SIZE,), "float64"))
    env = {p.name: p for p in params}
    level = env[LEVEL]
    acc_ty = relax.TensorType((ACC_SIZE,), "float64")
    with bb.function(DEADLINE_FUNC, [*params, deadline, policy_v, margin, state], private=False):
        t0 = bb.emit(relax.call_tir(clock_gv, [level], out_ty=relax.TensorType((), "int64")), name_hint="t0_ns")
        acc = bb.emit(relax.call_tir(start_gv, [t0, state], out_ty=acc_ty), name_hint="acc0")
        cur, levels, final = level, [], None
        el = elapsed_since(bb, elapsed_gv, t0, 0, "elapsed0")
        ends = []
        for s, gv in enumerate(stage_gvs):
            stage_idx = relax.prim_value(tvm.tirx.IntImm("int32", s))
            dec = bb.emit(
                relax.call_tir(
                    rule_gv,
                    [el, deadline, level, cur, acc, table_const, stage_idx, policy_v, margin],
                    out_ty=[relax.TensorType((), ldt), acc_ty],
                ),
                name_hint=f"decision{s}",
            )
            cur = bb.emit(relax.TupleGetItem(dec, 0), name_hint=f"level{s}")  # stage s's level, chosen here
            acc = bb.emit(relax.TupleGetItem(dec, 1), name_hint=f"acc{s + 1}")
            levels.append(cur)
            final = run_stage(bb, plan, env, gv, s, cur)
            el = elapsed_since(bb, elapsed_gv, t0, s + 1, f"elapsed{s + 1}")
            ends.append(el)
        state_out = bb.emit(
            relax.call_tir(
                finish_gv, [el, cur, acc, table_const, t0], out_ty=relax.TensorType((STATE_SIZE,), "float64")
            ),
            name_hint="state_out",
        )
        flat = bb.emit(relax.op.concat([relax.op.reshape(lv, relax.ShapeExpr((1,))) for lv in levels], axis=0))
        if ldt != "int32":
            flat = bb.emit(relax.op.astype(flat, "int32"))
        times = bb.emit(relax.op.concat([relax.op.reshape(e, relax.ShapeExpr((1,))) for e in ends], axis=0))
        gv_dl = bb.emit_func_output(relax.Tuple([*flatten_result(bb, final), flat, state_out, times]))
    with bb.function(TABLE_FUNC, [], private=False):
        bb.emit_func_output(table_const)
    out = bb.get()
    out[gv_dl] = guard_function(out[gv_dl], num_levels)
    rule = {
        "latency_table_us": table.tolist(),
        "reroute_rule": policy,
        "reroute_aggressiveness": aggressiveness,
        "reroute_overhead_us": overhead_us,
    }
    return relax.transform.Normalize()(out).with_attr(REROUTE_ATTR, json.dumps(rule))


def AddDeadlineFunction(
    table, *, policy: str | None = None, aggressiveness: float | None = None, overhead_us: float = 0.0
) -> tvm.transform.Pass:
    """Add ``main_deadline`` over the stage functions and the rules with ``table`` compiled in.

    Run after ``SplitStages`` (it reads the stage plan) and ``LowerNestedLayers`` (the number of
    levels). ``table``: ``(stages, levels)`` microseconds (``tvm_nested.reroute.profile_stages``);
    ``policy`` / ``aggressiveness``: the rule a call uses when it names none (None: ``evidence``
    and ``schedules.reroute_rule.DEFAULT_AGGRESSIVENESS``; recorded; a call may choose another:
    both rules are compiled in); ``overhead_us``: per-call time the table does not
    cover (``tvm_nested.reroute.profile_overhead``). Records the table and the defaults as the
    module attr ``nested.reroute`` (the metadata copies it).
    """
    policy, aggressiveness = check_policy(policy, aggressiveness)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.AddDeadlineFunction")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        num_levels = read_num_levels(mod)
        if num_levels is None:
            raise ValueError("AddDeadlineFunction needs a module lowered by LowerNestedLayers")
        return _add_deadline_function(mod, table, num_levels, policy, aggressiveness, overhead_us)

    return _pass


__all__ = ["AddDeadlineFunction", "check_policy"]
