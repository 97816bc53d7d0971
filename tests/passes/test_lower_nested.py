"""LowerNestedLayers: every spelling of a nested layer -> ``call_tir`` of a packed kernel taking the level.

Before and Expected are TVMScript. Weights, level maps and packed arrays are function parameters
bound to constants (``ir_checks.bind``), so Expected shows the ``call_tir`` the pass emits; a
kernel's body is generated (``schedules.kernel``), so Expected declares it as a stub with its
signature (``ir_checks.with_kernels`` checks the signature and puts the kernel in). The first test
spells the packed arrays out by hand; the others take them from ``NestedCSR.pack`` (tested on its
own in test_format.py). Numerics compare the masked dense module (before) with the lowered one
(after) at every level on seeded inputs.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import tvm
from ir_checks import bind, functions_only, relax_ops, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.contract import FORMAT_VERSION, INFO_ATTR, dtype_of, static_shape
from tvm_nested.relay_passes import FoldBatchNorm, LowerNestedLayers, NestedLoweringWarning, read_nested_info
from tvm_nested.schedules import Conv2dSpec, Epilogue, LinearSpec, Packed, kernel
from tvm_nested.schedules.format import NestedCSR, csr_nbytes

F32 = "float32"
L = 3


# ----------------------------------------------------------------------------------------- helpers
def _level_map(shape, levels=L):
    """Level maps holding -1, 0, .., levels-1 in turn: a fixed share pruned, every level present."""
    return (np.arange(math.prod(shape)) % (levels + 1) - 1).reshape(shape).astype("int64")


def _packed(weight2d, level_map2d, num_levels=L) -> tuple[NestedCSR, dict]:
    fmt = NestedCSR.pack(weight2d, level_map2d, num_levels)
    return fmt, dict(zip(("values", "col", "row_ptr", "level_len"), fmt.arrays()))


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


# ------------------------------------------------------------------- the packed format, by hand
@I.ir_module
class TinyLinearBefore:
    @R.function
    def main(
        x: R.Tensor((3, 4), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((2, 4), "float32"),
        LM: R.Tensor((2, 4), "int64"),
    ):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            mask = R.astype(R.greater_equal(LM, level), "float32")
            y = R.matmul(x, R.permute_dims(R.multiply(W, mask), axes=[1, 0]))
            R.output(y)
        return y


@I.ir_module
class TinyLinearExpected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((3, 4), "float32"),
        values: T.Buffer((6,), "float32"),
        col: T.Buffer((6,), "uint8"),
        row_ptr: T.Buffer((3,), "int32"),
        level_len: T.Buffer((2, 2), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((3, 2), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((3, 4), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((6,), "float32"),
        col: R.Tensor((6,), "uint8"),
        row_ptr: R.Tensor((3,), "int32"),
        level_len: R.Tensor((2, 2), "uint8"),
    ):
        R.func_attr({"num_input": 2})
        cls = TinyLinearExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")  # the kernels read an int32 level
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level_i32), out_ty=R.Tensor((3, 2), "float32")
            )
            R.output(y)
        return y


def test_tiny_linear_packed_by_hand():
    W = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], F32)
    LM = np.array([[0, 1, -1, 0], [1, -1, 0, 1]], "int64")
    after = LowerNestedLayers()(bind(TinyLinearBefore, W=W, LM=LM))

    # Each row keeps its weights with LM >= 0, the sparsest level's first (ties by column), so
    # level l reads a prefix of the row, level_len[l, row] long.
    packed = {
        "values": np.array([2, 1, 4, 5, 8, 7], F32),  # row 0: cols 1 (LM 1), 0, 3; row 1: cols 0, 3 (LM 1), 2
        "col": np.array([1, 0, 3, 0, 3, 2], "uint8"),  # the narrowest dtype that holds a column
        "row_ptr": np.array([0, 3, 6], "int32"),
        "level_len": np.array([[3, 3], [1, 2]], "uint8"),  # [level, row]
    }
    spec = LinearSpec(Packed(rows=2, cols=4, num_levels=2, nnz=6, max_len=3, col_dtype="uint8", len_dtype="uint8"), 3)
    expected = with_kernels(bind(TinyLinearExpected, **packed), nested_linear=kernel(spec))
    tvm.ir.assert_structural_equal(functions_only(after), expected)

    assert read_nested_info(after) == {
        "num_levels": 2,
        "format_version": FORMAT_VERSION,
        "layers": [
            {
                "name": "linear_0 (y)",
                "op": "linear",
                "rows": 2,
                "cols": 4,
                "nnz": [6, 3],
                "payload_bytes": 6 * 4 + 6 * 1 + 3 * 4 + 4 * 1,  # values, col, row_ptr, level_len
                "csr_bytes": 6 * 4 + 6 * 4 + 3 * 4,  # the yardstick: fp32 values, int32 cols and rows
                "dense_bytes": 2 * 4 * 4,
                "calls": 1,  # call sites of this one weight (a recurrent matrix: one per time step)
                "kernel": "nested_linear",
            }
        ],
    }


# -------------------------------------------------------------------------- conv: mask spellings
# The spellings the Relax frontends produce for W * (LM >= level) (DESIGN section 2), one module each.


@I.ir_module
class ConvMulWMask:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvMulMaskW:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(R.astype(R.greater_equal(LM, level), "float32"), W)
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvLevelLeLM:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.less_equal(level, LM), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvWhereScalarZero:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.const(0.0, "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvWhereFullLike:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.full_like(W, R.const(0.0, "float32")))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvWhereZeros:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.zeros(R.shape([4, 3, 3, 3]), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvCastLevelMap:
    """An int32 level map cast up to the level's int64."""

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(R.astype(LM, "int64"), level), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvCastLevel:
    """ONNX: Cast(level, INT32) compared with an int32 level map."""

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, R.astype(level, "int32")), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@I.ir_module
class ConvTwoCasts:
    """bool -> int32 -> float32."""

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.astype(R.greater_equal(LM, level), "int32"), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


