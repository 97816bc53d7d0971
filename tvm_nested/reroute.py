"""Dynamic rerouting under a latency deadline, decided on the device (arXiv 2112.10930).

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

import argparse
import json
import math
import numbers
import sys

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from .info import example_inputs
from .relay_passes.level_guard import _guarded
from .relay_passes.stages import STAGES_ATTR, SplitStages, read_stage_plan

DEADLINE_FUNC = "main_deadline"
TABLE_FUNC = "nested_latency_table"
RULE_FUNC = "nested_reroute_rule"
ELAPSED_FUNC = "nested_elapsed_us"
CLOCK_FUNC = "nested_clock_ns"
CLOCK_MONOTONIC = 1  # <time.h> on Linux, every architecture
NO_TABLE_HELP = ("profile it on the target and rebuild: table = tvm_nested.reroute.profile_stages(lib.runtime() or "
                 "a runtime loaded over RPC, x); lib = lib.with_latency_table(table) (or tvm_nested.build(mod, target, "
                 "stages=K, latency_table=table))")


# ------------------------------------------------------------------------------------- TIR pieces
def reroute_rule(num_stages: int, num_levels: int, level_dtype: str = "int32", adaptive: bool = True,
                 overhead_us: float = 0.0) -> tvm.tirx.PrimFunc:
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
    def rule(elapsed_us: T.Buffer((), "float64"), deadline_us: T.Buffer((), "float64"),
             level: T.Buffer((), level_dtype), spent_us: T.Buffer((), "float64"), table: T.Buffer((K, L), "float64"),
             stage: T.int32, out: T.Buffer((), level_dtype), spent_out: T.Buffer((), "float64")):
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
        out[()] = T.Cast("float64", ts[0] * T.int64(1000000000) + ts[1] - t0_ns[()]) * T.float64(1e-3) \
            + T.Cast("float64", stage) * T.float64(0)

    return elapsed


def decide(table, elapsed_us_: float, deadline_us: float, level: int, stage: int, spent_us: float = 0.0,
           adaptive: bool = True, overhead_us: float = 0.0) -> tuple[int, float]:
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


# ------------------------------------------------------------------------------------- IR building
def add_stages(mod: tvm.IRModule, stages) -> tuple[tvm.IRModule, dict]:
    """Split ``main`` into stage functions: ``stages`` = a count (balanced) or a list of cuts."""
    if isinstance(stages, (list, tuple)):
        mod = SplitStages(None, cuts=list(stages))(mod)
    else:
        mod = SplitStages(stages)(mod)
    return mod, read_stage_plan(mod)


def check_table(table, num_stages: int, num_levels: int) -> np.ndarray:
    t = np.asarray(table, dtype=np.float64)
    if t.shape != (num_stages, num_levels):
        raise ValueError(f"latency table must have shape (stages, levels) = ({num_stages}, {num_levels}), got {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("latency table entries must be finite, non-negative microseconds")
    return t


def add_deadline_function(mod: tvm.IRModule, table, num_levels: int, adaptive: bool = True,
                          overhead_us: float = 0.0) -> tvm.IRModule:
    """Add ``main_deadline`` (stages + on-device rule over ``table``) and ``nested_latency_table``."""
    plan = read_stage_plan(mod)
    if plan is None:
        raise ValueError("the module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))")
    K = int(plan["num_stages"])
    table = check_table(table, K, num_levels)
    main = mod["main"]
    level_param = next(p for p in main.params if p.name == "level")
    level_ty = level_param.ty
    ldt = getattr(level_ty.dtype, "dtype", str(level_ty.dtype))

    bb = relax.BlockBuilder(mod)
    rule_gv = bb.add_func(reroute_rule(K, num_levels, ldt, adaptive, overhead_us), RULE_FUNC)
    clock_gv = bb.add_func(clock_ns(ldt), CLOCK_FUNC)
    elapsed_gv = bb.add_func(elapsed_us(), ELAPSED_FUNC)
    for gv, name in ((rule_gv, RULE_FUNC), (clock_gv, CLOCK_FUNC), (elapsed_gv, ELAPSED_FUNC)):
        bb.update_func(gv, bb.get()[gv].with_attr("global_symbol", gv.name_hint))
    table_const = relax.const(table, "float64")
    stage_gvs = [bb.get().get_global_var(n) for n in plan["functions"]]

    params = [relax.Var(p.name, p.ty) for p in main.params]
    deadline = relax.Var("deadline_us", relax.TensorType((), "float64"))
    env = {p.name: p for p in params}
    level = env["level"]
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
            el = bb.emit(relax.call_tir(elapsed_gv, [t0, stage_idx], out_ty=relax.TensorType((), "float64")),
                         name_hint=f"elapsed{s + 1}")
            dec = bb.emit(relax.call_tir(rule_gv, [el, deadline, cur, spent, table_const, stage_idx],
                                         out_ty=[scalar, relax.TensorType((), "float64")]), name_hint=f"decision{s + 1}")
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
    out[gv_dl] = _guarded(out[gv_dl], num_levels)
    return relax.transform.Normalize()(out)


# ------------------------------------------------------------------------------------- profiling
def _as_runtime(rt_or_lib, num_threads=None):
    from .build import NestedModule

    if isinstance(rt_or_lib, NestedModule):
        return rt_or_lib.runtime(num_threads=num_threads)
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
        raise ValueError("this module has no stages to profile: build it with stages=K "
                         "(tvm_nested.build(mod, target, stages=4))")
    if not inputs:
        inputs = example_inputs(rt.info)
    env = _stage_env(rt, inputs, 0)
    K, L = int(plan["num_stages"]), rt.num_levels
    table = np.zeros((K, L), dtype=np.float64)
    level_dtype = next(p["dtype"] for p in rt.info["inputs"] if p["name"] == "level")
    for s, name in enumerate(plan["functions"]):
        args = [env[n] for n in plan["inputs"][s]]
        timer = rt._vm.time_evaluator(name, rt.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        for lvl in range(L):
            res = timer(*args, tvm.runtime.tensor(np.array(lvl, level_dtype), rt.device))
            table[s, lvl] = float(np.median(np.asarray(res.results))) * 1e6
        out = _invoke(rt, name, [*args, tvm.runtime.tensor(np.array(0, level_dtype), rt.device)])
        if plan["outputs"][s] is not None:
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
    import time

    rt = _as_runtime(rt_or_lib)
    table = rt.latency_table
    if not inputs:
        inputs = example_inputs(rt.info)
    args = deadline_arguments(rt, inputs, 1e9, level)  # 1e9 ms: never switches
    for _ in range(max(5, calls // 10)):
        _invoke(rt, DEADLINE_FUNC, args)
    medians = []
    for _ in range(max(1, repeat)):
        ts = []
        for _ in range(max(1, calls // max(1, repeat))):
            t = time.perf_counter()
            _invoke(rt, DEADLINE_FUNC, args)
            ts.append(time.perf_counter() - t)
        medians.append(float(np.median(ts)))
    return max(0.0, min(medians) * 1e6 - float(np.asarray(table)[:, level].sum()))


def _invoke(rt, name: str, args: list):
    """Call a VM function; over RPC through the stateful interface, whose outputs (nested tuples of
    tensors) can be read from the host, where a returned remote tuple cannot be iterated."""
    if int(rt.device.dlpack_device_type()) < 128:  # 128 = RPC session mask: a remote device
        return rt._vm[name](*args)
    rt._vm.set_input(name, *args)
    rt._vm.invoke_stateful(name)
    return rt._vm.get_outputs(name)


def _stage_env(rt, inputs, level) -> dict:
    args = rt._arguments(inputs, level)
    return {p["name"]: a for p, a in zip(rt.info["inputs"], args) if p["name"] != "level"}


def run_stages(rt, inputs, levels) -> list[np.ndarray]:
    """Run the stage functions in order from the host, stage s at ``levels[s]``."""
    plan = rt.stage_plan
    if plan is None:
        raise ValueError("this module has no stages: build it with stages=K (tvm_nested.build(mod, target, stages=4))")
    K = int(plan["num_stages"])
    levels = list(levels)
    if len(levels) != K:
        raise ValueError(f"levels must give one level per stage ({K}), got {len(levels)}")
    levels = [rt.check_level(lvl) for lvl in levels]
    level_dtype = next(p["dtype"] for p in rt.info["inputs"] if p["name"] == "level")
    env = _stage_env(rt, inputs, levels[0])
    from .runtime import _flatten

    for s, name in enumerate(plan["functions"]):
        lvl = tvm.runtime.tensor(np.array(levels[s], level_dtype), rt.device)
        out = _invoke(rt, name, [*[env[n] for n in plan["inputs"][s]], lvl])
        if s == K - 1:
            return _flatten(out)
        env.update(zip(plan["outputs"][s], out))
    raise AssertionError("unreachable")


def deadline_arguments(rt, inputs, deadline_ms, level) -> list:
    if rt.latency_table is None:
        if rt.stage_plan is None:
            raise ValueError("this module has no stages and no latency table: build it with stages=K, then "
                             + NO_TABLE_HELP)
        raise ValueError("this module has no latency table: " + NO_TABLE_HELP)
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real) or not math.isfinite(deadline_ms) \
            or deadline_ms < 0:
        raise ValueError(f"deadline_ms must be a finite number >= 0, got {deadline_ms!r}")
    args = rt._arguments(inputs, rt.check_level(level))
    return [*args, tvm.runtime.tensor(np.array(float(deadline_ms) * 1e3, "float64"), rt.device)]


def run_deadline(rt, inputs, deadline_ms, level=0):
    args = deadline_arguments(rt, inputs, deadline_ms, level)  # before the lookup: a clear error first
    out = _flatten_all(_invoke(rt, DEADLINE_FUNC, args))
    return out[:-1], out[-1].astype(np.int64)


def _flatten_all(out):
    from .runtime import _flatten

    return _flatten(out)


__all__ = ["DEADLINE_FUNC", "TABLE_FUNC", "RULE_FUNC", "ELAPSED_FUNC", "add_stages", "add_deadline_function",
           "check_table", "decide", "profile_overhead", "profile_stages", "reroute_rule",
           "run_deadline", "run_stages", "STAGES_ATTR"]
