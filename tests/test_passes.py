"""LowerNestedLayers: every spelling of a nested layer, the negative and error cases, numerics.

Before modules are TVMScript (weights bound with BindParams) or built with a BlockBuilder from a
table of spellings; Expected modules are built with the same kernel factories. Numerics compare the
masked dense module (before) against the lowered one (after) at every level on seeded inputs.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import tvm
from nested_kernels import nested_conv2d, nested_linear
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.contract import FORMAT_VERSION, INFO_ATTR, Constant
from tvm_nested.relay_passes import (
    FoldBatchNorm,
    LowerNestedLayers,
    NestedLoweringWarning,
    read_nested_info,
)
from tvm_nested.schedules.format import NestedCSR, csr_nbytes

F32 = "float32"


# ----------------------------------------------------------------------------------------- helpers
def _functions_only(mod: tvm.IRModule) -> tvm.IRModule:
    """The module without its attrs (nested.info is checked on its own)."""
    return tvm.IRModule(dict(mod.functions_items()))


def _run(mod: tvm.IRModule, inputs, level: int, level_dtype: str):
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs], tvm.runtime.tensor(np.array(level, level_dtype)))
    if not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def _assert_same_at_every_level(before, after, inputs, num_levels, level_dtype="int64"):
    vms = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu()) for m in (before, after)]
    args = [tvm.runtime.tensor(a) for a in inputs]
    for lvl in range(num_levels):
        lv = tvm.runtime.tensor(np.array(lvl, level_dtype))
        outs = []
        for vm in vms:
            out = vm["main"](*args, lv)
            outs.append((out if hasattr(out, "numpy") else out[0]).numpy())
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5, err_msg=f"level {lvl}")


def _level_map(rng, shape, top=2):
    return rng.integers(-1, top + 1, shape).astype("int64")


def _kernel_call(bb, kernel, name, x, fmt, bias, level, out_ty):
    gv = bb.add_func(kernel, name)
    bb.update_func(gv, kernel.with_attr("global_symbol", gv.name_hint))
    args = [x, *[relax.const(a) for a in fmt.arrays()], *([relax.const(bias)] if bias is not None else []), level]
    return relax.call_tir(gv, args, out_ty=out_ty)


def _main(bb, params, body, attrs=None):
    """main(params) with one dataflow block; body(bb, *params) -> output expr."""
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _var(name, shape, dtype=F32):
    return relax.Var(name, relax.TensorType(shape, dtype))


# ---------------------------------------------------------------------- spellings of the mask
def _mask_spelling(spelling: str, bb, W, LM, level):
    """W_eff for W (const array) and LM (int64 array) in one of the frontends' spellings."""
    w = relax.const(W)
    lm = relax.const(LM)
    ge = lambda lm_e, lvl_e: bb.emit(relax.op.greater_equal(lm_e, lvl_e))
    if spelling == "mul_w_mask":
        return bb.emit(relax.op.multiply(w, bb.emit(relax.op.astype(ge(lm, level), F32))))
    if spelling == "mul_mask_w":
        return bb.emit(relax.op.multiply(bb.emit(relax.op.astype(ge(lm, level), F32)), w))
    if spelling == "level_le_lm":
        le = bb.emit(relax.op.less_equal(level, lm))
        return bb.emit(relax.op.multiply(w, bb.emit(relax.op.astype(le, F32))))
    if spelling == "where_scalar_zero":
        zero = bb.emit(relax.const(0.0, F32))
        return bb.emit(relax.op.where(ge(lm, level), w, zero))
    if spelling == "where_full_like":
        zero = bb.emit(relax.op.full_like(w, relax.const(0.0, F32)))
        return bb.emit(relax.op.where(ge(lm, level), w, zero))
    if spelling == "where_zeros":
        zero = bb.emit(relax.op.zeros(relax.ShapeExpr(W.shape), F32))
        return bb.emit(relax.op.where(ge(lm, level), w, zero))
    if spelling == "cast_level_map":  # int32 constant cast up to the level's int64
        lm32 = bb.emit(relax.op.astype(relax.const(LM.astype("int32")), "int64"))
        return bb.emit(relax.op.multiply(w, bb.emit(relax.op.astype(ge(lm32, level), F32))))
    if spelling == "cast_level":  # ONNX: Cast(level, INT32) against an int32 level map
        lvl32 = bb.emit(relax.op.astype(level, "int32"))
        cmp = ge(relax.const(LM.astype("int32")), lvl32)
        return bb.emit(relax.op.multiply(w, bb.emit(relax.op.astype(cmp, F32))))
    if spelling == "two_casts":  # bool -> int32 -> float32
        m = bb.emit(relax.op.astype(bb.emit(relax.op.astype(ge(lm, level), "int32")), F32))
        return bb.emit(relax.op.multiply(w, m))
    raise AssertionError(spelling)