CONV_SPELLINGS = {
    "mul_w_mask": ConvMulWMask,
    "mul_mask_w": ConvMulMaskW,
    "level_le_lm": ConvLevelLeLM,
    "where_scalar_zero": ConvWhereScalarZero,
    "where_full_like": ConvWhereFullLike,
    "where_zeros": ConvWhereZeros,
    "cast_level_map": ConvCastLevelMap,
    "cast_level": ConvCastLevel,
    "two_casts": ConvTwoCasts,
}


@I.ir_module
class ConvExpected:
    @T.prim_func
    def nested_conv2d(
        x: T.Buffer((1, 3, 6, 6), "float32"),
        values: T.Buffer((81,), "float32"),
        col: T.Buffer((81,), "uint8"),
        row_ptr: T.Buffer((5,), "int32"),
        level_len: T.Buffer((3, 4), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((1, 4, 6, 6), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((81,), "float32"),
        col: R.Tensor((81,), "uint8"),
        row_ptr: R.Tensor((5,), "int32"),
        level_len: R.Tensor((3, 4), "uint8"),
    ):
        cls = ConvExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            y = R.call_tir(
                cls.nested_conv2d,
                (x, values, col, row_ptr, level_len, level_i32),
                out_ty=R.Tensor((1, 4, 6, 6), "float32"),
            )
            R.output(y)
        return y


def _conv_weights():
    W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(F32)
    return W, _level_map(W.shape)  # 81 of the 108 weights kept


@pytest.mark.parametrize("before", CONV_SPELLINGS.values(), ids=CONV_SPELLINGS.keys())
def test_conv_mask_spelling_lowered(before):
    W, LM = _conv_weights()
    lm_dtype = dtype_of(before["main"].params[3])
    after = LowerNestedLayers()(bind(before, W=W, LM=LM.astype(lm_dtype)))
    fmt, packed = _packed(W.reshape(4, -1), LM.reshape(4, -1))
    spec = Conv2dSpec(Packed.of(fmt), (1, 3, 6, 6), (3, 3), padding=(1, 1, 1, 1))
    expected = with_kernels(bind(ConvExpected, **packed), nested_conv2d=kernel(spec))
    tvm.ir.assert_structural_equal(functions_only(after), expected)


@pytest.mark.parametrize("spelling", ["where_full_like", "cast_level"])
def test_conv_mask_spelling_numerics(spelling):
    W, LM = _conv_weights()
    before = CONV_SPELLINGS[spelling]
    before = bind(before, W=W, LM=LM.astype(dtype_of(before["main"].params[3])))
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(F32)
    _assert_same_at_every_level(before, LowerNestedLayers()(before), [x], L)


# ------------------------------------------------------------------- conv: geometry, bias, groups
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


@I.ir_module
class ConvBiasExpected:
    @T.prim_func
    def nested_conv2d(
        x: T.Buffer((1, 3, 6, 6), "float32"),
        values: T.Buffer((81,), "float32"),
        col: T.Buffer((81,), "uint8"),
        row_ptr: T.Buffer((5,), "int32"),
        level_len: T.Buffer((3, 4), "uint8"),
        bias: T.Buffer((4,), "float32"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((1, 4, 3, 4), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((81,), "float32"),
        col: R.Tensor((81,), "uint8"),
        row_ptr: R.Tensor((5,), "int32"),
        level_len: R.Tensor((3, 4), "uint8"),
        B: R.Tensor((4,), "float32"),
    ):
        R.func_attr({"num_input": 2})
        cls = ConvBiasExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            z = R.call_tir(
                cls.nested_conv2d,
                (x, values, col, row_ptr, level_len, B, level_i32),  # the bias add is the kernel's
                out_ty=R.Tensor((1, 4, 3, 4), "float32"),
            )
            R.output(z)
        return z


def test_conv_bias_fused_into_kernel():
    W, LM = _conv_weights()
    B = np.random.default_rng(2).standard_normal(4).astype(F32)
    before = bind(ConvBiasBefore, W=W, LM=LM, B=B)
    after = LowerNestedLayers()(before)
    fmt, packed = _packed(W.reshape(4, -1), LM.reshape(4, -1))
    spec = Conv2dSpec(Packed.of(fmt), (1, 3, 6, 6), (3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1, Epilogue(bias=True))
    expected = with_kernels(bind(ConvBiasExpected, **packed, B=B), nested_conv2d=kernel(spec))
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    x = np.random.default_rng(3).standard_normal((1, 3, 6, 6)).astype(F32)
    _assert_same_at_every_level(before, after, [x], L)


@I.ir_module
class GroupedConvBefore:
    @R.function
    def main(
        x: R.Tensor((2, 4, 5, 5), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 2, 3, 3), "float32"),
        LM: R.Tensor((4, 2, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=2)
            R.output(y)
        return y


def test_grouped_conv_numerics():
    rng = np.random.default_rng(3)
    W, LM = rng.standard_normal((4, 2, 3, 3)).astype(F32), rng.integers(-1, 4, (4, 2, 3, 3)).astype("int64")
    before = bind(GroupedConvBefore, W=W, LM=LM)
    after = LowerNestedLayers()(before)
    assert relax_ops(after["main"])["relax.call_tir"] == 1 and "relax.nn.conv2d" not in relax_ops(after["main"])
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 4, 5, 5)).astype(F32)], 4)


# ----------------------------------------------------------------------- linear / matmul spellings
# nn.Linear and ONNX Gemm(transB=1) multiply by the transposed weight W [rows, cols]; ONNX MatMul
# and Gemm(transB=0) by W [cols, rows], which the pass packs transposed: both give one kernel.
@I.ir_module
class LinearPermuteDims:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            R.output(y)
        return y


@I.ir_module
class MatmulKByM:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((8, 5), "float32"),
        LM: R.Tensor((8, 5), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, w)
            R.output(y)
        return y


@I.ir_module
class LinearBiasLeft:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "int64"),
        B: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            z = R.add(B, y)
            R.output(z)
        return z


@I.ir_module
class LinearBiasRight:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "int64"),
        B: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            z = R.add(y, B)
            R.output(z)
        return z


