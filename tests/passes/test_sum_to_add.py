"""SumToAdd: the Relax ONNX frontend's ``Sum`` (stack of no-op broadcasts, then sum over axis 0)
becomes plain adds; every other stack-and-sum is left as it is. The pass has no error cases."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.relay_passes import SumToAdd


@I.ir_module
class TwoInputsBefore:
    """ONNX ``Sum(a, b)`` as TVM 0.27's frontend imports it."""

    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            s = R.stack((R.broadcast_to(a, R.shape([2, 3])), R.broadcast_to(b, R.shape([2, 3]))), axis=0)
            out = R.sum(s, axis=[0])
            R.output(out)
        return out


@I.ir_module
class TwoInputsExpected:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            out = R.add(a, b)
            R.output(out)
        return out


@I.ir_module
class ThreeInputsBefore:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32"), c: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            s = R.stack(
                (
                    R.broadcast_to(a, R.shape([2, 3])),
                    R.broadcast_to(b, R.shape([2, 3])),
                    R.broadcast_to(c, R.shape([2, 3])),
                ),
                axis=0,
            )
            out = R.sum(s, axis=[0])
            R.output(out)
        return out


@I.ir_module
class ThreeInputsExpected:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32"), c: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            ab = R.add(a, b)
            out = R.add(ab, c)
            R.output(out)
        return out


@I.ir_module
class NoBroadcastBefore:
    """A stack of the inputs themselves (no broadcasts) is the same sum."""

    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            out = R.sum(R.stack((a, b), axis=0), axis=[0])
            R.output(out)
        return out


@pytest.mark.parametrize(
    "before, expected",
    [
        pytest.param(TwoInputsBefore, TwoInputsExpected, id="two_inputs"),
        pytest.param(ThreeInputsBefore, ThreeInputsExpected, id="three_inputs"),
        pytest.param(NoBroadcastBefore, TwoInputsExpected, id="no_broadcasts"),
    ],
)
def test_stacked_sum_becomes_adds(before, expected):
    tvm.ir.assert_structural_equal(SumToAdd()(before), expected)


def test_same_values():
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((2, 3)).astype("float32") for _ in range(3)]
    outs = []
    for mod in (ThreeInputsBefore, SumToAdd()(ThreeInputsBefore)):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6)


# ---------------------------------------------------------------------------------- negatives
@I.ir_module
class RealBroadcastBefore:
    """``a`` is broadcast along the rows: the sum is not ``add(a, b)`` of the inputs as they are."""

    @R.function
    def main(a: R.Tensor((1, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            s = R.stack((R.broadcast_to(a, R.shape([2, 3])), R.broadcast_to(b, R.shape([2, 3]))), axis=0)
            out = R.sum(s, axis=[0])
            R.output(out)
        return out


@I.ir_module
class OtherAxisBefore:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            out = R.sum(R.stack((a, b), axis=0), axis=[1])
            R.output(out)
        return out


@I.ir_module
class KeepDimsBefore:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            out = R.sum(R.stack((a, b), axis=0), axis=[0], keepdims=True)
            R.output(out)
        return out


@I.ir_module
class StackAxis1Before:
    @R.function
    def main(a: R.Tensor((2, 3), "float32"), b: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            out = R.sum(R.stack((a, b), axis=1), axis=[0])
            R.output(out)
        return out


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(RealBroadcastBefore, id="broadcast_not_a_no_op"),
        pytest.param(OtherAxisBefore, id="sum_over_another_axis"),
        pytest.param(KeepDimsBefore, id="keepdims"),
        pytest.param(StackAxis1Before, id="stack_along_another_axis"),
    ],
)
def test_untouched(before):
    tvm.ir.assert_structural_equal(SumToAdd()(before), before)
