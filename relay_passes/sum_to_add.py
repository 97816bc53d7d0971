"""SumToAdd: the Relax ONNX frontend's spelling of ONNX ``Sum`` becomes plain ``add``s.

TVM 0.27 imports ``Sum(a, b, ...)`` as ``sum(stack([broadcast_to(a, S), broadcast_to(b, S), ...],
axis=0), axis=[0])``: a copy of every input into a stacked tensor, then a reduction. ResNet-style
ONNX models write their residual adds this way, so without this pass the adds cost a stack copy
each and cannot be fused into the convolution before them (``FuseEpilogue`` matches ``add``).
When every input already has the shape ``S`` (the broadcasts are no-ops) the sum becomes
``add(add(a, b), ...)``; anything else is left as it is. Run before ``FuseEpilogue``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .match import binding_value, is_call


def _shape(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(s) for s in ty.shape)
    except TypeError:  # symbolic dimensions
        return None


def _axes(attr) -> list[int] | None:
    return None if attr is None else [int(a) for a in attr]


def _addends(value, var2val):
    """The inputs of a stacked sum over axis 0 whose broadcasts are no-ops, else None."""
    if not is_call(value, "relax.sum") or _axes(value.attrs.axis) != [0] or value.attrs.keepdims:
        return None
    stacked = binding_value(value.args[0], var2val)
    if not is_call(stacked, "relax.stack") or int(stacked.attrs.axis) != 0:
        return None
    fields = binding_value(stacked.args[0], var2val)
    if not isinstance(fields, relax.Tuple) or len(fields.fields) < 2:
        return None
    out = _shape(value)
    addends = []
    for f in fields.fields:
        inner = binding_value(f, var2val)
        src = inner.args[0] if is_call(inner, "relax.broadcast_to") else f
        if out is None or _shape(src) != out:
            return None
        addends.append(src)
    return addends


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, var2val):
        super().__init__(mod)
        self.var2val = var2val

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        addends = _addends(binding.value, self.var2val)
        if addends is None:
            super().visit_var_binding_(binding)
            return
        total = self.visit_expr(addends[0])
        for a in addends[1:-1]:
            total = self.builder_.emit(relax.op.add(total, self.visit_expr(a)))
        value = relax.op.add(total, self.visit_expr(addends[-1]))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))


def SumToAdd() -> tvm.transform.Pass:
    """Stacked sums of same-shaped inputs -> adds (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.SumToAdd")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        changed = False
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            var2val = relax.analysis.get_var2val(func)
            if not any(_addends(v, var2val) for v in var2val.values()):
                continue
            rewriter = _Rewriter(mod, var2val)
            new = rewriter.visit_expr(func)
            mod = rewriter.builder_.get()
            mod[gv] = new
            changed = True
        return relax.transform.DeadCodeElimination()(mod) if changed else mod

    return _pass


__all__ = ["SumToAdd"]