@I.ir_module
class MatmulKByMBias:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((8, 5), "float32"),
        LM: R.Tensor((8, 5), "int64"),
        B: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, w)
            z = R.add(y, B)
            R.output(z)
        return z


@I.ir_module
class LinearRank3Input:
    @R.function
    def main(
        x: R.Tensor((2, 3, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "int64"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            R.output(y)
        return y


@I.ir_module
class MatmulRank3Bias:
    @R.function
    def main(
        x: R.Tensor((2, 3, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((8, 5), "float32"),
        LM: R.Tensor((8, 5), "int64"),
        B: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, w)
            z = R.add(B, y)
            R.output(z)
        return z


@I.ir_module
class LinearExpected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((30,), "float32"),
        col: T.Buffer((30,), "uint8"),
        row_ptr: T.Buffer((6,), "int32"),
        level_len: T.Buffer((3, 5), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 5), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((30,), "float32"),
        col: R.Tensor((30,), "uint8"),
        row_ptr: R.Tensor((6,), "int32"),
        level_len: R.Tensor((3, 5), "uint8"),
    ):
        cls = LinearExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level_i32), out_ty=R.Tensor((2, 5), "float32")
            )
            R.output(y)
        return y


@I.ir_module
class LinearBiasExpected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((30,), "float32"),
        col: T.Buffer((30,), "uint8"),
        row_ptr: T.Buffer((6,), "int32"),
        level_len: T.Buffer((3, 5), "uint8"),
        bias: T.Buffer((5,), "float32"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 5), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((30,), "float32"),
        col: R.Tensor((30,), "uint8"),
        row_ptr: R.Tensor((6,), "int32"),
        level_len: R.Tensor((3, 5), "uint8"),
        B: R.Tensor((5,), "float32"),
    ):
        cls = LinearBiasExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            z = R.call_tir(
                cls.nested_linear,
                (x, values, col, row_ptr, level_len, B, level_i32),
                out_ty=R.Tensor((2, 5), "float32"),
            )
            R.output(z)
        return z


@I.ir_module
class LinearRank3Expected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((6, 8), "float32"),
        values: T.Buffer((30,), "float32"),
        col: T.Buffer((30,), "uint8"),
        row_ptr: T.Buffer((6,), "int32"),
        level_len: T.Buffer((3, 5), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((6, 5), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 3, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((30,), "float32"),
        col: R.Tensor((30,), "uint8"),
        row_ptr: R.Tensor((6,), "int32"),
        level_len: R.Tensor((3, 5), "uint8"),
    ):
        cls = LinearRank3Expected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            x2 = R.reshape(x, R.shape([6, 8]))  # (..., cols) -> (batch, cols) around the kernel
            y2 = R.call_tir(
                cls.nested_linear, (x2, values, col, row_ptr, level_len, level_i32), out_ty=R.Tensor((6, 5), "float32")
            )
            y = R.reshape(y2, R.shape([2, 3, 5]))
            R.output(y)
        return y


@I.ir_module
class MatmulRank3BiasExpected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((6, 8), "float32"),
        values: T.Buffer((30,), "float32"),
        col: T.Buffer((30,), "uint8"),
        row_ptr: T.Buffer((6,), "int32"),
        level_len: T.Buffer((3, 5), "uint8"),
        bias: T.Buffer((5,), "float32"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((6, 5), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 3, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((30,), "float32"),
        col: R.Tensor((30,), "uint8"),
        row_ptr: R.Tensor((6,), "int32"),
        level_len: R.Tensor((3, 5), "uint8"),
        B: R.Tensor((5,), "float32"),
    ):
        cls = MatmulRank3BiasExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            x2 = R.reshape(x, R.shape([6, 8]))
            y2 = R.call_tir(
                cls.nested_linear,
                (x2, values, col, row_ptr, level_len, B, level_i32),
                out_ty=R.Tensor((6, 5), "float32"),
            )
            z = R.reshape(y2, R.shape([2, 3, 5]))
            R.output(z)
        return z


# id: (Before, Expected, batch the kernel sees)
LINEAR_CASES = {
    "linear_permute_dims": (LinearPermuteDims, LinearExpected, 2),
    "matmul_k_by_m": (MatmulKByM, LinearExpected, 2),
    "linear_bias_left": (LinearBiasLeft, LinearBiasExpected, 2),
    "linear_bias_right": (LinearBiasRight, LinearBiasExpected, 2),
    "matmul_k_by_m_bias": (MatmulKByMBias, LinearBiasExpected, 2),
    "linear_rank3_input": (LinearRank3Input, LinearRank3Expected, 6),
    "matmul_rank3_bias": (MatmulRank3Bias, MatmulRank3BiasExpected, 6),
}


def _linear_weights(before):
    """W [rows=5, cols=8] and its level map, as ``before`` writes them (transposed for a matmul)."""
    rng = np.random.default_rng(4)
    W, LM, B = rng.standard_normal((5, 8)).astype(F32), _level_map((5, 8)), rng.standard_normal(5).astype(F32)
    params = {p.name for p in before["main"].params}
    transposed = static_shape(before["main"].params[2]) == (8, 5)
    arrays = {"W": W.T.copy(), "LM": LM.T.copy()} if transposed else {"W": W, "LM": LM}
    if "B" in params:
        arrays["B"] = B
    return W, LM, arrays


@pytest.mark.parametrize("case", LINEAR_CASES, ids=list(LINEAR_CASES))
def test_linear_spelling_lowered(case):
    before, expected, batch = LINEAR_CASES[case]
    W, LM, arrays = _linear_weights(before)
    after = LowerNestedLayers()(bind(before, **arrays))
    fmt, packed = _packed(W, LM)  # 30 of the 40 weights kept
    spec = LinearSpec(Packed.of(fmt), batch, Epilogue(bias="B" in arrays))
    extra = {"B": arrays["B"]} if "B" in arrays else {}
    expected = with_kernels(bind(expected, **packed, **extra), nested_linear=kernel(spec))
    tvm.ir.assert_structural_equal(functions_only(after), expected)


@pytest.mark.parametrize("case", ["linear_bias_left", "matmul_rank3_bias"])
def test_linear_spelling_numerics(case):
    before, _, _ = LINEAR_CASES[case]
    _, _, arrays = _linear_weights(before)
    before = bind(before, **arrays)
    x = np.random.default_rng(5).standard_normal(static_shape(before["main"].params[0])).astype(F32)
    _assert_same_at_every_level(before, LowerNestedLayers()(before), [x], L)


@I.ir_module
class BiasWithOtherUseBefore:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((5, 8), "float32"),
        LM: R.Tensor((5, 8), "int64"),
        B: R.Tensor((5,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.matmul(x, R.permute_dims(w, axes=[1, 0]))
            z = R.add(y, B)
            out = R.multiply(y, z)
            R.output(out)
        return out


@I.ir_module
class BiasWithOtherUseExpected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((30,), "float32"),
        col: T.Buffer((30,), "uint8"),
        row_ptr: T.Buffer((6,), "int32"),
        level_len: T.Buffer((3, 5), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 5), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((30,), "float32"),
        col: R.Tensor((30,), "uint8"),
        row_ptr: R.Tensor((6,), "int32"),
        level_len: R.Tensor((3, 5), "uint8"),
        B: R.Tensor((5,), "float32"),
    ):
        cls = BiasWithOtherUseExpected
        with R.dataflow():
            level_i32 = R.astype(level, "int32")
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level_i32), out_ty=R.Tensor((2, 5), "float32")
            )
            z = R.add(y, B)  # y has another user: the add stays
            out = R.multiply(y, z)
            R.output(out)
        return out


def test_bias_add_with_other_use_not_fused():
    _, _, arrays = _linear_weights(BiasWithOtherUseBefore)
    W, LM, B = arrays["W"], arrays["LM"], arrays["B"]
    before = bind(BiasWithOtherUseBefore, **arrays)
    after = LowerNestedLayers()(before)
    fmt, packed = _packed(W, LM)
    expected = with_kernels(
        bind(BiasWithOtherUseExpected, **packed, B=B), nested_linear=kernel(LinearSpec(Packed.of(fmt), 2))
    )
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(F32)
    _assert_same_at_every_level(before, after, [x], L)


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


@I.ir_module
class WhereNonZeroBefore:
    """``where(cond, W, 1)``: the fallback is not zero, so this is not a masked weight."""

    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.const(1.0, "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            R.output(y)
        return y


@pytest.mark.parametrize(
    "before, params",
    [
        pytest.param(DenseBefore, ("W", "V"), id="dense_conv_and_linear"),
        pytest.param(StaticMaskBefore, ("W", "LM"), id="mask_without_level"),
        pytest.param(WhereNonZeroBefore, ("W", "LM"), id="where_fallback_not_zero"),
    ],
)
def test_untouched(before, params):
    rng = np.random.default_rng(7)
    arrays = {p.name: p for p in before["main"].params}
    values = {
        n: rng.standard_normal(static_shape(arrays[n])).astype(F32)
        if dtype_of(arrays[n]) == F32
        else _level_map(static_shape(arrays[n]))
        for n in params
    }
    mod = bind(before, **values)
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
        pytest.param(
            WeightParamBefore,
            {"W": np.ones((4, 3, 3, 3), F32), "LM": np.full((4, 3, 3, 3), 2**32, "int64")},
            r"conv2d_0 \(y\).*level map holds 4294967296",
            id="level_out_of_range",
        ),
    ],
)
def test_malformed_nested_layer_raises(mod, binds, match):
    mod = bind(mod, **binds)
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
    W, LM = _conv_weights()
    mod = bind(NHWCBefore, W=W, LM=LM)
    with pytest.warns(NestedLoweringWarning, match=r"conv2d_0 \(y\).*NHWC"):
        after = LowerNestedLayers()(mod)
    tvm.ir.assert_structural_equal(after, mod)


@I.ir_module
class DenseConvThenNestedLinear:
    @R.function
    def main(
        x: R.Tensor((1, 6, 6, 3), "float32"),
        level: R.Tensor((), "int64"),
        W1: R.Tensor((4, 3, 3, 3), "float32"),
        LM1: R.Tensor((4, 3, 3, 3), "int64"),
        W2: R.Tensor((5, 8), "float32"),
        LM2: R.Tensor((5, 8), "int64"),
    ):
        with R.dataflow():
            w1 = R.multiply(W1, R.astype(R.greater_equal(LM1, level), "float32"))
            y = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1], data_layout="NHWC", out_layout="NHWC")
            f = R.reshape(y, R.shape([18, 8]))
            w2 = R.multiply(W2, R.astype(R.greater_equal(LM2, level), "float32"))
            z = R.matmul(f, R.permute_dims(w2, axes=[1, 0]))
            R.output(z)
        return z