MASK_SPELLINGS = [
    "mul_w_mask",
    "mul_mask_w",
    "level_le_lm",
    "where_scalar_zero",
    "where_full_like",
    "where_zeros",
    "cast_level_map",
    "cast_level",
    "two_casts",
]

X_CONV, W_CONV = (1, 3, 6, 6), (4, 3, 3, 3)
CONV_ATTRS = dict(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)


def _conv_before(spelling, W, LM):
    bb = relax.BlockBuilder()
    return _main(
        bb,
        [_var("x", X_CONV), _var("level", (), "int64")],
        lambda bb, x, level: relax.op.nn.conv2d(
            x, _mask_spelling(spelling, bb, W, LM, level), strides=(1, 1), padding=(1, 1, 1, 1)
        ),
    )


def _conv_expected(W, LM, num_levels):
    fmt = NestedCSR.pack(W.reshape(W.shape[0], -1), LM.reshape(LM.shape[0], -1), num_levels)
    kernel = nested_conv2d(fmt, X_CONV, W.shape[2:], (1, 1), (1, 1, 1, 1), (1, 1), 1, False)

    def body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        return _kernel_call(bb, kernel, "nested_conv2d", x, fmt, None, lvl, relax.TensorType((1, 4, 6, 6), F32))

    return _main(relax.BlockBuilder(), [_var("x", X_CONV), _var("level", (), "int64")], body)


@pytest.mark.parametrize("spelling", MASK_SPELLINGS, ids=MASK_SPELLINGS)
def test_conv_mask_spelling_lowered(spelling):
    rng = np.random.default_rng(0)
    W, LM = rng.standard_normal(W_CONV).astype(F32), _level_map(rng, W_CONV)
    after = LowerNestedLayers()(_conv_before(spelling, W, LM))
    expected = _conv_expected(W, LM, int(LM.max()) + 1)
    tvm.ir.assert_structural_equal(_functions_only(after), expected)


@pytest.mark.parametrize("spelling", ["where_full_like", "cast_level"], ids=["where_full_like", "cast_level"])
def test_conv_mask_spelling_numerics(spelling):
    rng = np.random.default_rng(1)
    W, LM = rng.standard_normal(W_CONV).astype(F32), _level_map(rng, W_CONV)
    before = _conv_before(spelling, W, LM)
    x = rng.standard_normal(X_CONV).astype(F32)
    _assert_same_at_every_level(before, LowerNestedLayers()(before), [x], int(LM.max()) + 1)


# --------------------------------------------------------------------- TVMScript Before: conv
@I.ir_module
class ConvBiasBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((4,), "float32"),
    ):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, level), "float32")
            y = R.nn.conv2d(x, R.multiply(W, mask), strides=[2, 1], padding=[1, 0, 1, 2], dilation=[1, 2])
            z = R.add(y, R.reshape(B, R.shape([1, 4, 1, 1])))
            R.output(z)
        return z


