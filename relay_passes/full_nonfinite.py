"""BroadcastNonFiniteFull: ``full`` / ``full_like`` of an infinite or NaN value as a broadcast constant.

TVM 0.27 cannot legalize ``full(shape, -inf)``: its ``topi.full`` checks ``"float" in dtype`` on a
``PrimType`` and raises ``TypeError: argument of type 'PrimType' is not iterable`` (in ``FoldConstant``
as in ``LegalizeOps``). Causal attention masks are written exactly so
(``torch.triu(torch.full((T, T), float("-inf")), 1)``). The pass rewrites such a call, with a static
shape, into ``broadcast_to(const(value, dtype), shape)``: the same tensor, legalized without
``topi.full``. Other ``full`` calls are left as they are. Run first: it is a frontend fix.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import Constant, const_numpy, dtype_of


def _non_finite(value) -> float | None:
    if not isinstance(value, Constant) or not isinstance(value.ty, relax.TensorType) or value.ty.ndim != 0:
        return None
    v = float(const_numpy(value))
    return None if math.isfinite(v) else v


def _static_shape(ty) -> list[int] | None:
    try:
        return [int(s) for s in ty.shape]
    except (TypeError, AttributeError):
        return None


@mutator
class _Rewriter(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in ("relax.full", "relax.full_like"):
            return call
        value, shape = _non_finite(call.args[1]), _static_shape(call.ty)
        if value is None or shape is None:
            return call
        return relax.op.broadcast_to(relax.const(value, dtype_of(call)), relax.ShapeExpr(shape))


def BroadcastNonFiniteFull() -> tvm.transform.Pass:
    """Rewrite ``full`` of an infinite / NaN value into a broadcast constant (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.BroadcastNonFiniteFull")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


__all__ = ["BroadcastNonFiniteFull"]
