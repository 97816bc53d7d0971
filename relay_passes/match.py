"""Recognition of nested sparse layers in a Relax function (shared by the graph passes).

A nested layer (DESIGN section 2) is a conv2d, a conv1d or a matmul whose weight operand is the
masked weight ``W * (LM >= level)``. The Relax frontends spell it many ways; the patterns below say
them all:

* the mask: ``astype(greater_equal(LM, level))`` or ``astype(less_equal(level, LM))`` (one or two
  casts), multiplied with ``W`` on either side; or ``where(cond, W, 0)`` with a scalar zero constant,
  ``zeros(..)``, ``full(.., 0)`` or ``full_like(.., 0)``;
* ``LM`` may sit behind casts (``astype(LM)``), ``level`` too (``astype(level)``);
* the layer: ``conv2d(x, W_eff)``; ``conv1d(x, W_eff)`` (lowered as a conv2d of height 1);
  ``matmul(x, permute_dims(W_eff))`` (nn.Linear, ONNX Gemm with transB=1: W is ``[rows, cols]``);
  ``matmul(x, W_eff)`` (ONNX MatMul / Gemm transB=0: W is ``[cols, rows]``, packed transposed);
  either with the weight broadcast over the input's batch dims (``broadcast_to``: torch.export's
  decomposition of a linear over a non-contiguous 3-D input).

One weight may feed several layers (a recurrent matrix at every time step, a shared layer): each
call is a ``NestedLayer``, and ``weight_key`` (the weight and level-map constants, the packing)
says which of them share one packed weight. A masked weight that feeds anything else (a conv3d,
a transposed conv, a slice of it) is reported as ``Unsupported``: it would be computed densely.

Matching is declarative (``tvm.relax.dpl``) and runs through dataflow bindings. What a pattern cannot
say is checked here in code, in three outcomes:

* not a nested layer (``level`` is not a function parameter, the ``where`` fallback is not zero): ``None``;
* a nested layer TVM kernels cannot serve (layout, dtype, dynamic shape): ``Unsupported`` (the pass warns);
* a malformed nested layer (level map not a constant integer tensor of the weight's shape, weight not a
  constant): ``ValueError`` naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from ..contract import Constant, const_numpy, dtype_of
from ..schedules.format import check_level_values

# ---------------------------------------------------------------------------------------- patterns
_lm = wildcard()
_level = wildcard()
_cmp = is_op("relax.greater_equal")(_lm, _level) | is_op("relax.less_equal")(_level, _lm)
_mask = is_op("relax.astype")(_cmp) | is_op("relax.astype")(is_op("relax.astype")(_cmp))
_w = wildcard()
_zero = wildcard()
_masked_w = (
    is_op("relax.multiply")(_w, _mask) | is_op("relax.multiply")(_mask, _w) | is_op("relax.where")(_cmp, _w, _zero)
)
_x = wildcard()
CONV2D = is_op("relax.nn.conv2d")(_x, _masked_w)
CONV1D = is_op("relax.nn.conv1d")(_x, _masked_w)
LINEAR = is_op("relax.matmul")(_x, is_op("relax.permute_dims")(_masked_w))  # W: [rows, cols]
MATMUL = is_op("relax.matmul")(_x, _masked_w)  # W: [cols, rows]
# torch.export's matmul decomposition (a linear over a non-contiguous 3-D input) broadcasts the weight
_bcast = is_op("relax.broadcast_to")
LINEAR_BCAST = is_op("relax.matmul")(_x, _bcast(is_op("relax.permute_dims")(_masked_w), wildcard()))
MATMUL_BCAST = is_op("relax.matmul")(_x, _bcast(_masked_w, wildcard()))
_LAYER_PATTERNS = (
    ("conv2d", CONV2D),
    ("conv1d", CONV1D),
    ("linear", LINEAR),
    ("linear", LINEAR_BCAST),
    ("matmul", MATMUL),
    ("matmul", MATMUL_BCAST),
)
_LAYER_OPS = ("relax.nn.conv2d", "relax.nn.conv1d", "relax.matmul")
_CONV_LAYOUTS = {"conv2d": ("NCHW", "OIHW", "NCHW"), "conv1d": ("NCW", "OIW", "NCW")}

_FLOAT_OK = ("float32",)


class Unsupported(Exception):
    """A nested layer that stays dense (the pass warns with this message).

    ``level_top`` is the largest value of its level map (it still counts towards the model's L).
    """

    def __init__(self, message: str, level_top: int | None = None):
        super().__init__(message)
        self.level_top = level_top


@dataclass
class NestedLayer:
    """One recognised nested layer; ``var`` is the binding whose value the pass replaces."""

    name: str  # "conv2d_0 (lv3)": op, position among the module's nested layers, Relax var
    op: str  # "conv2d" | "conv1d" | "linear"
    var: relax.Var
    call: relax.Call  # the conv2d / matmul call as bound (its args are the original vars)
    x: relax.Expr
    level: relax.Expr  # the level as compared by the mask (a var or the parameter)
    weight2d: np.ndarray  # float32 [rows, cols]
    level_map2d: np.ndarray  # int [rows, cols]
    out_shape: tuple[int, ...]
    bias: np.ndarray | None = None  # float32 [rows], fused from a following add
    conv: dict = field(default_factory=dict)  # conv2d geometry for the kernel factory (conv1d: height 1)
    weight_key: tuple = ()  # (weight constant, level-map constant, packing): equal keys share one packed weight

    @property
    def is_conv(self) -> bool:
        return self.op in ("conv2d", "conv1d")

    @property
    def rows(self) -> int:
        return int(self.weight2d.shape[0])

    @property
    def cols(self) -> int:
        return int(self.weight2d.shape[1])


# ------------------------------------------------------------------------------------- helpers
def binding_value(expr, var2val):
    """Follow variables to the expression bound to them."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr


def is_call(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _strip_casts(expr, var2val):
    expr = binding_value(expr, var2val)
    while is_call(expr, "relax.astype"):
        expr = binding_value(expr.args[0], var2val)
    return expr


def _is_int(expr) -> bool:
    return dtype_of(expr).startswith(("int", "uint"))


def _static_shape(expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except TypeError:
        return None


def _is_zero(expr, var2val) -> bool:
    """A zero fallback of ``where``: a zero constant, zeros(..), full(.., 0) or full_like(.., 0)."""
    expr = _strip_casts(expr, var2val)
    if isinstance(expr, Constant):
        return not np.any(const_numpy(expr))
    if is_call(expr, "relax.zeros") or is_call(expr, "relax.zeros_like"):
        return True
    if is_call(expr, "relax.full") or is_call(expr, "relax.full_like"):
        return _is_zero(expr.args[1], var2val)
    return False


def constant_of(expr, var2val) -> np.ndarray | None:
    """The NumPy value of ``expr`` if it is a constant, possibly behind bindings and reshapes."""
    expr = binding_value(expr, var2val)
    while is_call(expr, "relax.reshape"):
        expr = binding_value(expr.args[0], var2val)
    return const_numpy(expr) if isinstance(expr, Constant) else None


def level_param(level_expr, params, var2val):
    """The function parameter behind the compared level (through casts), or None."""
    root = _strip_casts(level_expr, var2val)
    if isinstance(root, relax.Var) and any(root.same_as(p) for p in params):
        return root
    return None


# ---------------------------------------------------------------------------------- recognition
def match_layer(value, label: str, params, var2val, val2var):
    """Recognise one bound value: a NestedLayer, or None; raises Unsupported / ValueError."""
    if not any(is_call(value, op) for op in _LAYER_OPS):
        return None
    for kind, pattern in _LAYER_PATTERNS:  # noqa: B007 (the matched kind is used below)
        m = pattern.extract_matched_expr(value, var2val)
        if m is not None:
            break
    else:
        return None

    # Is it nested at all? The compared level must be a 0-d integer function parameter.
    lvl_root = level_param(m[_level], params, var2val)
    if lvl_root is None or _static_shape(lvl_root) != () or not _is_int(lvl_root):
        return None
    if _zero in m and not _is_zero(m[_zero], var2val):
        return None

    op = kind if kind in _CONV_LAYOUTS else "linear"
    where = f"nested {op} {label}"
    w_expr = binding_value(m[_w], var2val)
    if not isinstance(w_expr, Constant):
        raise ValueError(
            f"{where}: the weight is not a constant; bind the parameters first "
            f"(e.g. from_exported_program without keep_params_as_input, or BindParams)"
        )
    lm_expr = _strip_casts(m[_lm], var2val)
    if not isinstance(lm_expr, Constant):
        raise ValueError(f"{where}: the level map is not a constant")
    W, LM = const_numpy(w_expr), const_numpy(lm_expr)
    if LM.dtype.kind not in "iu":
        raise ValueError(f"{where}: the level map is not an integer tensor (dtype {LM.dtype})")
    check_level_values(LM, where)  # in its own dtype: 2**32 in an int64 map is refused, not cast to 0
    if LM.shape != W.shape:
        raise ValueError(f"{where}: the level map shape {LM.shape} differs from the weight shape {W.shape}")

    top = int(LM.max()) if LM.size else -1

    # The level as compared, as a variable where one is bound to it.
    lvl = m[_level]
    lvl = val2var.get(lvl, lvl) if not isinstance(lvl, relax.Var) else lvl
    x = value.args[0]
    x_shape, out_shape = _static_shape(x), _static_shape(value)
    if x_shape is None or out_shape is None:
        raise Unsupported(f"{where}: dynamic shapes are not supported; left dense", top)
    for what, e in (("weight", w_expr), ("input", x), ("output", value)):
        if dtype_of(e) not in _FLOAT_OK:
            raise Unsupported(f"{where}: {what} dtype {dtype_of(e)} is not float32; left dense", top)

    layer = NestedLayer(label, op, None, value, x, lvl, None, None, out_shape, weight_key=(w_expr, lm_expr, kind))
    if kind in _CONV_LAYOUTS:
        a = value.attrs
        layouts, want = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)), _CONV_LAYOUTS[kind]
        if layouts != want:
            raise Unsupported(f"{where}: layout {'/'.join(layouts)} is not {'/'.join(want)}; left dense", top)
        if W.ndim != len(want[1]) or len(x_shape) != len(want[0]):
            raise Unsupported(f"{where}: not a {kind} over {want[0]} input; left dense", top)
        layer.weight2d = W.reshape(W.shape[0], -1).astype(np.float32)
        layer.level_map2d = LM.reshape(LM.shape[0], -1)
        geometry = dict(
            x_shape=x_shape,
            kernel_size=tuple(int(k) for k in W.shape[2:]),
            strides=tuple(int(s) for s in a.strides),
            padding=tuple(int(p) for p in a.padding),
            dilation=tuple(int(d) for d in a.dilation),
        )
        if kind == "conv1d":  # a conv2d of height 1: (N, C, L) -> (N, C, 1, L); padding (left, right)
            (left, right), g = geometry["padding"], geometry
            geometry = dict(
                x_shape=(x_shape[0], x_shape[1], 1, x_shape[2]),
                kernel_size=(1, *g["kernel_size"]),
                strides=(1, *g["strides"]),
                padding=(0, left, 0, right),
                dilation=(1, *g["dilation"]),
            )
        layer.conv = dict(geometry, groups=int(a.groups))
    else:
        if W.ndim != 2 or len(x_shape) < 2:
            raise Unsupported(f"{where}: only a 2-D weight with an input of rank >= 2 is supported; left dense", top)
        if kind == "linear":
            pd = binding_value(value.args[1], var2val)
            if is_call(pd, "relax.broadcast_to"):
                pd = binding_value(pd.args[0], var2val)
            axes = pd.attrs.axes
            if axes is not None and [int(i) for i in axes] != [1, 0]:
                return None
            W2, LM2 = W, LM
        else:  # matmul(x, W_eff) with W [cols, rows]: pack the transpose
            W2, LM2 = W.T, LM.T
        if x_shape[-1] != W2.shape[1] or out_shape[:-1] != x_shape[:-1]:
            raise Unsupported(
                f"{where}: input shape {x_shape} does not contract with weight {W2.shape} into {out_shape}; left dense",
                top,
            )
        layer.weight2d = np.ascontiguousarray(W2, dtype=np.float32)
        layer.level_map2d = np.ascontiguousarray(LM2)
    return layer


def _uses(func: relax.Function) -> dict:
    """How many bindings (and the function result) use each variable."""
    counts: dict = {}

    def count(expr):
        for v in relax.analysis.free_vars(expr):
            counts[v] = counts.get(v, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            count(b.value)
    count(func.body.body)
    return counts


def _per_channel_bias(add_value, layer_var, layer: NestedLayer, var2val) -> np.ndarray | None:
    """The bias of ``add(layer, b)`` / ``add(b, layer)`` when ``b`` is a per-output-channel constant."""
    a, b = add_value.args
    other = b if a.same_as(layer_var) else a if b.same_as(layer_var) else None
    if other is None or _static_shape(add_value) != layer.out_shape:
        return None
    if dtype_of(add_value) != "float32":
        return None
    arr, shape = constant_of(other, var2val), _static_shape(other)
    if arr is None or shape is None or arr.size != layer.rows:
        return None
    channel_axis = 1 if layer.is_conv else len(layer.out_shape) - 1
    want = [1] * len(layer.out_shape)
    want[channel_axis] = layer.rows
    # b (as added, after any reshape) broadcasts along the channel axis only: right-aligned, its
    # shape is a suffix of `want`
    if len(shape) > len(want) or list(shape) != want[len(want) - len(shape) :]:
        return None
    return arr.reshape(-1).astype(np.float32)


def _op_hint(value) -> str:
    for op in ("conv2d", "conv1d"):
        if is_call(value, f"relax.nn.{op}"):
            return op
    return "linear"


def _masked_weight(value, params, var2val):
    """The level-map top of a bound ``W * (LM >= level)`` (any spelling), or None when it is not one."""
    m = _masked_w.extract_matched_expr(value, var2val)
    if m is None or level_param(m[_level], params, var2val) is None:
        return None
    if _zero in m and not _is_zero(m[_zero], var2val):
        return None
    lm = constant_of(_strip_casts(m[_lm], var2val), var2val)
    if lm is None or lm.dtype.kind not in "iu":
        return None
    return int(lm.max()) if lm.size else -1


def _unlowered_masks(func, params, var2val, layer_vars) -> list[Unsupported]:
    """Masked weights that feed something other than a recognised layer (directly or transposed)."""
    users: dict = {}
    for var, value in var2val.items():
        for v in relax.analysis.free_vars(value):
            users.setdefault(v, []).append(var)

    def strays(var) -> list:
        out = []
        for u in users.get(var, []):
            if u in layer_vars:
                continue
            if is_call(var2val[u], "relax.permute_dims") or is_call(var2val[u], "relax.broadcast_to"):
                out += strays(u)
            else:
                out.append(u)
        return out

    found = []
    for var, value in var2val.items():
        top = _masked_weight(value, params, var2val)
        if top is None:
            continue
        bad = strays(var)
        if bad:
            what = ", ".join(
                f"{var2val[u].op.name if isinstance(var2val[u], relax.Call) else 'a value'} ({u.name})" for u in bad
            )
            shape = _static_shape(var)
            found.append(
                Unsupported(
                    f"masked weight {var.name} {list(shape) if shape else ''} feeds {what}: no nested kernel "
                    f"serves it, so it is computed densely at run time (nest a supported layer instead)",
                    top,
                )
            )
    return found


def find_nested_layers(func: relax.Function) -> tuple[list[NestedLayer], list[Unsupported]]:
    """Every nested layer of ``func`` (bias adds fused), and the nested layers and masked weights
    left dense."""
    var2val = relax.analysis.get_var2val(func)
    val2var = {v: k for k, v in var2val.items()}
    params = list(func.params)
    layers: dict = {}  # binding var -> NestedLayer
    ordered: list[NestedLayer] = []
    dense: list[Unsupported] = []
    matched = set()  # bindings recognised as nested layers, lowered or reported
    position = {"conv2d": 0, "conv1d": 0, "linear": 0}
    for block in func.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                continue
            op_hint = _op_hint(b.value)
            label = f"{op_hint}_{position[op_hint]} ({b.var.name})"
            try:
                layer = match_layer(b.value, label, params, var2val, val2var)
            except Unsupported as e:
                dense.append(e)
                matched.add(b.var)
                position[op_hint] += 1
                continue
            if layer is None:
                continue
            position[op_hint] += 1
            layer.var = b.var
            layers[b.var] = layer
            ordered.append(layer)
            matched.add(b.var)
    dense += _unlowered_masks(func, params, var2val, matched)

    # Fuse a following per-output-channel constant bias add into the layer (single use only).
    uses = _uses(func)
    for block in func.body.blocks:
        for b in block.bindings:
            if not (isinstance(b, relax.VarBinding) and is_call(b.value, "relax.add")):
                continue
            for arg in b.value.args:
                layer = layers.get(arg) if isinstance(arg, relax.Var) else None
                if layer is None or layer.bias is not None or uses.get(arg, 0) != 1:
                    continue
                bias = _per_channel_bias(b.value, arg, layer, var2val)
                if bias is not None:
                    del layers[arg]
                    layer.bias, layer.var = bias, b.var
                    layers[b.var] = layer
                    break
    return ordered, dense