def test_conv_bias_fused_into_kernel():
    rng = np.random.default_rng(2)
    W, LM, B = rng.standard_normal(W_CONV).astype(F32), _level_map(rng, W_CONV), rng.standard_normal(4).astype(F32)
    before = relax.transform.BindParams("main", {"W": W, "LM": LM, "B": B})(ConvBiasBefore)
    after = LowerNestedLayers()(before)

    fmt = NestedCSR.pack(W.reshape(4, -1), LM.reshape(4, -1), int(LM.max()) + 1)
    out_shape = tuple(int(s) for s in before["main"].ret_ty.shape)
    kernel = nested_conv2d(fmt, X_CONV, (3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1, True)

    def body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        return _kernel_call(bb, kernel, "nested_conv2d", x, fmt, B, lvl, relax.TensorType(out_shape, F32))

    expected = _main(
        relax.BlockBuilder(), [_var("x", X_CONV), _var("level", (), "int64")], body, attrs={"num_input": 2}
    )
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    _assert_same_at_every_level(before, after, [rng.standard_normal(X_CONV).astype(F32)], int(LM.max()) + 1)


def test_grouped_conv_numerics():
    rng = np.random.default_rng(3)
    w_shape = (4, 2, 3, 3)  # groups=2 over 4 input channels
    W, LM = rng.standard_normal(w_shape).astype(F32), _level_map(rng, w_shape, top=3)
    x_shape = (2, 4, 5, 5)
    bb = relax.BlockBuilder()
    before = _main(
        bb,
        [_var("x", x_shape), _var("level", (), "int64")],
        lambda bb, x, level: relax.op.nn.conv2d(
            x, _mask_spelling("mul_w_mask", bb, W, LM, level), padding=(1, 1, 1, 1), groups=2
        ),
    )
    after = LowerNestedLayers()(before)
    assert "relax.nn.conv2d" not in after["main"].script()
    _assert_same_at_every_level(before, after, [rng.standard_normal(x_shape).astype(F32)], 4)


# --------------------------------------------------------------------- linear / matmul spellings
LINEAR_CASES = {
    # id: (x shape, W shape as written in the graph, transposed in graph?, bias side or None)
    "linear_permute_dims": ((2, 8), (5, 8), True, None),
    "linear_bias_left": ((2, 8), (5, 8), True, "left"),
    "linear_bias_right": ((2, 8), (5, 8), True, "right"),
    "matmul_k_by_m": ((2, 8), (8, 5), False, None),
    "matmul_k_by_m_bias": ((2, 8), (8, 5), False, "right"),
    "linear_rank3_input": ((2, 3, 8), (5, 8), True, None),
    "matmul_rank3_bias": ((2, 3, 8), (8, 5), False, "left"),
}


def _linear_case(case, rng):
    x_shape, w_shape, transposed, bias_side = LINEAR_CASES[case]
    W, LM = rng.standard_normal(w_shape).astype(F32), _level_map(rng, w_shape)
    B = rng.standard_normal(5).astype(F32)

    def body(bb, x, level):
        w_eff = _mask_spelling("mul_w_mask", bb, W, LM, level)
        if transposed:
            w_eff = bb.emit(relax.op.permute_dims(w_eff, [1, 0]))
        y = relax.op.matmul(x, w_eff)
        if bias_side is None:
            return y
        y = bb.emit(y)
        return relax.op.add(y, relax.const(B)) if bias_side == "right" else relax.op.add(relax.const(B), y)

    before = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], body)
    return before, x_shape, W, LM, B if bias_side else None, transposed


def _linear_expected(x_shape, W, LM, B, transposed):
    W2, LM2 = (W, LM) if transposed else (W.T, LM.T)
    fmt = NestedCSR.pack(np.ascontiguousarray(W2), np.ascontiguousarray(LM2), int(LM.max()) + 1)
    batch = math.prod(x_shape[:-1])
    kernel = nested_linear(fmt, batch, B is not None)
    out_shape = (*x_shape[:-1], 5)

    def body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        if len(x_shape) == 2:
            return _kernel_call(bb, kernel, "nested_linear", x, fmt, B, lvl, relax.TensorType(out_shape, F32))
        x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr((batch, 8))))
        y2 = bb.emit(_kernel_call(bb, kernel, "nested_linear", x2, fmt, B, lvl, relax.TensorType((batch, 5), F32)))
        return relax.op.reshape(y2, relax.ShapeExpr(out_shape))

    return _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], body)


@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=list(LINEAR_CASES))
def test_linear_spelling_lowered(case):
    before, x_shape, W, LM, B, transposed = _linear_case(case, np.random.default_rng(4))
    after = LowerNestedLayers()(before)
    tvm.ir.assert_structural_equal(_functions_only(after), _linear_expected(x_shape, W, LM, B, transposed))


@pytest.mark.parametrize(
    "case", ["linear_bias_left", "matmul_rank3_bias"], ids=["linear_bias_left", "matmul_rank3_bias"]
)
def test_linear_spelling_numerics(case):
    rng = np.random.default_rng(5)
    before, x_shape, _W, LM, *_ = _linear_case(case, rng)
    _assert_same_at_every_level(
        before, LowerNestedLayers()(before), [rng.standard_normal(x_shape).astype(F32)], int(LM.max()) + 1
    )


def test_bias_add_with_other_use_not_fused():
    """The layer's output is used twice: the kernel has no bias and the add stays."""
    rng = np.random.default_rng(6)
    W, LM, B = rng.standard_normal((5, 8)).astype(F32), _level_map(rng, (5, 8)), rng.standard_normal(5).astype(F32)

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W, LM, level), [1, 0]))
        y = bb.emit(relax.op.matmul(x, wt))
        z = bb.emit(relax.op.add(y, relax.const(B)))
        return relax.op.multiply(y, z)

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    text = after["main"].script()
    assert text.count("R.call_tir") == 1 and "R.add" in text
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 8)).astype(F32)], int(LM.max()) + 1)


# ------------------------------------------------------------------------------ negative cases
@I.ir_module
class DenseBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        V: R.Tensor((5, 144), "float32"),
    ):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.nn.conv2d(x, W, padding=[1, 1, 1, 1])
            f = R.reshape(y, R.shape([1, 144]))
            z = R.matmul(f, R.permute_dims(V, axes=[1, 0]))
            R.output(z)
        return z


