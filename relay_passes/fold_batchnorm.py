"""FoldBatchNorm: inference BatchNorm after a conv2d folded into the conv's weight and bias.

Run after ``FoldConstant`` (the BatchNorm statistics and the conv bias must be constants; a bias
behind a ``reshape`` of a constant is read through it) and before ``LowerNestedLayers`` (it packs
the folded weight).

Matches ``batch_norm(conv2d(x, W_eff) [+ b], gamma, beta, mean, var)[0]`` with ``training=False``,
``axis=1`` and NCHW/OIHW layouts, where ``b`` (either side of the add) is a per-output-channel
constant and ``W_eff`` is

* a constant ``W`` (plain dense conv), or
* a nested masked weight ``W * mask`` / ``mask * W`` / ``where(cond, W, 0)`` with ``W`` constant.

With ``s = gamma / sqrt(var + eps)`` it becomes ``conv2d(x, W_eff') + b'`` where ``W'`` is ``W``
scaled by ``s`` per output channel inside the same mask expression (a mask commutes with a
per-channel scale, so the nested structure is kept for ``LowerNestedLayers``) and
``b' = (b - mean) * s + beta`` (shape ``[1, O, 1, 1]``). Anything else is left as is.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

from ..contract import Constant, const_numpy, dtype_of
from .match import binding_value, constant_of, is_call

_x, _w, _b = wildcard(), wildcard(), wildcard()
_conv = is_op("relax.nn.conv2d")(_x, _w)
_biased = is_op("relax.add")(_conv, _b) | is_op("relax.add")(_b, _conv) | _conv
_gamma, _beta, _mean, _var = is_const(), is_const(), is_const(), is_const()
_bn = is_op("relax.nn.batch_norm")(_biased, _gamma, _beta, _mean, _var)
PATTERN = is_tuple_get_item(_bn, 0)


def _scaled_weight(w_value, scale: np.ndarray, var2val):
    """``w_value`` with its constant weight scaled per output channel, the mask untouched; or None."""

    def scaled(c):
        arr = const_numpy(c)
        if arr.ndim != 4 or arr.shape[0] != scale.size:
            return None
        return relax.const((arr.astype(np.float64) * scale[:, None, None, None]).astype(arr.dtype))

    if isinstance(w_value, Constant):
        return scaled(w_value)
    if is_call(w_value, "relax.multiply"):
        a, b = w_value.args
        for i, arg in enumerate((a, b)):
            c = binding_value(arg, var2val)
            if isinstance(c, Constant) and (new := scaled(c)) is not None:
                return relax.op.multiply(new, b) if i == 0 else relax.op.multiply(a, new)
        return None
    if is_call(w_value, "relax.where"):
        cond, c, zero = w_value.args
        c = binding_value(c, var2val)
        if isinstance(c, Constant) and (new := scaled(c)) is not None:
            return relax.op.where(cond, new, zero)
    return None


def _fold(call: relax.Expr, m: dict, var2val) -> relax.Expr:
    bn = m[_bn]
    conv = m[_conv]
    a, ca = bn.attrs, conv.attrs
    if bool(getattr(a, "training", False)) or int(a.axis) != 1:
        return call
    if (str(ca.data_layout), str(ca.kernel_layout), str(ca.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return call
    if dtype_of(conv) != "float32":
        return call
    O = int(conv.ty.shape[1])
    stats = [const_numpy(m[p]).astype(np.float64) for p in (_gamma, _beta, _mean, _var)]
    if any(s.shape != (O,) for s in stats):
        return call
    gamma, beta, mean, var = stats
    scale = (gamma if a.scale else np.ones(O)) / np.sqrt(var + float(a.epsilon))
    shift = beta if a.center else np.zeros(O)

    bias = np.zeros(O)
    if _b in m:
        b = constant_of(m[_b], var2val)
        if b is None or b.size != O or (b.ndim > 1 and b.shape != (1, O, 1, 1)[4 - b.ndim :]):
            return call
        bias = b.reshape(-1).astype(np.float64)

    new_w = _scaled_weight(binding_value(conv.args[1], var2val), scale, var2val)
    if new_w is None:
        return call
    new_bias = ((bias - mean) * scale + shift).astype(np.float32).reshape(1, O, 1, 1)
    new_conv = relax.Call(conv.op, [conv.args[0], new_w], conv.attrs)
    return relax.op.add(new_conv, relax.const(new_bias))


def FoldBatchNorm() -> tvm.transform.Pass:
    """Fold inference BatchNorm into the conv2d before it (dense or nested); see the module docstring.

    Run after ``FoldConstant``, before ``LowerNestedLayers``.
    """

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.FoldBatchNorm")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        changed = False
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            var2val = relax.analysis.get_var2val(func)
            new = rewrite_call(PATTERN, lambda call, m, var2val=var2val: _fold(call, m, var2val), func)
            if not new.same_as(func):
                updates[gv] = new
                changed = True
        if not changed:
            return mod
        mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, new in updates.items():
            mod[gv] = new
        return relax.transform.DeadCodeElimination()(mod)

    return _pass