def test_layer_left_dense_still_counts_towards_num_levels():
    rng = np.random.default_rng(13)
    arrays = {
        "W1": rng.standard_normal((4, 3, 3, 3)).astype(F32),
        "LM1": _level_map((4, 3, 3, 3), levels=4),  # levels 0..3: L = 4, though it stays dense
        "W2": rng.standard_normal((5, 8)).astype(F32),
        "LM2": _level_map((5, 8), levels=2),
    }
    with pytest.warns(NestedLoweringWarning, match=r"conv2d_0 .*NHWC"):
        after = LowerNestedLayers()(bind(DenseConvThenNestedLinear, **arrays))
    assert read_nested_info(after)["num_levels"] == 4
    ops = relax_ops(after["main"])
    assert ops["relax.nn.conv2d"] == 1 and ops["relax.call_tir"] == 1 and "relax.matmul" not in ops


# ------------------------------------------------------------------ pruned layers, L, nested.info
@I.ir_module
class PrunedEverywhereExpected:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64"), B: R.Tensor((5,), "float32")):
        with R.dataflow():
            z = R.broadcast_to(B, R.shape([2, 5]))  # no kernel: the layer is its bias
            R.output(z)
        return z


def test_layer_pruned_everywhere_becomes_bias_without_kernel():
    rng = np.random.default_rng(9)
    W, B = rng.standard_normal((5, 8)).astype(F32), rng.standard_normal(5).astype(F32)
    before = bind(LinearBiasRight, W=W, LM=np.full((5, 8), -1, "int64"), B=B)
    after = LowerNestedLayers()(before)
    tvm.ir.assert_structural_equal(functions_only(after), bind(PrunedEverywhereExpected, B=B))
    info = read_nested_info(after)
    assert info["num_levels"] == 1 and info["layers"][0]["nnz"] == [0] and info["layers"][0]["kernel"] is None
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 8)).astype(F32)], 1)