@I.ir_module
class StaticMaskBefore:
    """A mask that does not involve `level` (a static pruning mask): not a nested layer."""

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, R.const(1, "int64")), "float32")
            y = R.nn.conv2d(x, R.multiply(W, mask), padding=[1, 1, 1, 1])
            R.output(y)
        return y


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(
            lambda rng: relax.transform.BindParams(
                "main",
                {"W": rng.standard_normal((4, 3, 3, 3)).astype(F32), "V": rng.standard_normal((5, 144)).astype(F32)},
            )(DenseBefore),
            id="dense_conv_and_linear",
        ),
        pytest.param(
            lambda rng: relax.transform.BindParams(
                "main", {"W": rng.standard_normal((4, 3, 3, 3)).astype(F32), "LM": _level_map(rng, (4, 3, 3, 3))}
            )(StaticMaskBefore),
            id="mask_without_level",
        ),
    ],
)
def test_untouched(before):
    mod = before(np.random.default_rng(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = LowerNestedLayers()(mod)
    tvm.ir.assert_structural_equal(after, mod)
    assert read_nested_info(after) is None


# --------------------------------------------------------------------------------- error cases
@I.ir_module
class WeightParamBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, level), "float32")
            y = R.nn.conv2d(x, R.multiply(W, mask), padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class BroadcastLevelMapBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 1, 1, 1), "int64"),
    ):
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, level), "float32")
            y = R.nn.conv2d(x, R.multiply(W, mask), padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class FloatLevelMapBefore:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "float32"),
    ):
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, R.astype(level, "float32")), "float32")
            y = R.matmul(x, R.permute_dims(R.multiply(mask, W), axes=[1, 0]))
            R.output(y)
        return y


@pytest.mark.parametrize(
    "mod, binds, match",
    [
        pytest.param(
            WeightParamBefore,
            {"LM": np.zeros((4, 3, 3, 3), "int64")},
            r"conv2d_0 \(y\).*weight is not a constant",
            id="weight_not_constant",
        ),
        pytest.param(
            BroadcastLevelMapBefore,
            {"W": np.ones((4, 3, 3, 3), F32), "LM": np.zeros((4, 1, 1, 1), "int64")},
            r"conv2d_0 \(y\).*level map shape \(4, 1, 1, 1\) differs from the weight shape \(4, 3, 3, 3\)",
            id="level_map_shape",
        ),
        pytest.param(
            FloatLevelMapBefore,
            {"W": np.ones((5, 8), F32), "LM": np.zeros((5, 8), F32)},
            r"linear_0 \(y\).*level map is not an integer tensor",
            id="level_map_not_integer",
        ),
    ],
)
def test_malformed_nested_layer_raises(mod, binds, match):
    mod = relax.transform.BindParams("main", binds)(mod)
    with pytest.raises(ValueError, match=match):
        LowerNestedLayers()(mod)


@I.ir_module
class NHWCBefore:
    @R.function
    def main(
        x: R.Tensor((1, 6, 6, 3), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, level), "float32")
            y = R.nn.conv2d(x, R.multiply(W, mask), padding=[1, 1, 1, 1], data_layout="NHWC")
            R.output(y)
        return y


def test_unsupported_layout_left_dense_with_warning():
    rng = np.random.default_rng(8)
    mod = relax.transform.BindParams(
        "main", {"W": rng.standard_normal((4, 3, 3, 3)).astype(F32), "LM": _level_map(rng, (4, 3, 3, 3))}
    )(NHWCBefore)
    with pytest.warns(NestedLoweringWarning, match=r"conv2d_0 \(y\).*NHWC"):
        after = LowerNestedLayers()(mod)
    tvm.ir.assert_structural_equal(after, mod)


def test_layer_left_dense_still_counts_towards_num_levels():
    rng = np.random.default_rng(13)
    W1, LM1 = rng.standard_normal(W_CONV).astype(F32), _level_map(rng, W_CONV, top=3)
    W2, LM2 = rng.standard_normal((5, 8)).astype(F32), _level_map(rng, (5, 8), top=1)

    def body(bb, x, level):
        w1 = _mask_spelling("mul_w_mask", bb, W1, LM1, level)
        y = bb.emit(relax.op.nn.conv2d(x, w1, padding=(1, 1, 1, 1), data_layout="NHWC", out_layout="NHWC"))
        f = bb.emit(relax.op.reshape(y, relax.ShapeExpr((18, 8))))
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W2, LM2, level), [1, 0]))
        return relax.op.matmul(f, wt)

    before = _main(relax.BlockBuilder(), [_var("x", (1, 6, 6, 3)), _var("level", (), "int64")], body)
    with pytest.warns(NestedLoweringWarning, match=r"conv2d_0 .*NHWC"):
        after = LowerNestedLayers()(before)
    assert read_nested_info(after)["num_levels"] == 4
    assert after["main"].script().count("R.nn.conv2d") == 1


