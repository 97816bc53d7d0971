"""FoldBatchNorm: inference BatchNorm folded into the conv before it, dense or nested.

Before and Expected are TVMScript with the weights, level maps, biases and BatchNorm statistics as
parameters bound to constants (``ir_checks.bind``); Expected's weight and bias are the folded ones,
computed here in float64 from the statistics. The pass has no error cases: a BatchNorm it cannot
fold is left as it is (the negative cases).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import bind, relax_ops
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.relay_passes import FoldBatchNorm

F32 = "float32"
EPS = 1e-3


def _stats(rng, o=4):
    """BatchNorm parameters g (gamma), b (beta), m (mean), v (var), as the modules name them."""
    gamma, var = rng.uniform(0.5, 2.0, o), rng.uniform(0.5, 2.0, o)
    beta, mean = rng.uniform(-1, 1, o), rng.uniform(-1, 1, o)
    return dict(zip("gbmv", (a.astype(F32) for a in (gamma, beta, mean, var))))


def _folded(W, B, stats):
    """W scaled per output channel by s = g / sqrt(v + eps); the bias (B - m) * s + b, [1, O, 1, 1]."""
    gamma, beta, mean, var = (stats[k].astype(np.float64) for k in "gbmv")
    s = gamma / np.sqrt(var + EPS)
    w = (W.astype(np.float64) * s[:, None, None, None]).astype(F32)
    b = ((B.reshape(-1) - mean) * s + beta).astype(F32).reshape(1, -1, 1, 1)
    return w, b


def _assert_same_at_every_level(before, after, x, levels):
    vms = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu()) for m in (before, after)]
    for lvl in levels:
        args = [tvm.runtime.tensor(x)] + ([] if lvl is None else [tvm.runtime.tensor(np.array(lvl, "int64"))])
        outs = [vm["main"](*args).numpy() for vm in vms]
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5, err_msg=f"level {lvl}")


# ------------------------------------------------------------------------ dense conv (torch form)
@I.ir_module
class DenseBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        B: R.Tensor((4,), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, W, padding=[1, 1, 1, 1])
            z = R.add(y, R.reshape(B, R.shape([1, 4, 1, 1])))
            bn = R.nn.batch_norm(z, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class DenseExpected:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"), W: R.Tensor((4, 3, 3, 3), "float32"), B: R.Tensor((1, 4, 1, 1), "float32")
    ):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            y = R.nn.conv2d(x, W, padding=[1, 1, 1, 1])  # W: the folded weight
            out = R.add(y, B)  # B: the folded bias
            R.output(out)
        return out


def test_dense_conv_bias_bn_folded():
    rng = np.random.default_rng(0)
    W, B = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.standard_normal(4).astype(F32)
    stats = _stats(rng)
    before = bind(DenseBefore, W=W, B=B, **stats)
    after = FoldBatchNorm()(before)
    w2, b2 = _folded(W, B, stats)
    tvm.ir.assert_structural_equal(after, bind(DenseExpected, W=w2, B=b2))
    _assert_same_at_every_level(before, after, rng.standard_normal((1, 3, 6, 6)).astype(F32), [None])


# ------------------------------------------------------------------------ nested conv spellings
@I.ir_module
class MulWMaskBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.add(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]), B)
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class MulWMaskExpected:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))  # the mask is kept
            out = R.add(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]), B)
            R.output(out)
        return out


@I.ir_module
class MulMaskWBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(R.astype(R.greater_equal(LM, level), "float32"), W)
            y = R.add(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]), B)
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class MulMaskWExpected:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(R.astype(R.greater_equal(LM, level), "float32"), W)
            out = R.add(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]), B)
            R.output(out)
        return out


@I.ir_module
class WhereBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.const(0.0, "float32"))
            y = R.add(B, R.nn.conv2d(x, w, padding=[1, 1, 1, 1]))  # the bias on the left
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class WhereExpected:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        B: R.Tensor((1, 4, 1, 1), "float32"),
    ):
        with R.dataflow():
            w = R.where(R.greater_equal(LM, level), W, R.const(0.0, "float32"))
            out = R.add(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]), B)
            R.output(out)
        return out


@I.ir_module
class NoBiasBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        level: R.Tensor((), "int64"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        LM: R.Tensor((4, 3, 3, 3), "int64"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            w = R.multiply(W, R.astype(R.greater_equal(LM, level), "float32"))
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


# id: (Before, Expected, has a conv bias)
NESTED = {
    "mul_w_mask": (MulWMaskBefore, MulWMaskExpected, True),
    "mul_mask_w": (MulMaskWBefore, MulMaskWExpected, True),
    "where_bias_left": (WhereBefore, WhereExpected, True),
    "no_conv_bias": (NoBiasBefore, MulWMaskExpected, False),
}


def _nested_case(case, seed):
    before, expected, has_bias = NESTED[case]
    rng = np.random.default_rng(seed)
    W, LM = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.integers(-1, 3, (4, 3, 3, 3)).astype("int64")
    B = rng.standard_normal((1, 4, 1, 1)).astype(F32)
    stats = _stats(rng)
    before = bind(before, W=W, LM=LM, **({"B": B} if has_bias else {}), **stats)
    w2, b2 = _folded(W, B if has_bias else np.zeros(4, F32), stats)
    return before, bind(expected, W=w2, LM=LM, B=b2), rng


@pytest.mark.parametrize("case", NESTED, ids=list(NESTED))
def test_nested_conv_bn_folded_mask_kept(case):
    before, expected, _ = _nested_case(case, 1)
    tvm.ir.assert_structural_equal(FoldBatchNorm()(before), expected)


@pytest.mark.parametrize("case", ["mul_w_mask", "where_bias_left"])
def test_nested_conv_bn_numerics_every_level(case):
    before, _, rng = _nested_case(case, 2)
    after = FoldBatchNorm()(before)
    _assert_same_at_every_level(before, after, rng.standard_normal((1, 3, 6, 6)).astype(F32), range(3))


def test_onnx_conv_bn_folded():
    """ONNX Conv(+B) -> BatchNormalization as from_onnx spells it."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(3)
    W, B, stats = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.standard_normal(4).astype(F32), _stats(rng)
    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            h.make_node("BatchNormalization", ["c", *"gbmv"], ["y"], epsilon=EPS),
        ],
        "bn",
        [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 6, 6])],
        [h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 6])],
        [nh.from_array(W, "W"), nh.from_array(B, "B")] + [nh.from_array(a, n) for n, a in stats.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    before = from_onnx(model)
    after = FoldBatchNorm()(before)
    ops = relax_ops(after["main"])
    assert ops["relax.nn.conv2d"] == 1 and "relax.nn.batch_norm" not in ops
    _assert_same_at_every_level(before, after, rng.standard_normal((1, 3, 6, 6)).astype(F32), [None])


# ---------------------------------------------------------------------------------- negatives
@I.ir_module
class BNAfterReluBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            y = R.nn.relu(R.nn.conv2d(x, W, padding=[1, 1, 1, 1]))
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class NonConstantWeightBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            bn = R.nn.batch_norm(
                R.nn.conv2d(x, W, padding=[1, 1, 1, 1]), g, b, m, v, axis=1, epsilon=1e-3, training=False
            )
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class TrainingBNBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            bn = R.nn.batch_norm(
                R.nn.conv2d(x, W, padding=[1, 1, 1, 1]), g, b, m, v, axis=1, epsilon=1e-3, training=True
            )
            out = bn[0]
            R.output(out)
        return out


@I.ir_module
class BiasNotPerChannelBefore:
    @R.function
    def main(
        x: R.Tensor((1, 3, 6, 6), "float32"),
        W: R.Tensor((4, 3, 3, 3), "float32"),
        B: R.Tensor((1, 4, 6, 6), "float32"),
        g: R.Tensor((4,), "float32"),
        b: R.Tensor((4,), "float32"),
        m: R.Tensor((4,), "float32"),
        v: R.Tensor((4,), "float32"),
    ):
        with R.dataflow():
            y = R.add(R.nn.conv2d(x, W, padding=[1, 1, 1, 1]), B)
            bn = R.nn.batch_norm(y, g, b, m, v, axis=1, epsilon=1e-3, training=False)
            out = bn[0]
            R.output(out)
        return out


@pytest.mark.parametrize(
    "mod, bound",
    [
        pytest.param(BNAfterReluBefore, ("W",), id="bn_not_after_conv"),
        pytest.param(TrainingBNBefore, ("W",), id="training_bn_uses_batch_statistics"),
        pytest.param(NonConstantWeightBefore, (), id="weight_not_constant"),
        pytest.param(BiasNotPerChannelBefore, ("W", "B"), id="bias_not_per_channel"),
    ],
)
def test_untouched(mod, bound):
    rng = np.random.default_rng(4)
    shapes = {"W": (4, 3, 3, 3), "B": (1, 4, 6, 6)}
    before = bind(mod, **_stats(rng), **{n: rng.standard_normal(shapes[n]).astype(F32) for n in bound})
    tvm.ir.assert_structural_equal(FoldBatchNorm()(before), before)