@I.ir_module
class ConvThenLinear:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W1: R.Tensor((4, 3, 3, 3), "float32"),
        LM1: R.Tensor((4, 3, 3, 3), "int64"),
        W2: R.Tensor((5, 144), "float32"),
        LM2: R.Tensor((5, 144), "int64"),
    ):
        with R.dataflow():
            w1 = R.multiply(W1, R.astype(R.greater_equal(LM1, level), "float32"))
            y = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            f = R.reshape(y, R.shape([1, 144]))
            w2 = R.multiply(R.astype(R.greater_equal(LM2, level), "float32"), W2)
            z = R.matmul(f, R.permute_dims(w2, axes=[1, 0]))
            R.output(z)
        return z


def test_num_levels_and_info_cover_every_layer():
    """L = 1 + the largest value of all level maps; each layer's nnz is listed for all L levels."""
    rng = np.random.default_rng(10)
    W1, LM1 = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.integers(-1, 2, (4, 3, 3, 3)).astype("int64")
    W2, LM2 = rng.standard_normal((5, 144)).astype(F32), rng.integers(-1, 4, (5, 144)).astype("int64")
    before = bind(ConvThenLinear, W1=W1, LM1=LM1, W2=W2, LM2=LM2)
    after = LowerNestedLayers()(before)
    info = json.loads(str(after.attrs[INFO_ATTR]))
    assert info["num_levels"] == 4 and info["format_version"] == FORMAT_VERSION
    conv, fc = info["layers"]
    assert (conv["op"], conv["rows"], conv["cols"], conv["kernel"]) == ("conv2d", 4, 27, "nested_conv2d")
    assert (fc["op"], fc["rows"], fc["cols"], fc["kernel"]) == ("linear", 5, 144, "nested_linear")
    assert conv["nnz"] == [int((LM1 >= lvl).sum()) for lvl in range(4)]  # levels 2, 3: empty
    assert fc["nnz"] == [int((LM2 >= lvl).sum()) for lvl in range(4)]
    fmt = NestedCSR.pack(W2, LM2, 4)
    assert fc["payload_bytes"] == fmt.nbytes and fc["csr_bytes"] == csr_nbytes(LM2)
    assert fc["dense_bytes"] == 5 * 144 * 4
    ops = relax_ops(after["main"])
    assert ops["relax.astype"] == 1 and ops["relax.call_tir"] == 2  # one level cast serves both kernels
    _assert_same_at_every_level(before, after, [rng.standard_normal((1, 3, 6, 6)).astype(F32)], 4)