# ------------------------------------------------------------------ pruned layers, L, nested.info
def test_layer_pruned_everywhere_becomes_bias_without_kernel():
    rng = np.random.default_rng(9)
    W, B = rng.standard_normal((5, 8)).astype(F32), rng.standard_normal(5).astype(F32)
    LM = np.full((5, 8), -1, "int64")

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W, LM, level), [1, 0]))
        return relax.op.add(bb.emit(relax.op.matmul(x, wt)), relax.const(B))

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    expected = _main(
        relax.BlockBuilder(),
        [_var("x", (2, 8)), _var("level", (), "int64")],
        lambda bb, x, level: relax.op.broadcast_to(relax.const(B), relax.ShapeExpr((2, 5))),
    )
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    info = read_nested_info(after)
    assert info["num_levels"] == 1 and info["layers"][0]["nnz"] == [0]
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 8)).astype(F32)], 1)


def test_num_levels_and_info_cover_every_layer():
    """L = 1 + the largest value of all level maps; each layer's nnz is listed for all L levels."""
    rng = np.random.default_rng(10)
    W1, LM1 = rng.standard_normal(W_CONV).astype(F32), _level_map(rng, W_CONV, top=1)
    W2, LM2 = rng.standard_normal((5, 144)).astype(F32), _level_map(rng, (5, 144), top=3)

    def body(bb, x, level):
        y = bb.emit(relax.op.nn.conv2d(x, _mask_spelling("mul_w_mask", bb, W1, LM1, level), padding=(1, 1, 1, 1)))
        f = bb.emit(relax.op.reshape(y, relax.ShapeExpr((1, 144))))
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_mask_w", bb, W2, LM2, level), [1, 0]))
        return relax.op.matmul(f, wt)

    before = _main(relax.BlockBuilder(), [_var("x", X_CONV), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    info = json.loads(str(after.attrs[INFO_ATTR]))
    assert info["num_levels"] == 4 and info["format_version"] == FORMAT_VERSION
    conv, fc = info["layers"]
    assert (conv["op"], conv["rows"], conv["cols"]) == ("conv2d", 4, 27)
    assert (fc["op"], fc["rows"], fc["cols"]) == ("linear", 5, 144)
    assert conv["nnz"] == [int((LM1 >= lvl).sum()) for lvl in range(4)]  # levels 2, 3: empty
    assert fc["nnz"] == [int((LM2 >= lvl).sum()) for lvl in range(4)]
    fmt = NestedCSR.pack(W2, LM2, 4)
    assert fc["payload_bytes"] == fmt.nbytes and fc["csr_bytes"] == csr_nbytes(LM2)
    assert fc["dense_bytes"] == 5 * 144 * 4
    assert after["main"].script().count("R.astype(level") == 1  # one level cast shared by both kernels
    _assert_same_at_every_level(before, after, [rng.standard_normal(X_CONV).astype(F32)], 4)


def test_info_attr_survives_the_relax_build_passes():
    before, *_ = _linear_case("linear_permute_dims", np.random.default_rng(11))
    after = LowerNestedLayers()(before)
    legalized = tvm.transform.Sequential(
        [relax.transform.LegalizeOps(), relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]
    )(after)
    assert read_nested_info(legalized) == read_nested_info(after)


# ------------------------------------------------------------- shared weights, conv1d, strays
def _constants(func) -> set:
    """The distinct constant objects (by identity) a Relax function refers to."""
    found = set()

    def visit(e):
        if isinstance(e, Constant) and isinstance(e.ty, relax.TensorType):
            found.add(e)

    relax.analysis.post_order_visit(func, visit)
    return found


def test_weight_shared_by_three_calls_packed_once():
    """One masked weight feeding three matmuls (a recurrent matrix, a layer called three times):
    one kernel, one set of packed constants, one nested.info record with calls == 3."""
    rng = np.random.default_rng(20)
    W, LM = rng.standard_normal((8, 8)).astype(F32), _level_map(rng, (8, 8))

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W, LM, level), [1, 0]))
        for _ in range(3):
            x = bb.emit(relax.op.tanh(bb.emit(relax.op.matmul(x, wt))))
        return x

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    fmt = NestedCSR.pack(W, LM, int(LM.max()) + 1)
    kernel = nested_linear(fmt, 2)

    def expected_body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        gv = bb.add_func(kernel, "nested_linear")
        bb.update_func(gv, kernel.with_attr("global_symbol", gv.name_hint))
        consts = [relax.const(a) for a in fmt.arrays()]
        for _ in range(3):
            y = bb.emit(relax.call_tir(gv, [x, *consts, lvl], out_ty=relax.TensorType((2, 8), F32)))
            x = bb.emit(relax.op.tanh(y))
        return x

    expected = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], expected_body)
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    assert len(_constants(after["main"])) == len(fmt.arrays()), "the call sites share one copy of the weight"
    (record,) = read_nested_info(after)["layers"]
    assert record["calls"] == 3 and record["payload_bytes"] == fmt.nbytes
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 8)).astype(F32)], int(LM.max()) + 1)


