"""FoldBatchNorm: inference BatchNorm folded into the conv before it, dense or nested."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.relay_passes import FoldBatchNorm

F32 = "float32"
EPS = 1e-3


def _stats(rng, o=4):
    gamma, var = rng.uniform(0.5, 2.0, o), rng.uniform(0.5, 2.0, o)
    beta, mean = rng.uniform(-1, 1, o), rng.uniform(-1, 1, o)
    return [a.astype(F32) for a in (gamma, beta, mean, var)]


def _folded(W, B, stats):
    gamma, beta, mean, var = (a.astype(np.float64) for a in stats)
    s = gamma / np.sqrt(var + EPS)
    w = (W.astype(np.float64) * s[:, None, None, None]).astype(F32)
    b = ((B - mean) * s + beta).astype(F32).reshape(1, -1, 1, 1)
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


def _bind(mod, **arrays):
    return relax.transform.BindParams("main", arrays)(mod)


def test_dense_conv_bias_bn_folded():
    rng = np.random.default_rng(0)
    W, B = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.standard_normal(4).astype(F32)
    stats = _stats(rng)
    before = _bind(DenseBefore, W=W, B=B, g=stats[0], b=stats[1], m=stats[2], v=stats[3])
    after = FoldBatchNorm()(before)

    w2, b2 = _folded(W, B, stats)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), F32))
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w2), padding=(1, 1, 1, 1)))
            out = bb.emit_output(relax.op.add(y, relax.const(b2)))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    _assert_same_at_every_level(before, after, rng.standard_normal((1, 3, 6, 6)).astype(F32), [None])


# ------------------------------------------------------------------------ nested conv spellings
def _nested_bn_module(spelling, W, LM, B, stats, bias_left=False):
    """conv(x, W_eff) [+ b] -> batch_norm -> [0], W_eff in one of the frontends' nested spellings."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), F32))
    level = relax.Var("level", relax.TensorType((), "int64"))
    with bb.function("main", [x, level]):
        with bb.dataflow():
            ge = bb.emit(relax.op.greater_equal(relax.const(LM), level))
            if spelling == "where":
                w_eff = bb.emit(relax.op.where(ge, relax.const(W), bb.emit(relax.const(0.0, F32))))
            else:
                mask = bb.emit(relax.op.astype(ge, F32))
                w_eff = bb.emit(
                    relax.op.multiply(relax.const(W), mask)
                    if spelling == "mul_w_mask"
                    else relax.op.multiply(mask, relax.const(W))
                )
            y = bb.emit(relax.op.nn.conv2d(x, w_eff, padding=(1, 1, 1, 1)))
            if B is not None:
                bias = relax.const(B.reshape(1, 4, 1, 1))
                y = bb.emit(relax.op.add(bias, y) if bias_left else relax.op.add(y, bias))
            bn = bb.emit(
                relax.op.nn.batch_norm(y, *[relax.const(s) for s in stats], axis=1, epsilon=EPS, training=False)
            )
            out = bb.emit_output(relax.TupleGetItem(bn, 0))
        bb.emit_func_output(out)
    return bb.get()


def _nested_expected(spelling, W2, LM, b2):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), F32))
    level = relax.Var("level", relax.TensorType((), "int64"))
    with bb.function("main", [x, level]):
        with bb.dataflow():
            ge = bb.emit(relax.op.greater_equal(relax.const(LM), level))
            if spelling == "where":
                # the scalar zero bound to a variable comes back inlined
                w_eff = bb.emit(relax.op.where(ge, relax.const(W2), relax.const(0.0, F32)))
            else:
                mask = bb.emit(relax.op.astype(ge, F32))
                w_eff = bb.emit(
                    relax.op.multiply(relax.const(W2), mask)
                    if spelling == "mul_w_mask"
                    else relax.op.multiply(mask, relax.const(W2))
                )
            y = bb.emit(relax.op.nn.conv2d(x, w_eff, padding=(1, 1, 1, 1)))
            out = bb.emit_output(relax.op.add(y, relax.const(b2)))
        bb.emit_func_output(out)
    return bb.get()


SPELLINGS = ["mul_w_mask", "mul_mask_w", "where"]


@pytest.mark.parametrize("with_bias", [True, False], ids=["conv_bias", "no_bias"])
@pytest.mark.parametrize("spelling", SPELLINGS, ids=SPELLINGS)
def test_nested_conv_bn_folded_mask_kept(spelling, with_bias):
    rng = np.random.default_rng(1)
    W, LM = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.integers(-1, 3, (4, 3, 3, 3)).astype("int64")
    B = rng.standard_normal(4).astype(F32) if with_bias else None
    stats = _stats(rng)
    after = FoldBatchNorm()(_nested_bn_module(spelling, W, LM, B, stats))
    w2, b2 = _folded(W, np.zeros(4, F32) if B is None else B, stats)
    tvm.ir.assert_structural_equal(after, _nested_expected(spelling, w2, LM, b2))


@pytest.mark.parametrize("spelling", SPELLINGS, ids=SPELLINGS)
def test_nested_conv_bn_numerics_every_level(spelling):
    rng = np.random.default_rng(2)
    W, LM = rng.standard_normal((4, 3, 3, 3)).astype(F32), rng.integers(-1, 3, (4, 3, 3, 3)).astype("int64")
    before = _nested_bn_module(spelling, W, LM, rng.standard_normal(4).astype(F32), _stats(rng), bias_left=True)
    after = FoldBatchNorm()(before)
    assert "batch_norm" not in after["main"].script()
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
    names = ["g", "b", "m", "v"]
    graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            h.make_node("BatchNormalization", ["c", *names], ["y"], epsilon=EPS),
        ],
        "bn",
        [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 6, 6])],
        [h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 6])],
        [nh.from_array(W, "W"), nh.from_array(B, "B")] + [nh.from_array(s, n) for s, n in zip(stats, names)],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    before = from_onnx(model)
    after = FoldBatchNorm()(before)
    text = after["main"].script()
    assert "batch_norm" not in text and text.count("R.nn.conv2d") == 1
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


@pytest.mark.parametrize(
    "mod, bind_weight",
    [
        pytest.param(BNAfterReluBefore, True, id="bn_not_after_conv"),
        pytest.param(TrainingBNBefore, True, id="training_bn_uses_batch_statistics"),
        pytest.param(NonConstantWeightBefore, False, id="weight_not_constant"),
    ],
)
def test_untouched(mod, bind_weight):
    rng = np.random.default_rng(4)
    arrays = dict(zip("gbmv", _stats(rng)))
    if bind_weight:
        arrays["W"] = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    before = _bind(mod, **arrays)
    tvm.ir.assert_structural_equal(FoldBatchNorm()(before), before)
