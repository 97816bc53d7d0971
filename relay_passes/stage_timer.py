"""AddStageTimer: ``nested_stage_times``, every stage at one level with the clock read after each.

Run after ``SplitStages`` (it reads the stage plan) and ``LowerNestedLayers`` (the number of levels).
The module gains::

    nested_stage_times(*inputs, level) -> (*outputs, stage_end_us: float64[K])

the stages run in order at ``level``, exactly as ``main_deadline`` runs them, and ``stage_end_us[s]``
the microseconds from the start to the end of stage ``s`` on the device's monotonic clock
(``schedules/reroute_rule.py``). ``tvm_nested.reroute.profile_stages`` builds the latency table from
it: each stage timed where it runs in a request (the caches as the stages before it left them, not
warmed by calling that stage again and again), on the device, over RPC as well (one call per pass).
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..contract import LEVEL, STAGE_TIMES_FUNC, dtype_of
from ..schedules.reroute_rule import CLOCK_FUNC, ELAPSED_FUNC, clock_ns, elapsed_us
from .level_guard import guard_function, read_num_levels
from .stages import read_stage_plan


def add_function(bb: relax.BlockBuilder, name: str, func) -> tvm.ir.GlobalVar:
    """``func`` added to the module as ``name`` (exported under that symbol), or the one already there."""
    mod = bb.get()
    if name in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod.get_global_var(name)
    gv = bb.add_func(func, name)
    bb.update_func(gv, bb.get()[gv].with_attr("global_symbol", name))
    return gv


def add_clock(bb: relax.BlockBuilder, level_dtype: str) -> tuple[tvm.ir.GlobalVar, tvm.ir.GlobalVar]:
    """The clock and the elapsed-time PrimFuncs of ``schedules/reroute_rule.py``, added once."""
    return add_function(bb, CLOCK_FUNC, clock_ns(level_dtype)), add_function(bb, ELAPSED_FUNC, elapsed_us())


def elapsed_since(bb, elapsed_gv, t0, index: int, name: str):
    """Emit ``elapsed_us(t0, index)``: microseconds since ``t0`` (each call site distinct)."""
    idx = relax.prim_value(tvm.tirx.IntImm("int32", index))
    return bb.emit(relax.call_tir(elapsed_gv, [t0, idx], out_ty=relax.TensorType((), "float64")), name_hint=name)


def run_stage(bb, plan, env, gv, s, level):
    """Emit stage ``s`` at ``level``; bind its outputs in ``env`` (the last stage: main's result)."""
    out = bb.emit(relax.Call(gv, [env[n] for n in plan["inputs"][s]] + [level]), name_hint=f"stage{s}")
    if s < int(plan["num_stages"]) - 1:
        for i, n in enumerate(plan["outputs"][s]):
            env[n] = bb.emit(relax.TupleGetItem(out, i), name_hint=n)
    return out


def flatten_result(bb, final) -> list:
    """main's result as a list of values (a tuple's fields, or the one value)."""
    if isinstance(final.ty, relax.TupleType):
        return [bb.emit(relax.TupleGetItem(final, i)) for i in range(len(final.ty.fields))]
    return [final]


def _add_stage_timer(mod: tvm.IRModule, num_levels: int) -> tvm.IRModule:
    plan = read_stage_plan(mod)
    if plan is None:
        raise ValueError("AddStageTimer: the module has no stages (run SplitStages first)")
    main = mod["main"]
    ldt = dtype_of(next(p for p in main.params if p.name == LEVEL))
    bb = relax.BlockBuilder(mod)
    clock_gv, elapsed_gv = add_clock(bb, ldt)
    stage_gvs = [bb.get().get_global_var(n) for n in plan["functions"]]
    params = [relax.Var(p.name, p.ty) for p in main.params]
    env = {p.name: p for p in params}
    level = env[LEVEL]
    with bb.function(STAGE_TIMES_FUNC, params, private=False):
        t0 = bb.emit(relax.call_tir(clock_gv, [level], out_ty=relax.TensorType((), "int64")), name_hint="t0_ns")
        ends, final = [], None
        for s, gv in enumerate(stage_gvs):
            final = run_stage(bb, plan, env, gv, s, level)
            ends.append(elapsed_since(bb, elapsed_gv, t0, s + 1, f"end{s}"))
        times = bb.emit(relax.op.concat([relax.op.reshape(e, relax.ShapeExpr((1,))) for e in ends], axis=0))
        gv_t = bb.emit_func_output(relax.Tuple([*flatten_result(bb, final), times]))
    out = bb.get()
    out[gv_t] = guard_function(out[gv_t], num_levels)
    return relax.transform.Normalize()(out)


def AddStageTimer() -> tvm.transform.Pass:
    """Add ``nested_stage_times`` (see the module docstring). Run after ``SplitStages``."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.AddStageTimer")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        num_levels = read_num_levels(mod)
        if num_levels is None:
            raise ValueError("AddStageTimer needs a module lowered by LowerNestedLayers")
        return _add_stage_timer(mod, num_levels)

    return _pass


__all__ = ["AddStageTimer", "add_clock", "add_function", "elapsed_since", "flatten_result", "run_stage"]
