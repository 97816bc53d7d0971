"""AddDeadlineFunction: ``main_deadline`` runs the stages and lets the rule, compiled in with the
latency table, choose the level of each next stage on the device.

Before is a staged module (``nested.stages`` plan, two stage functions; what they compute does not
matter to this pass). Expected adds ``main_deadline`` and ``nested_latency_table`` in TVMScript,
the table a parameter bound to the constant; the clock, elapsed-time and rule PrimFuncs are
generated (``schedules.reroute_rule``, tested against its NumPy reference in test_reroute.py) and
stand in Expected as stubs with their signatures. The pass runs only when a build asks for a
deadline function, so it has no "nothing to match" case.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from ir_checks import bind, functions_only, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.contract import REROUTE_ATTR
from tvm_nested.relay_passes import AddDeadlineFunction, AddStageTimer
from tvm_nested.schedules import reroute_rule

TABLE = np.array([[10.0, 5.0, 2.0], [20.0, 10.0, 4.0]])  # (stages, levels) microseconds
INFO = '{"num_levels": 3, "layers": []}'
PLAN = '{"num_stages": 2, "functions": ["nested_stage_0", "nested_stage_1"], "inputs": [["x"], ["y"]], "outputs": [["y"], null]}'  # noqa: E501


@I.ir_module
class Before:
    I.module_attrs({"nested.info": INFO, "nested.stages": PLAN})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            z = R.add(y, y)
            R.output(z)
        return z

    @R.function
    def nested_stage_0(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            out = (y,)
            R.output(out)
        return out

    @R.function
    def nested_stage_1(y: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            z = R.add(y, y)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            z = R.add(y, y)
            R.output(z)
        return z

    @R.function
    def nested_stage_0(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            out = (y,)
            R.output(out)
        return out

    @R.function
    def nested_stage_1(y: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            z = R.add(y, y)
            R.output(z)
        return z

    @T.prim_func
    def nested_clock_ns(dep: T.Buffer((), "int64"), out: T.Buffer((), "int64")):
        T.evaluate(0)  # stub: generated

    @T.prim_func
    def nested_elapsed_us(t0_ns: T.Buffer((), "int64"), stage: T.int32, out: T.Buffer((), "float64")):
        T.evaluate(0)  # stub: generated

    @T.prim_func
    def nested_reroute_rule(
        elapsed_us: T.Buffer((), "float64"),
        deadline_us: T.Buffer((), "float64"),
        requested: T.Buffer((), "int64"),
        current: T.Buffer((), "int64"),
        acc: T.Buffer((3,), "float64"),
        table: T.Buffer((2, 3), "float64"),
        stage: T.int32,
        policy: T.Buffer((), "int32"),
        aggressiveness: T.Buffer((), "float64"),
        out: T.Buffer((), "int64"),
        acc_out: T.Buffer((3,), "float64"),
    ):
        T.evaluate(0)  # stub: generated

    @T.prim_func
    def nested_reroute_start(
        t0_ns: T.Buffer((), "int64"), state: T.Buffer((2,), "float64"), acc: T.Buffer((3,), "float64")
    ):
        T.evaluate(0)  # stub: generated

    @T.prim_func
    def nested_reroute_finish(
        elapsed_us: T.Buffer((), "float64"),
        current: T.Buffer((), "int64"),
        acc: T.Buffer((3,), "float64"),
        table: T.Buffer((2, 3), "float64"),
        t0_ns: T.Buffer((), "int64"),
        state: T.Buffer((2,), "float64"),
    ):
        T.evaluate(0)  # stub: generated

    @R.function(pure=False)
    def main_deadline(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        deadline_us: R.Tensor((), "float64"),
        policy: R.Tensor((), "int32"),
        aggressiveness: R.Tensor((), "float64"),
        state: R.Tensor((2,), "float64"),
        table: R.Tensor((2, 3), "float64"),
    ):
        cls = Expected
        level_ge_0 = R.greater_equal(level, R.const(0, "int64"))
        level_lt_L = R.less(level, R.const(3, "int64"))
        level_in_range = R.logical_and(level_ge_0, level_lt_L)
        _ = R.assert_op(level_in_range, level, format="level {} is out of range: this model has levels 0..2")
        t0_ns = R.call_tir(cls.nested_clock_ns, (level,), out_ty=R.Tensor((), "int64"))
        acc0 = R.call_tir(cls.nested_reroute_start, (t0_ns, state), out_ty=R.Tensor((3,), "float64"))
        # before each stage: the clock, then the rule picks the stage's level on the device
        elapsed0 = R.call_tir(cls.nested_elapsed_us, (t0_ns, R.prim_value(T.int32(0))), out_ty=R.Tensor((), "float64"))
        decision0 = R.call_tir(
            cls.nested_reroute_rule,
            (elapsed0, deadline_us, level, level, acc0, table, R.prim_value(T.int32(0)), policy, aggressiveness),
            out_ty=[R.Tensor((), "int64"), R.Tensor((3,), "float64")],
        )
        level0 = decision0[0]
        acc1 = decision0[1]
        stage0 = cls.nested_stage_0(x, level0)
        y = stage0[0]
        elapsed1 = R.call_tir(cls.nested_elapsed_us, (t0_ns, R.prim_value(T.int32(1))), out_ty=R.Tensor((), "float64"))
        decision1 = R.call_tir(
            cls.nested_reroute_rule,
            (elapsed1, deadline_us, level, level0, acc1, table, R.prim_value(T.int32(1)), policy, aggressiveness),
            out_ty=[R.Tensor((), "int64"), R.Tensor((3,), "float64")],
        )
        level1 = decision1[0]
        acc2 = decision1[1]
        stage1 = cls.nested_stage_1(y, level1)
        elapsed2 = R.call_tir(cls.nested_elapsed_us, (t0_ns, R.prim_value(T.int32(2))), out_ty=R.Tensor((), "float64"))
        # what the next request starts from: this one's slowdown and when it ended
        state_out = R.call_tir(
            cls.nested_reroute_finish, (elapsed2, level1, acc2, table, t0_ns), out_ty=R.Tensor((2,), "float64")
        )
        levels = R.concat((R.reshape(level0, R.shape([1])), R.reshape(level1, R.shape([1]))), axis=0)
        levels_i32 = R.astype(levels, "int32")
        ends = R.concat((R.reshape(elapsed1, R.shape([1])), R.reshape(elapsed2, R.shape([1]))), axis=0)
        return (stage1, levels_i32, state_out, ends)

    @R.function
    def nested_latency_table(table: R.Tensor((2, 3), "float64")):
        return table


def _expected(overhead_us=0.0):
    expected = with_kernels(
        Expected,
        nested_reroute_rule=reroute_rule.reroute_rule(TABLE, "int64", overhead_us),
        nested_reroute_start=reroute_rule.reroute_start(TABLE),
        nested_reroute_finish=reroute_rule.reroute_finish(TABLE, "int64"),
        nested_clock_ns=reroute_rule.clock_ns("int64"),
        nested_elapsed_us=reroute_rule.elapsed_us(),
    )
    return bind(bind(expected, "main_deadline", table=TABLE), "nested_latency_table", table=TABLE)


def test_deadline_function_added():
    after = AddDeadlineFunction(TABLE)(Before)
    tvm.ir.assert_structural_equal(functions_only(after), _expected())
    assert json.loads(str(after.attrs[REROUTE_ATTR])) == {
        "latency_table_us": TABLE.tolist(),
        "reroute_rule": "evidence",
        "reroute_aggressiveness": reroute_rule.DEFAULT_AGGRESSIVENESS,
        "reroute_overhead_us": 0.0,
    }


def test_default_rule_and_overhead_compiled_in():
    after = AddDeadlineFunction(TABLE, policy="paper", aggressiveness=0.3, overhead_us=50.0)(Before)
    tvm.ir.assert_structural_equal(functions_only(after), _expected(overhead_us=50.0))
    record = json.loads(str(after.attrs[REROUTE_ATTR]))
    assert (record["reroute_rule"], record["reroute_aggressiveness"], record["reroute_overhead_us"]) == (
        "paper",
        0.3,
        50.0,
    )


def test_clock_shared_with_the_stage_timer():
    """After AddStageTimer (the pipeline's order) the clock functions are there: reused, not added twice."""
    after = AddDeadlineFunction(TABLE)(AddStageTimer()(Before))
    names = sorted(gv.name_hint for gv in after.get_global_vars())
    assert names.count("nested_clock_ns") == 1 and "nested_stage_times" in names
    without_timer = tvm.IRModule({gv: f for gv, f in after.functions_items() if gv.name_hint != "nested_stage_times"})
    tvm.ir.assert_structural_equal(without_timer, _expected())


@pytest.mark.parametrize(
    "deadline_us, level, policy, levels",
    [
        pytest.param(1e12, 0, 0, [0, 0], id="huge_deadline_never_switches"),
        pytest.param(0.0, 0, 0, [0, 2], id="paper_deadline_zero_runs_the_rest_sparsest"),
        pytest.param(0.0, 0, 1, [2, 2], id="evidence_deadline_zero_runs_all_sparsest"),
        pytest.param(0.0, 2, 0, [2, 2], id="sparsest_stays"),
    ],
)
def test_levels_chosen_on_the_device(deadline_us, level, policy, levels):
    vm = relax.VirtualMachine(tvm.compile(AddDeadlineFunction(TABLE)(Before), "llvm"), tvm.cpu())
    x = np.linspace(-1, 1, 16, dtype="float32").reshape(2, 8)
    args = [
        tvm.runtime.tensor(a)
        for a in (
            x,
            np.array(level, "int64"),
            np.array(deadline_us, "float64"),
            np.array(policy, "int32"),
            np.array(0.0, "float64"),
            np.zeros(2, "float64"),
        )
    ]
    out, chosen, state, ends = vm["main_deadline"](*args)
    np.testing.assert_array_equal(chosen.numpy(), levels)
    np.testing.assert_array_equal(out.numpy(), 2 * np.maximum(x, 0))
    assert state.numpy()[1] > 0 and np.all(np.diff(ends.numpy()) >= 0)
    np.testing.assert_array_equal(vm["nested_latency_table"]().numpy(), TABLE)


# --------------------------------------------------------------------------------- error cases
@I.ir_module
class NotStaged:
    I.module_attrs({"nested.info": INFO})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class NotLowered:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@pytest.mark.parametrize(
    "mod, table, match",
    [
        pytest.param(NotStaged, TABLE, r"no stages: build it with stages=K", id="not_staged"),
        pytest.param(NotLowered, TABLE, "needs a module lowered by LowerNestedLayers", id="not_lowered"),
        pytest.param(Before, TABLE[:1], r"shape \(stages, levels\) = \(2, 3\), got \(1, 3\)", id="table_shape"),
        pytest.param(Before, -TABLE, "finite, non-negative microseconds", id="negative_table"),
    ],
)
def test_bad_input_raises(mod, table, match):
    with pytest.raises(ValueError, match=match):
        AddDeadlineFunction(table)(mod)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"policy": "adaptive"}, "unknown rerouting policy 'adaptive'", id="policy"),
        pytest.param({"aggressiveness": -1.0}, "aggressiveness must be a finite number >= 0", id="aggressiveness"),
        pytest.param({"overhead_us": float("nan")}, "overhead_us must be a finite number >= 0", id="overhead"),
    ],
)
def test_bad_rule_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AddDeadlineFunction(TABLE, **kwargs)(Before)
