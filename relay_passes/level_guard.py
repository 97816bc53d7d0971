"""LevelGuard: ``main`` refuses a level outside ``0..L-1`` before any kernel runs.

Run after ``LowerNestedLayers`` (it reads ``num_levels`` from the module's ``nested.info`` attr, or
takes it as an argument). The check is compiled into the module, so a caller that bypasses the
Python runtime (a raw VM call, an RPC client) still gets an error, never an out-of-range read.

A module whose ``main`` has no ``level`` input has no knob to guard: that is only valid when no
nested layer was lowered (``ValueError`` otherwise); it is returned unchanged.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from ..contract import INFO_ATTR, LEVEL, dtype_of


def read_num_levels(mod: tvm.IRModule) -> int | None:
    """L from the module's ``nested.info`` attr (None before ``LowerNestedLayers``)."""
    attrs = mod.attrs
    if attrs is None or INFO_ATTR not in attrs:
        return None
    return int(json.loads(str(attrs[INFO_ATTR]))["num_levels"])


def guard_function(func: relax.Function, num_levels: int) -> relax.Function:
    """``func`` with the range check of its ``level`` parameter before its body."""
    level = next((p for p in func.params if p.name == LEVEL), None)
    if level is None:
        raise ValueError(f"the function has no {LEVEL!r} parameter to guard")
    dtype = dtype_of(level)
    if len(level.ty.shape) != 0 or not dtype.startswith(("int", "uint")):
        raise ValueError(f"input 'level' must be a 0-d integer tensor, got {level.ty}")
    lo = relax.op.greater_equal(level, relax.const(0, dtype))
    hi = relax.op.less(level, relax.const(num_levels, dtype))
    ok = relax.Var("level_in_range", relax.TensorType((), "bool"))
    check = relax.op.assert_op(
        ok, [level], format=f"level {{}} is out of range: this model has levels 0..{num_levels - 1}"
    )
    checked = relax.Var("level_checked", relax.TupleType([]))
    lo_v = relax.Var("level_ge_0", relax.TensorType((), "bool"))
    hi_v = relax.Var("level_lt_L", relax.TensorType((), "bool"))
    guard = relax.BindingBlock(
        [
            relax.VarBinding(lo_v, lo),
            relax.VarBinding(hi_v, hi),
            relax.VarBinding(ok, relax.op.logical_and(lo_v, hi_v)),
            relax.VarBinding(checked, check),
        ]
    )
    body = func.body
    new_body = relax.SeqExpr([guard, *body.blocks], body.body)
    # impure: the assert may raise (a function annotated pure may not hold an impure call)
    return relax.Function(func.params, new_body, func.ret_ty, False, func.attrs, func.span)


def LevelGuard(num_levels: int | None = None) -> tvm.transform.Pass:
    """Guard ``main``'s level (see the module docstring); ``num_levels`` overrides the attr."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.LevelGuard")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        n = num_levels if num_levels is not None else read_num_levels(mod)
        if n is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod  # nothing lowered: no levels to guard
        gv = mod.get_global_var("main")
        if not any(p.name == LEVEL for p in mod[gv].params):
            info = json.loads(str(mod.attrs[INFO_ATTR])) if num_levels is None else {"layers": [1]}
            if info.get("layers"):
                raise ValueError(f"main has nested layers but no {LEVEL!r} input to guard")
            return mod
        mod = mod.clone()
        mod[gv] = guard_function(mod[gv], n)
        return relax.transform.Normalize()(mod)

    return _pass


__all__ = ["LevelGuard", "guard_function", "read_num_levels"]