def test_info_attr_survives_the_relax_build_passes():
    _, _, arrays = _linear_weights(LinearPermuteDims)
    after = LowerNestedLayers()(bind(LinearPermuteDims, **arrays))
    legalized = tvm.transform.Sequential(
        [relax.transform.LegalizeOps(), relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]
    )(after)
    assert read_nested_info(legalized) == read_nested_info(after)


# -------------------------------------------------------------------------- models from frontends
def _graph(mod):
    return LowerNestedLayers()(FoldBatchNorm()(relax.transform.FoldConstant()(mod)))


def _assert_fully_lowered(func, kernels):
    ops = relax_ops(func)
    assert ops["relax.call_tir"] == kernels, ops
    assert not {"relax.nn.conv2d", "relax.matmul", "relax.nn.batch_norm"} & set(ops), ops


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
    after = _graph(from_exported_program(ep))
    _assert_fully_lowered(after["main"], 3)
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
    biases = [
        nh.from_array(rng.standard_normal(4).astype(F32), "cb"),
        nh.from_array(rng.standard_normal(5).astype(F32), "gb"),
    ]
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
        i1 + i2 + i3 + stats + biases,
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
    after = _graph(mod)
    _assert_fully_lowered(after["main"], 3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, 4, 4)).astype(F32)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    for lvl in range(3):
        ref = sess.run(None, {"x": x, "level": np.array(lvl, "int64")})[0]
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(lvl, "int64"))).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=f"level {lvl}")
