"""LowerNestedLayers: nested conv2d / conv1d / linear / matmul -> ``call_tir`` of a packed sparse kernel.

Run after ``FoldConstant`` and ``FoldBatchNorm`` (the weight packed is the one after folding; the
pass also matches unfolded casts of the level map). Every nested layer (``relay_passes.match`` lists
the spellings) is packed once with ``NestedCSR.pack`` at the model's L (one more than the largest
value of *every* level map in the module), and replaced by

    call_tir(nested_conv2d | nested_linear, [x, *fmt.arrays(), bias?, level_i32], out_ty)

where ``level_i32`` is the compared level (cast to int32 when it is not). A per-output-channel
constant bias add right after the layer is fused into the kernel's bias; a rank > 2 linear input is
reshaped to 2-D around the call, a conv1d input to height 1; a layer pruned at every level becomes
zeros (plus its bias), without a kernel. Non-nested layers are untouched; nested ones no kernel
serves (layout, dtype), and masked weights that feed anything else (conv3d, a transposed conv),
stay dense with a ``NestedLoweringWarning`` naming them; malformed ones raise ``ValueError``.

A weight used by several layers (a recurrent matrix at every time step, a layer called twice) is
packed once: its call sites share the packed constants (one object each, so the compiled module
stores them once), and those of one shape share one kernel. ``nested.info`` lists it once, with
the number of call sites in ``calls``.

The module gets the attr ``nested.info`` (``INFO_ATTR``): a JSON string
``{"num_levels", "format_version", "layers": [{"name", "op", "rows", "cols", "nnz": [per level],
"payload_bytes", "csr_bytes", "dense_bytes", "calls", "kernel"}]}``, one record per weight; read it
back with ``read_nested_info(mod)``.
A module without nested layers is returned unchanged (no attr).
"""

from __future__ import annotations

import json
import math
import warnings

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..contract import FORMAT_VERSION, INFO_ATTR, dtype_of
from ..schedules.format import NestedCSR, csr_nbytes
from ..schedules.kernel import kernel
from ..schedules.spec import Conv2dSpec, Epilogue, LinearSpec, Packed
from .match import NestedLayer, find_nested_layers


class NestedLoweringWarning(UserWarning):
    """A nested layer left dense (no kernel serves its layout / dtype)."""


def add_kernel(bb: relax.BlockBuilder, func, name: str) -> tvm.ir.GlobalVar:
    """Add a nested kernel under a fresh name, compiled to that symbol, never merged with another.

    ``BlockBuilder.add_func`` returns the existing GlobalVar for a structurally equal function, and
    two weights of one shape and count of non-zeros have equal kernels; but a nested kernel stands for
    one weight (``SpecializeKernels`` re-packs the constants of a kernel's call sites for it), so
    each weight keeps a kernel of its own.
    """
    taken = {gv.name_hint for gv in bb.get().get_global_vars()}
    fresh, i = name, 0
    while fresh in taken:
        i += 1
        fresh = f"{name}{i}"
    return bb.add_func(func.with_attr("global_symbol", fresh), fresh)


def read_nested_info(mod: tvm.IRModule) -> dict | None:
    """The ``nested.info`` record of a lowered module, or None."""
    if mod.attrs is None or INFO_ATTR not in mod.attrs:
        return None
    return json.loads(str(mod.attrs[INFO_ATTR]))


class _Weight:
    """One packed weight: its format, its constants (shared by every call site) and its record."""

    def __init__(self, fmt: NestedCSR, consts: list, record: dict):
        self.fmt, self.consts, self.record = fmt, consts, record


class _Plan:
    """How one call site is lowered: its weight and its kernel (None when pruned everywhere)."""

    def __init__(self, layer: NestedLayer, weight: _Weight, gv):
        self.layer, self.weight, self.gv = layer, weight, gv


def _spec(layer: NestedLayer, fmt):
    """The kernel spec of a layer: its geometry, its packed operands, its bias as the epilogue."""
    epi = Epilogue(bias=layer.bias is not None)
    if layer.is_conv:
        c = layer.conv
        return Conv2dSpec(
            Packed.of(fmt), c["x_shape"], c["kernel_size"], c["strides"], c["padding"], c["dilation"], c["groups"], epi
        )
    return LinearSpec(Packed.of(fmt), _batch(layer), epi)


def _batch(layer: NestedLayer) -> int:
    return int(math.prod(layer.out_shape[:-1]))


def _info_record(layer: NestedLayer, fmt, num_levels: int) -> dict:
    return {
        "name": layer.name,
        "op": layer.op,
        "rows": layer.rows,
        "cols": layer.cols,
        "nnz": [int(fmt.nnz(lvl)) for lvl in range(num_levels)],
        "payload_bytes": int(fmt.nbytes),
        "csr_bytes": int(csr_nbytes(layer.level_map2d)),
        "dense_bytes": int(layer.rows * layer.cols * 4),
        "calls": 1,
    }


