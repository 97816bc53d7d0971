"""LevelGuard: ``main`` refuses a level outside ``0..L-1`` before any kernel runs.

Run after ``LowerNestedLayers`` (it reads ``num_levels`` from the module's ``nested.info`` attr, or
takes it as an argument). The check is compiled into the module, so a caller that bypasses the
Python runtime (a raw VM call, an RPC client) still gets an error, never an out-of-range read.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

INFO_ATTR = "nested.info"


def num_levels_from_attrs(mod: tvm.IRModule) -> int | None:
    attrs = mod.attrs
    if attrs is None or INFO_ATTR not in attrs:
        return None
    return int(json.loads(str(attrs[INFO_ATTR]))["num_levels"])


def _guarded(func: relax.Function, num_levels: int) -> relax.Function:
    level = next((p for p in func.params if p.name == "level"), None)
    if level is None:
        return func
    dtype = level.ty.dtype.dtype if hasattr(level.ty.dtype, "dtype") else str(level.ty.dtype)
    if len(level.ty.shape) != 0 or not dtype.startswith(("int", "uint")):
        raise ValueError(f"input 'level' must be a 0-d integer tensor, got {level.ty}")
    lo = relax.op.greater_equal(level, relax.const(0, dtype))
    hi = relax.op.less(level, relax.const(num_levels, dtype))
    ok = relax.Var("level_in_range", relax.TensorType((), "bool"))
    check = relax.op.assert_op(ok, [level], format=f"level {{}} is out of range: this model has levels 0..{num_levels - 1}")
    checked = relax.Var("level_checked", relax.TupleType([]))
    lo_v = relax.Var("level_ge_0", relax.TensorType((), "bool"))
    hi_v = relax.Var("level_lt_L", relax.TensorType((), "bool"))
    guard = relax.BindingBlock([
        relax.VarBinding(lo_v, lo),
        relax.VarBinding(hi_v, hi),
        relax.VarBinding(ok, relax.op.logical_and(lo_v, hi_v)),
        relax.VarBinding(checked, check),
    ])
    body = func.body
    new_body = relax.SeqExpr([guard, *body.blocks], body.body)
    return relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)


def LevelGuard(num_levels: int | None = None) -> tvm.transform.Pass:  # noqa: N802 (TVM pass naming)
    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.LevelGuard")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        n = num_levels if num_levels is not None else num_levels_from_attrs(mod)
        if n is None or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        gv = mod.get_global_var("main")
        mod = mod.clone() if hasattr(mod, "clone") else mod
        mod[gv] = _guarded(mod[gv], n)
        return relax.transform.Normalize()(mod)

    return _pass