def test_shared_weight_at_two_batch_sizes_two_kernels_one_weight():
    rng = np.random.default_rng(21)
    W, LM = rng.standard_normal((6, 4)).astype(F32), _level_map(rng, (6, 4))

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W, LM, level), [1, 0]))
        a = bb.emit(relax.op.matmul(x, wt))
        first = bb.emit(relax.op.strided_slice(x, axes=[0], begin=[0], end=[1]))
        b = bb.emit(relax.op.matmul(first, wt))
        return relax.op.add(bb.emit(relax.op.sum(a, axis=[0], keepdims=True)), b)

    before = _main(relax.BlockBuilder(), [_var("x", (3, 4)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    assert sum(1 for _, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)) == 2
    assert len(_constants(after["main"])) == len(NestedCSR.pack(W, LM, 3).arrays())
    assert [r["calls"] for r in read_nested_info(after)["layers"]] == [2]
    _assert_same_at_every_level(before, after, [rng.standard_normal((3, 4)).astype(F32)], int(LM.max()) + 1)


def test_conv1d_lowered_as_height_one_conv2d():
    rng = np.random.default_rng(22)
    W, LM, B = (
        rng.standard_normal((4, 3, 3)).astype(F32),
        _level_map(rng, (4, 3, 3)),
        rng.standard_normal(4).astype(F32),
    )
    x_shape = (2, 3, 10)

    def body(bb, x, level):
        w = _mask_spelling("mul_w_mask", bb, W, LM, level)
        y = bb.emit(relax.op.nn.conv1d(x, w, strides=2, padding=(1, 2), dilation=1))
        return relax.op.add(y, relax.const(B.reshape(1, 4, 1)))

    before = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    fmt = NestedCSR.pack(W.reshape(4, 9), LM.reshape(4, 9), int(LM.max()) + 1)
    kernel = nested_conv2d(fmt, (2, 3, 1, 10), (1, 3), (1, 2), (0, 1, 0, 2), (1, 1), 1, True)

    def expected_body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        x4 = bb.emit(relax.op.reshape(x, relax.ShapeExpr((2, 3, 1, 10))))
        y = bb.emit(_kernel_call(bb, kernel, "nested_conv2d", x4, fmt, B, lvl, relax.TensorType((2, 4, 1, 6), F32)))
        return relax.op.reshape(y, relax.ShapeExpr((2, 4, 6)))

    expected = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], expected_body)
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    assert read_nested_info(after)["layers"][0]["op"] == "conv1d"
    _assert_same_at_every_level(before, after, [rng.standard_normal(x_shape).astype(F32)], int(LM.max()) + 1)


@pytest.mark.parametrize(
    "op, w_shape, x_shape",
    [("conv3d", (4, 3, 3, 3, 3), (1, 3, 5, 5, 5)), ("conv2d_transpose", (3, 4, 3, 3), (1, 3, 5, 5))],
    ids=["conv3d", "conv2d_transpose"],
)
def test_masked_weight_no_kernel_serves_warns_naming_it(op, w_shape, x_shape):
    """A masked weight that feeds an op without a nested kernel is named in a warning (never computed
    densely in silence) and still counts towards L, next to a lowered nested layer."""
    rng = np.random.default_rng(23)
    W1, LM1 = rng.standard_normal(w_shape).astype(F32), _level_map(rng, w_shape, top=3)
    W2, LM2 = rng.standard_normal((5, 6)).astype(F32), _level_map(rng, (5, 6), top=1)

    def body(bb, x, h, level):
        y = bb.emit(getattr(relax.op.nn, op)(x, _mask_spelling("mul_w_mask", bb, W1, LM1, level)))
        wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W2, LM2, level), [1, 0]))
        return relax.Tuple([y, bb.emit(relax.op.matmul(h, wt))])

    before = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("h", (2, 6)), _var("level", (), "int64")], body)
    with pytest.warns(
        NestedLoweringWarning, match=rf"masked weight \w+ \[{w_shape[0]}, .*feeds relax.nn.{op} .*densely"
    ):
        after = LowerNestedLayers()(before)
    info = read_nested_info(after)
    assert info["num_levels"] == 4 and len(info["layers"]) == 1
    assert after["main"].script().count(f"R.nn.{op}") == 1


