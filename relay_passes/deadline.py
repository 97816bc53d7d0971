"""AddDeadlineFunction: ``main_deadline``, rerouting under a latency deadline decided on the device
(arXiv 2112.10930).

A module built with ``stages=`` runs the network as K stage functions (``relay_passes/stages.py``)
that each take the level, activations carried over, kernels and packed weights shared with ``main``.
With a per-stage, per-level latency table (profiled on the target with ``profile_stages``) compiled
in, the module gains::

    main_deadline(*inputs, level, deadline_us: float64[]) -> (*outputs, levels: int32[K])

It reads a monotonic clock at the start, runs stage 0 at ``level``, and after every stage s < K-1
calls two tiny TIR functions compiled into the same library:

* ``nested_elapsed_us(t0_ns, stage)``: microseconds since the start (``clock_gettime(CLOCK_MONOTONIC)``
  through ``call_extern`` to libc with a stack ``timespec``: links in any TVM-exported Linux .so,
  x86-64 and aarch64 alike, and in the in-process JIT);
* ``nested_reroute_rule(elapsed_us, deadline_us, level, spent_us, table, stage)`` -- THE rule::

      spent  = spent_us + table[stage - 1, level]        # predicted time of the stages already run
      f      = clamp(elapsed / spent, 1, 100) if adaptive else 1   # observed slowdown vs the profile
      rem(l) = f * (sum(table[stage:, l]) + overhead)    # predicted time of the remaining stages
      if elapsed + rem(level) <= deadline: keep level
      else: the densest l in (level, L-1] with elapsed + rem(l) <= deadline, else L-1

  It only ever moves to a sparser level, so a noisy table cannot make it oscillate; its elapsed time
  is an argument, so tests call the very PrimFunc the module uses with an injected clock. With
  ``adaptive=False`` it is the seed paper's rule on the profiled table as is; the default also
  scales the prediction by how much slower than profiled the run has been so far (input
  independent: elapsed time and the table only), which matters on a machine under varying load.
  ``overhead`` (microseconds, compiled in, 0 unless given) is what a call costs beyond the table's
  stages: the caller's dispatch before the clock starts, the decisions themselves (clock + rule +
  plumbing, K-1 of them) and the return. ``profile_overhead`` measures it as the caller sees it
  (median wall time of ``main_deadline`` that never switches, minus the table's level-0 sum). It is
  reserved whole at every decision (conservative: part of it is already behind) and scaled by f.
  Without it the rule aims the in-function clock at the deadline and lands just past it: measured on
  the recurrent bench workload, ~80 us of a 1.3 ms call lies outside the table.

The next stage gets the level tensor the rule returns: no host round trip between stages, so it works
the same over RPC. Deadline 0: stage 0 runs at ``level``, every later stage at L-1. A huge deadline:
never switches.

The table lives inside the artifact: the ``main_deadline`` constant, the function
``nested_latency_table()`` and the ``latency_table_us`` entry of the ``nested_info`` metadata.
Profiling produces a refreshed artifact::

    lib = tvm_nested.build(mod, target, stages=4)
    rt = lib.runtime()                        # or tvm_nested.load(...) over an RPC session
    table = tvm_nested.reroute.profile_stages(rt, x)       # VM time_evaluator on the device
    lib = lib.with_latency_table(table)       # recompiles (no re-lowering, no re-tuning)
    ovh = tvm_nested.reroute.profile_overhead(lib.runtime(), x)   # optional: per-call cost beyond the table
    lib = lib.with_latency_table(table, overhead_us=ovh)
    lib.export_library("model.so")
    outs, levels = tvm_nested.load("model.so").run_deadline(x, deadline_ms=5.0, level=0)
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from ..contract import DEADLINE_FUNC, LEVEL, REROUTE_ATTR, dtype_of
from ..schedules.reroute_rule import (
    CLOCK_FUNC,
    ELAPSED_FUNC,
    RULE_FUNC,
    TABLE_FUNC,
    check_table,
    clock_ns,
    elapsed_us,
    reroute_rule,
)
from .level_guard import guard_function, read_num_levels
from .stages import read_stage_plan


def _add_deadline_function(
    mod: tvm.IRModule, table, num_levels: int, adaptive: bool, overhead_us: float
) -> tvm.IRModule:
    """Add ``main_deadline`` (stages + on-device rule over ``table``) and ``nested_latency_table``."""
    plan = read_stage_plan(mod)
    if plan is None:
        raise ValueError("the module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))")
    K = int(plan["num_stages"])
    table = check_table(table, K, num_levels)
    main = mod["main"]
    ldt = dtype_of(next(p for p in main.params if p.name == LEVEL))

    bb = relax.BlockBuilder(mod)
    rule_gv = bb.add_func(reroute_rule(K, num_levels, ldt, adaptive, overhead_us), RULE_FUNC)
    clock_gv = bb.add_func(clock_ns(ldt), CLOCK_FUNC)
    elapsed_gv = bb.add_func(elapsed_us(), ELAPSED_FUNC)
    for gv in (rule_gv, clock_gv, elapsed_gv):
        bb.update_func(gv, bb.get()[gv].with_attr("global_symbol", gv.name_hint))
    table_const = relax.const(table, "float64")
    stage_gvs = [bb.get().get_global_var(n) for n in plan["functions"]]

    params = [relax.Var(p.name, p.ty) for p in main.params]
    deadline = relax.Var("deadline_us", relax.TensorType((), "float64"))
    env = {p.name: p for p in params}
    level = env[LEVEL]
    scalar = relax.TensorType((), ldt)
    with bb.function(DEADLINE_FUNC, [*params, deadline], private=False):
        t0 = bb.emit(relax.call_tir(clock_gv, [level], out_ty=relax.TensorType((), "int64")), name_hint="t0_ns")
        cur, levels, final = level, [level], None
        spent = relax.const(0.0, "float64")
        for s, gv in enumerate(stage_gvs):
            out = bb.emit(relax.Call(gv, [env[n] for n in plan["inputs"][s]] + [cur]), name_hint=f"stage{s}")
            if s == K - 1:
                final = out
                break
            for i, n in enumerate(plan["outputs"][s]):
                env[n] = bb.emit(relax.TupleGetItem(out, i), name_hint=n)
            stage_idx = relax.prim_value(tvm.tirx.IntImm("int32", s + 1))
            el = bb.emit(
                relax.call_tir(elapsed_gv, [t0, stage_idx], out_ty=relax.TensorType((), "float64")),
                name_hint=f"elapsed{s + 1}",
            )
            dec = bb.emit(
                relax.call_tir(
                    rule_gv,
                    [el, deadline, cur, spent, table_const, stage_idx],
                    out_ty=[scalar, relax.TensorType((), "float64")],
                ),
                name_hint=f"decision{s + 1}",
            )
            cur = bb.emit(relax.TupleGetItem(dec, 0), name_hint=f"level{s + 1}")
            spent = bb.emit(relax.TupleGetItem(dec, 1), name_hint=f"spent{s + 1}")
            levels.append(cur)
        flat = bb.emit(relax.op.concat([relax.op.reshape(lv, relax.ShapeExpr((1,))) for lv in levels], axis=0))
        if ldt != "int32":
            flat = bb.emit(relax.op.astype(flat, "int32"))
        if isinstance(final.ty, relax.TupleType):
            outs = [bb.emit(relax.TupleGetItem(final, i)) for i in range(len(final.ty.fields))]
        else:
            outs = [final]
        gv_dl = bb.emit_func_output(relax.Tuple([*outs, flat]))
    with bb.function(TABLE_FUNC, [], private=False):
        bb.emit_func_output(table_const)
    out = bb.get()
    out[gv_dl] = guard_function(out[gv_dl], num_levels)
    rule = {
        "latency_table_us": table.tolist(),
        "reroute_rule": "adaptive" if adaptive else "table",
        "reroute_overhead_us": float(overhead_us),
    }
    return relax.transform.Normalize()(out).with_attr(REROUTE_ATTR, json.dumps(rule))


def AddDeadlineFunction(table, *, adaptive: bool = True, overhead_us: float = 0.0) -> tvm.transform.Pass:
    """Add ``main_deadline`` over the stage functions and the rule with ``table`` compiled in.

    Run after ``SplitStages`` (it reads the stage plan) and ``LowerNestedLayers`` (the number of
    levels). ``table``: ``(stages, levels)`` microseconds (``tvm_nested.reroute.profile_stages``);
    ``adaptive``: scale predictions by the observed slowdown; ``overhead_us``: per-call time the
    table does not cover (``tvm_nested.reroute.profile_overhead``). Records the table and the rule
    as the module attr ``nested.reroute`` (the metadata copies it).
    """

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.AddDeadlineFunction")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        num_levels = read_num_levels(mod)
        if num_levels is None:
            raise ValueError("AddDeadlineFunction needs a module lowered by LowerNestedLayers")
        return _add_deadline_function(mod, table, num_levels, adaptive, overhead_us)

    return _pass


__all__ = ["AddDeadlineFunction"]
