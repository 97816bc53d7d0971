"""NormalizeTakeIndices: constant negative indices of ``take`` made non-negative.

TVM 0.27's PyTorch frontend imports ``x[-1]`` (``aten.select`` with a negative index, everywhere in
recurrent models: the last time step) as ``take(x, -1, axis, mode="fast")``, and "fast" reads
``x[-1]`` out of bounds instead of the last element: the compiled model returns garbage. For a
constant integer index the pass adds the axis' extent to its negative entries (what PyTorch means),
so every mode reads in bounds; other ``take``s are left as they are. Run first: it is a frontend fix.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import Constant, const_numpy


def _fixed_index(call) -> relax.Expr | None:
    """The normalised index constant of a ``take`` call, or None when there is nothing to fix."""
    data, index = call.args
    if not isinstance(index, Constant) or not isinstance(data.ty, relax.TensorType) or data.ty.shape is None:
        return None
    idx = const_numpy(index)
    if idx.dtype.kind not in "iu" or not (idx < 0).any():
        return None
    axis = int(call.attrs.axis) if call.attrs.axis is not None else None
    try:
        extent = int(data.ty.shape[axis]) if axis is not None else int(np.prod([int(s) for s in data.ty.shape]))
    except TypeError:  # a symbolic extent: nothing to add
        return None
    if (idx < -extent).any():
        return None  # out of range in PyTorch too: leave it for the runtime to report
    return relax.const(np.asarray(np.where(idx < 0, idx + extent, idx), dtype=idx.dtype), str(idx.dtype))


@mutator
class _Rewriter(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"):
            return call
        index = _fixed_index(call)
        if index is None:
            return call
        return relax.Call(call.op, [call.args[0], index], call.attrs, call.ty_args)


def NormalizeTakeIndices() -> tvm.transform.Pass:
    """Make constant negative ``take`` indices non-negative (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.NormalizeTakeIndices")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


__all__ = ["NormalizeTakeIndices"]