# -------------------------------------------------------------------------- models from frontends
def _pipeline(mod):
    return LowerNestedLayers()(FoldBatchNorm()(relax.transform.FoldConstant()(mod)))


def test_torch_exported_model_every_level():
    torch = pytest.importorskip("torch")
    from tvm.relax.frontend.torch import from_exported_program

    import tvm_nested.authoring.nn as tnn

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(64, 5)
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x))).flatten(1)
            return self.head(self.fc(y).unsqueeze(1))  # rank-3 input for the head

    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    nm = tnn.nest(net, {"conv": [0.5, 0.2, 0.1], "fc": [0.6, 0.3], "head": [0.8, 0.5, 0.3, 0.1]}).eval()
    x = torch.randn(2, 3, 4, 4)
    ep = torch.export.export(nm, (x,), {"level": torch.tensor(0)})
    after = _pipeline(from_exported_program(ep))
    text = after["main"].script()
    assert "conv2d(" not in text and "matmul" not in text and "batch_norm" not in text
    assert read_nested_info(after)["num_levels"] == 4
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    for lvl in range(4):
        ref = nm(x, level=torch.tensor(lvl)).detach().numpy()
        out = vm["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(np.array(lvl, "int64")))[0].numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5, err_msg=f"level {lvl}")


def _onnx_model(rng):
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    def nested(prefix, shape, lm_dtype="int64", le=False, lvl="level"):
        """DESIGN section 2: W_eff = Mul(W, Cast(GreaterOrEqual(LM, level), to=FLOAT))."""
        W = rng.standard_normal(shape).astype(F32)
        LM = rng.integers(-1, 3, shape).astype(lm_dtype)
        cmp = (
            h.make_node("LessOrEqual", [lvl, f"{prefix}_lm"], [f"{prefix}_ge"])
            if le
            else h.make_node("GreaterOrEqual", [f"{prefix}_lm", lvl], [f"{prefix}_ge"])
        )
        nodes = [
            cmp,
            h.make_node("Cast", [f"{prefix}_ge"], [f"{prefix}_mask"], to=TP.FLOAT),
            h.make_node("Mul", [f"{prefix}_w", f"{prefix}_mask"], [f"{prefix}_eff"]),
        ]
        return nodes, [nh.from_array(W, f"{prefix}_w"), nh.from_array(LM, f"{prefix}_lm")]

    n1, i1 = nested("c", (4, 3, 3, 3))
    n2, i2 = nested("g", (5, 64))
    n3, i3 = nested("m", (5, 6), lm_dtype="int32", le=True, lvl="level32")
    stats = [nh.from_array((rng.random(4) + 0.5).astype(F32), n) for n in ("gamma", "beta", "mean", "var")]
    init = (
        i1
        + i2
        + i3
        + stats
        + [
            nh.from_array(rng.standard_normal(4).astype(F32), "cb"),
            nh.from_array(rng.standard_normal(5).astype(F32), "gb"),
        ]
    )
    nodes = [
        h.make_node("Cast", ["level"], ["level32"], to=TP.INT32),
        *n1,
        *n2,
        *n3,
        h.make_node("Conv", ["x", "c_eff", "cb"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=0.001),
        h.make_node("Flatten", ["bn"], ["f"]),
        h.make_node("Gemm", ["f", "g_eff", "gb"], ["y"], transB=1, alpha=0.5, beta=2.0),
        h.make_node("MatMul", ["y", "m_eff"], ["z"]),
    ]
    graph = h.make_graph(
        nodes,
        "nested",
        [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 4, 4]), h.make_tensor_value_info("level", TP.INT64, [])],
        [h.make_tensor_value_info("z", TP.FLOAT, [1, 6])],
        init,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_onnx_model_every_level():
    ort = pytest.importorskip("onnxruntime")
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(12)
    model = _onnx_model(rng)
    mod = from_onnx(model, shape_dict={"x": [1, 3, 4, 4], "level": []}, dtype_dict={"x": F32, "level": "int64"})
    after = _pipeline(mod)
    text = after["main"].script()
    assert "conv2d(" not in text and "matmul" not in text and "batch_norm" not in text
    assert text.count("R.call_tir") == 3
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, 4, 4)).astype(F32)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    for lvl in range(3):
        ref = sess.run(None, {"x": x, "level": np.array(lvl, "int64")})[0]
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(lvl, "int64"))).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=f"level {lvl}")