@mutator
class _Lowerer(PyExprMutator):
    """Replaces the value of each planned binding; everything else is copied."""

    def __init__(self, mod: tvm.IRModule, plans: dict):
        super().__init__(mod)
        self.plans = plans
        self._level_i32 = {}  # level var -> its int32 cast, emitted once per block
        self._biases = {}  # bias bytes -> one constant, shared by the call sites of one weight

    def visit_binding_block_(self, block):
        self._level_i32 = {}
        return super().visit_binding_block_(block)

    def visit_dataflow_block_(self, block):
        self._level_i32 = {}
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        value = self.builder_.normalize(self._lowered(plan))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _lowered(self, plan: _Plan) -> relax.Expr:
        layer = plan.layer
        out_ty = relax.TensorType(layer.out_shape, "float32")
        bias = None if layer.bias is None else self._bias(layer.bias)
        if plan.gv is None:  # pruned at every level: no kernel
            if bias is None:
                return relax.op.zeros(relax.ShapeExpr(layer.out_shape), "float32")
            shape = (layer.rows,) + (1,) * (len(layer.out_shape) - 2) if layer.is_conv else (layer.rows,)
            bias = relax.const(layer.bias.reshape(shape))
            return relax.op.broadcast_to(bias, relax.ShapeExpr(layer.out_shape))

        x = self.visit_expr(layer.x)
        level = self.visit_expr(layer.level)
        if dtype_of(level) != "int32":
            if level not in self._level_i32:
                self._level_i32[level] = self.builder_.emit(relax.op.astype(level, "int32"))
            level = self._level_i32[level]
        args = [x, *plan.weight.consts, *([bias] if bias is not None else []), level]
        if layer.op == "conv2d" or (layer.op == "linear" and len(layer.out_shape) == 2):
            return relax.call_tir(plan.gv, args, out_ty=out_ty)
        if layer.op == "conv1d":  # (N, C, L) -> (N, C, 1, L) -> kernel -> (N, O, 1, OL) -> (N, O, OL)
            n, o, ol = layer.out_shape
            args[0] = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr(layer.conv["x_shape"])))
            out4d = self.builder_.emit(relax.call_tir(plan.gv, args, out_ty=relax.TensorType((n, o, 1, ol), "float32")))
            return relax.op.reshape(out4d, relax.ShapeExpr(layer.out_shape))
        batch = _batch(layer)  # rank > 2 input: (..., cols) -> (batch, cols) -> kernel -> (..., rows)
        args[0] = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr((batch, layer.cols))))
        out2d = self.builder_.emit(
            relax.call_tir(plan.gv, args, out_ty=relax.TensorType((batch, layer.rows), "float32"))
        )
        return relax.op.reshape(out2d, relax.ShapeExpr(layer.out_shape))

    def _bias(self, bias) -> relax.Constant:
        key = bias.tobytes()
        if key not in self._biases:
            self._biases[key] = relax.const(bias)
        return self._biases[key]


def _lower_module(mod: tvm.IRModule) -> tvm.IRModule:
    found: list[tuple[tvm.ir.GlobalVar, list[NestedLayer]]] = []
    tops = []  # the largest level of every nested level map, lowered or left dense
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        layers, dense = find_nested_layers(func)
        for e in dense:
            warnings.warn(f"{gv.name_hint}: {e}", NestedLoweringWarning, stacklevel=3)
            tops.append(e.level_top if e.level_top is not None else -1)
        if layers:
            found.append((gv, layers))
    if not found:
        return mod

    everything = [layer for _, layers in found for layer in layers]
    tops += [int(layer.level_map2d.max()) for layer in everything]
    num_levels = max(1, max(tops) + 1)

    lowerer = _Lowerer(mod, {})
    weights: dict = {}  # weight_key -> _Weight: one packing per weight, whatever its call sites
    kernels: dict = {}  # (weight_key, spec) -> GlobalVar: call sites of one weight and shape share a kernel
    for layer in everything:
        weight = weights.get(layer.weight_key)
        if weight is None:
            fmt = NestedCSR.pack(layer.weight2d, layer.level_map2d, num_levels)
            record = _info_record(layer, fmt, num_levels)
            record["kernel"] = None  # build records its choice
            weight = weights[layer.weight_key] = _Weight(fmt, [relax.const(a) for a in fmt.arrays()], record)
        else:
            weight.record["calls"] += 1
        gv = None
        if weight.fmt.nnz(0) > 0:
            spec = _spec(layer, weight.fmt)
            gv = kernels.get((layer.weight_key, spec))
            if gv is None:
                func = kernel(spec)
                gv = add_kernel(lowerer.builder_, func, f"nested_{'conv2d' if layer.is_conv else 'linear'}")
                kernels[(layer.weight_key, spec)] = gv
            weight.record["kernel"] = weight.record["kernel"] or gv.name_hint
        lowerer.plans[layer.var] = _Plan(layer, weight, gv)
    records = [w.record for w in weights.values()]

    for gv, _ in found:
        new_func = lowerer.visit_expr(mod[gv])
        lowerer.builder_.update_func(gv, new_func)
    out = relax.transform.DeadCodeElimination()(lowerer.builder_.get())
    info = {"num_levels": num_levels, "format_version": int(FORMAT_VERSION), "layers": records}
    return out.with_attr(INFO_ATTR, json.dumps(info))


def LowerNestedLayers() -> tvm.transform.Pass:
    """Lower every nested layer to a packed sparse kernel taking the level at run time.

    Run after ``FoldConstant`` and ``FoldBatchNorm``. See the module docstring for the contract.
    """

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.LowerNestedLayers")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _lower_module(mod)

    return _pass
