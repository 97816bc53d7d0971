"""AddStageTimer: ``nested_stage_times`` runs every stage at one level and reads the device clock
after each (what ``profile_stages`` builds the latency table from).

Before is a staged module (``nested.stages`` plan, two stage functions; what they compute does not
matter to this pass). Expected adds ``nested_stage_times`` in TVMScript; the clock PrimFuncs are
generated (``schedules.reroute_rule``) and stand in Expected as stubs with their signatures. The pass
runs only when a build asks for stages, so it has no "nothing to match" case.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import functions_only, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.relay_passes import AddStageTimer
from tvm_nested.schedules import reroute_rule

INFO = '{"num_levels": 3, "layers": []}'
PLAN = '{"num_stages": 2, "functions": ["nested_stage_0", "nested_stage_1"], "inputs": [["x"], ["y"]], "outputs": [["y"], null]}'  # noqa: E501


@I.ir_module
class Before:
    I.module_attrs({"nested.info": INFO, "nested.stages": PLAN})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            z = R.add(y, y)
            R.output(z)
        return z

    @R.function
    def nested_stage_0(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            out = (y,)
            R.output(out)
        return out

    @R.function
    def nested_stage_1(y: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            z = R.add(y, y)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            z = R.add(y, y)
            R.output(z)
        return z

    @R.function
    def nested_stage_0(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            out = (y,)
            R.output(out)
        return out

    @R.function
    def nested_stage_1(y: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            z = R.add(y, y)
            R.output(z)
        return z

    @T.prim_func
    def nested_clock_ns(dep: T.Buffer((), "int32"), out: T.Buffer((), "int64")):
        T.evaluate(0)  # stub: generated

    @T.prim_func
    def nested_elapsed_us(t0_ns: T.Buffer((), "int64"), stage: T.int32, out: T.Buffer((), "float64")):
        T.evaluate(0)  # stub: generated

    @R.function(pure=False)
    def nested_stage_times(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        cls = Expected
        level_ge_0 = R.greater_equal(level, R.const(0, "int32"))
        level_lt_L = R.less(level, R.const(3, "int32"))
        level_in_range = R.logical_and(level_ge_0, level_lt_L)
        _ = R.assert_op(level_in_range, level, format="level {} is out of range: this model has levels 0..2")
        t0_ns = R.call_tir(cls.nested_clock_ns, (level,), out_ty=R.Tensor((), "int64"))
        stage0 = cls.nested_stage_0(x, level)  # every stage at the one level
        y = stage0[0]
        end0 = R.call_tir(cls.nested_elapsed_us, (t0_ns, R.prim_value(T.int32(1))), out_ty=R.Tensor((), "float64"))
        stage1 = cls.nested_stage_1(y, level)
        end1 = R.call_tir(cls.nested_elapsed_us, (t0_ns, R.prim_value(T.int32(2))), out_ty=R.Tensor((), "float64"))
        ends = R.concat((R.reshape(end0, R.shape([1])), R.reshape(end1, R.shape([1]))), axis=0)
        return (stage1, ends)


def test_stage_timer_added():
    after = AddStageTimer()(Before)
    expected = with_kernels(
        Expected, nested_clock_ns=reroute_rule.clock_ns("int32"), nested_elapsed_us=reroute_rule.elapsed_us()
    )
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    assert after.attrs["nested.stages"] == PLAN  # the plan is left as it is


def test_stage_ends_read_on_the_device():
    vm = relax.VirtualMachine(tvm.compile(AddStageTimer()(Before), "llvm"), tvm.cpu())
    x = np.linspace(-1, 1, 16, dtype="float32").reshape(2, 8)
    out, ends = vm["nested_stage_times"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(1, "int32")))
    np.testing.assert_array_equal(out.numpy(), 2 * np.maximum(x, 0))
    assert ends.numpy().shape == (2,) and 0 < ends.numpy()[0] <= ends.numpy()[1]
    with pytest.raises(Exception, match="out of range"):
        vm["nested_stage_times"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(3, "int32")))


@I.ir_module
class NotStaged:
    I.module_attrs({"nested.info": INFO})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class NotLowered:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@pytest.mark.parametrize(
    "mod, match",
    [
        pytest.param(NotStaged, r"no stages \(run SplitStages first\)", id="not_staged"),
        pytest.param(NotLowered, "needs a module lowered by LowerNestedLayers", id="not_lowered"),
    ],
)
def test_bad_input_raises(mod, match):
    with pytest.raises(ValueError, match=match):
        AddStageTimer()(mod)
