"""Scheduling passes: every PrimFunc of a legalized module gets a schedule, or is reported.

Run after legalization (``LegalizeOps`` .. ``FuseTIR``), in this order:

* ``ApplyTuningLog(target, log)``: the log's best records, measuring nothing (MetaSchedule's
  ``MetaScheduleApplyDatabase`` over the log's database); ``tuning_log`` refuses a log made for
  another target or version. What it schedules carries ``tirx.is_scheduled``.
* ``ScheduleKernels(target)``: the target's rules for what is not scheduled yet: nested kernels
  (``schedules.cpu.schedule_cpu`` / ``schedules.cuda.schedule_cuda``), then the dense remainder
  (``schedules.cpu_dense`` on CPU; on CUDA TVM's dlight GPU rules, one function and one rule at a
  time, so a rule that fails on a function falls through to the next).
* ``ReportUnscheduled(target)``: names every function no rule scheduled: a warning on CPU (they run
  as plain loops), an error on GPU (TVM 0.27 would compile an unbound kernel as CPU code).
"""

from __future__ import annotations

import warnings

import tvm
from tvm import relax

from ..contract import IS_SCHEDULED, as_target
from ..schedules import tuning_log
from ..schedules.cpu import schedule_cpu
from ..schedules.cpu_dense import has_blocks, schedule_dense_func
from ..schedules.cuda import schedule_cuda
from ..schedules.kernel import is_nested_kernel

# target kind -> the rule for nested kernels
NESTED_RULES = {"llvm": schedule_cpu, "cuda": schedule_cuda}


def _scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get(IS_SCHEDULED, False))


def _unscheduled_prim_funcs(mod: tvm.IRModule):
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and not _scheduled(func):
            yield gv, func


def ApplyTuningLog(target, log) -> tvm.transform.Pass:
    """Schedule the functions the tuning log ``log`` has records for (see the module docstring)."""
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.ApplyTuningLog")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        db = tuning_log.database(tuning_log.check(log, target))
        with db, target:  # the TVM pass queries Database.current() and Target.current()
            return relax.transform.MetaScheduleApplyDatabase(None, enable_warning=False)(mod)

    return _pass


def _dense_rule(target):
    """One function -> its schedule or None: the CPU rule, or dlight's GPU rules in order."""
    if target.kind.name == "llvm":
        return lambda func: schedule_dense_func(func, target)
    from tvm.s_tir import dlight as dl  # the GPU rules (imported for GPU targets only)

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]

    def schedule(func):
        # one rule at a time: a rule that misjudges a function (dlight's GEMV asserts on the einsum of
        # a graph attention) must not stop the next one from scheduling it
        for rule in rules:
            try:
                with target:
                    out = dl.ApplyDefaultSchedule(rule)(tvm.IRModule({"main": func}))["main"]
            except (AssertionError, tvm.error.InternalError):
                continue
            if _scheduled(out):
                return out
        return None

    return schedule


def ScheduleKernels(target) -> tvm.transform.Pass:
    """The target's rules for every function not scheduled yet (see the module docstring)."""
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.ScheduleKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        nested_rule = NESTED_RULES.get(target.kind.name)
        mod = mod.clone()
        for gv, func in list(_unscheduled_prim_funcs(mod)):
            if not is_nested_kernel(func) or nested_rule is None:
                continue
            scheduled = nested_rule(func, target)
            if scheduled is not None:
                # the compiled symbol follows the (unique) GlobalVar, whatever the rule copied
                mod[gv] = scheduled.with_attr(IS_SCHEDULED, True).with_attr("global_symbol", gv.name_hint)
        dense = _dense_rule(target)
        for gv, func in list(_unscheduled_prim_funcs(mod)):
            if not is_nested_kernel(func):
                scheduled = dense(func)
                if scheduled is not None:
                    mod[gv] = scheduled
        return mod

    return _pass


def ReportUnscheduled(target) -> tvm.transform.Pass:
    """Warn (CPU) or raise (GPU) naming the functions no rule scheduled; the module is unchanged.

    Functions without blocks (hand-written loops: the rerouting clock and rule) need no schedule.
    """
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.ReportUnscheduled")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        left = sorted(gv.name_hint for gv, func in _unscheduled_prim_funcs(mod) if has_blocks(func))
        if not left:
            return mod
        nested = [name for name in left if is_nested_kernel(mod[name])]
        msg = (
            f"no {target.kind.name} schedule for {len(left)} function(s) ({len(nested)} nested "
            f"kernels): {', '.join(left[:12])}{' ...' if len(left) > 12 else ''}"
        )
        if target.kind.name != "llvm":
            raise RuntimeError(msg)
        warnings.warn(msg + " (they run as plain loops)", stacklevel=2)
        return mod

    return _pass


__all__ = ["NESTED_RULES", "ApplyTuningLog", "ReportUnscheduled", "ScheduleKernels"]