# ------------------------------------------------------------------------------ FuseEpilogue
def test_fuse_epilogue_residual_relu_and_relu6_match_torch():
    """conv -> BN -> relu, conv + x -> relu, conv -> relu6: three fused kernels, no elementwise op left
    in main, and the compiled model equals torch at every level."""
    import torch
    from ir_checks import relax_ops, run_pipeline
    from torch import nn

    import tvm_nested
    from tvm_nested.authoring import nn as tnn
    from tvm_nested.schedules import spec_of

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            z = torch.relu(self.c2(y) + x)
            return nn.functional.relu6(self.c3(z))

    torch.manual_seed(0)
    model = Block().eval()
    for p in model.b1.parameters():
        nn.init.normal_(p)
    nested = tnn.nest(model, {n: [0.5, 0.2] for n in ("c1", "c2", "c3")}).eval()
    x = torch.randn(1, 8, 6, 6)
    mod = tvm_nested.from_torch(nested, (x,), {"level": torch.tensor(0)})
    graph = run_pipeline(mod)
    ops = relax_ops(graph["main"])
    assert ops["relax.call_tir"] == 3 and not {"relax.nn.relu", "relax.add", "relax.clip"} & set(ops)
    epilogues = sorted(
        (e.residual, e.activation, e.clip) for f in graph.functions.values() if (s := spec_of(f)) for e in [s.epilogue]
    )
    assert epilogues == [(False, "clip", (0.0, 6.0)), (False, "relu", None), (True, "relu", None)]
    rt = tvm_nested.build(mod, "llvm").runtime()
    for level in (0, 1):
        ref = nested(x, level=torch.tensor(level)).detach().numpy()
        np.testing.assert_allclose(rt.run(x.numpy(), level=level)[0], ref, rtol=1e-5, atol=1e-5)


def test_fuse_epilogue_leaves_a_result_with_two_users():
    import torch
    from ir_checks import relax_ops, run_pipeline
    from torch import nn

    import tvm_nested
    from tvm_nested.authoring import nn as tnn

    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y

    nested = tnn.nest(TwoUsers().eval(), {"fc": [0.5]}).eval()
    mod = tvm_nested.from_torch(nested, (torch.randn(2, 8),), {"level": torch.tensor(0)})
    ops = relax_ops(run_pipeline(mod)["main"])
    assert ops["relax.nn.relu"] == 1 and ops["relax.add"] == 1


def test_equal_kernels_of_two_weights_stay_apart():
    """Two weights of one shape and one level map have structurally equal kernels; each keeps its own
    (BlockBuilder.add_func would merge them, and the CPU form would then compute both with one's weights)."""
    import tvm_nested

    rng = np.random.default_rng(24)
    W1, W2 = rng.standard_normal((2, 8, 8)).astype(F32)
    LM = _level_map(rng, (8, 8))

    def body(bb, x, level):
        for W in (W1, W2):
            wt = bb.emit(relax.op.permute_dims(_mask_spelling("mul_w_mask", bb, W, LM, level), [1, 0]))
            x = bb.emit(relax.op.nn.relu(bb.emit(relax.op.matmul(x, wt))))
        return x

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    kernels = [gv for gv, f in LowerNestedLayers()(before).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 2
    x = rng.standard_normal((2, 8)).astype(F32)
    rt = tvm_nested.build(before, "llvm").runtime()
    for lvl in range(int(LM.max()) + 1):
        keep = (LM >= lvl).astype(F32)
        ref = np.maximum(np.maximum(x @ (W1 * keep).T, 0) @ (W2 * keep).T, 0)
        np.testing.assert_allclose(rt.run(x, level=lvl)[0], ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- NormalizeTakeIndices
def test_negative_constant_take_index_made_non_negative():
    """TVM 0.27 imports x[-1] as take(x, -1, mode="fast"), which reads out of bounds."""
    from tvm_nested.relay_passes import NormalizeTakeIndices

    def module(index):
        return _main(
            relax.BlockBuilder(),
            [_var("x", (5, 3))],
            lambda bb, x: relax.op.take(x, relax.const(index, "int64"), axis=0, mode="fast"),
        )

    before, expected = module(-1), module(4)
    after = NormalizeTakeIndices()(before)
    tvm.ir.assert_structural_equal(after, expected)
    tvm.ir.assert_structural_equal(NormalizeTakeIndices()(expected), expected)  # nothing to fix: unchanged
    x = np.arange(15, dtype=F32).reshape(5, 3)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x[-1])
