"""SplitStages: ``main`` split into stage functions that each take the level (for rerouting).

Before is ``main`` as the graph phase leaves it (level guard, an int32 cast of the level, two nested
kernels); Expected keeps it and adds the stages. The packed arrays are parameters of each function
bound to constants (``ir_checks.bind``); the kernels are generated and stand in the modules as
stubs with their signatures (``ir_checks.with_kernels``). The pass runs only when a build asks for
stages, so it has no "nothing to match" case; the plan it records is checked as a dict.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import bind, functions_only, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.relay_passes import SplitStages, merge_stages, read_stage_plan
from tvm_nested.schedules import LinearSpec, Packed, kernel
from tvm_nested.schedules.format import NestedCSR

F32 = "float32"
L = 3
INFO = '{"num_levels": 3, "layers": []}'


@I.ir_module
class Before:
    I.module_attrs({"nested.info": INFO})

    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @T.prim_func
    def nested_linear1(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function(pure=False)
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
        values1: R.Tensor((48,), "float32"),
        col1: R.Tensor((48,), "uint8"),
        row_ptr1: R.Tensor((9,), "int32"),
        level_len1: R.Tensor((3, 8), "uint8"),
    ):
        R.func_attr({"num_input": 2})
        cls = Before
        ok = R.logical_and(R.greater_equal(level, R.const(0, "int64")), R.less(level, R.const(3, "int64")))
        _ = R.assert_op(ok, level, format="level {} is out of range")
        with R.dataflow():
            lv = R.astype(level, "int32")
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            a = R.nn.relu(y)
            z = R.call_tir(
                cls.nested_linear1, (a, values1, col1, row_ptr1, level_len1, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(z)
        return z


@I.ir_module
class Expected:
    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @T.prim_func
    def nested_linear1(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function(pure=False)
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
        values1: R.Tensor((48,), "float32"),
        col1: R.Tensor((48,), "uint8"),
        row_ptr1: R.Tensor((9,), "int32"),
        level_len1: R.Tensor((3, 8), "uint8"),
    ):
        R.func_attr({"num_input": 2})
        cls = Expected
        ok = R.logical_and(R.greater_equal(level, R.const(0, "int64")), R.less(level, R.const(3, "int64")))
        _ = R.assert_op(ok, level, format="level {} is out of range")
        with R.dataflow():
            lv = R.astype(level, "int32")
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            a = R.nn.relu(y)
            z = R.call_tir(
                cls.nested_linear1, (a, values1, col1, row_ptr1, level_len1, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(z)
        return z

    @R.function
    def nested_stage_0(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = Expected
        with R.dataflow():
            lv = R.astype(level, "int32")  # recomputed where needed, never carried; the guard is not
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            live_out = (y,)
            R.output(live_out)
        return live_out

    @R.function
    def nested_stage_1(
        y: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values1: R.Tensor((48,), "float32"),
        col1: R.Tensor((48,), "uint8"),
        row_ptr1: R.Tensor((9,), "int32"),
        level_len1: R.Tensor((3, 8), "uint8"),
    ):
        cls = Expected
        with R.dataflow():
            lv = R.astype(level, "int32")
            a = R.nn.relu(y)
            z = R.call_tir(
                cls.nested_linear1, (a, values1, col1, row_ptr1, level_len1, lv), out_ty=R.Tensor((2, 8), "float32")
            )
            result = z
            R.output(result)
        return result


def _layers():
    """Two 8x8 nested weights (48 of 64 kept each, levels 0..2): their kernel and packed arrays."""
    rng = np.random.default_rng(0)
    LM = (np.arange(64) % 4 - 1).reshape(8, 8)
    fmts = [NestedCSR.pack(rng.standard_normal((8, 8)).astype(F32), LM, L) for _ in range(2)]
    names = ("values", "col", "row_ptr", "level_len")
    packed = [dict(zip(names, f.arrays())) for f in fmts]
    packed1 = {f"{k}1": v for k, v in packed[1].items()}
    return kernel(LinearSpec(Packed.of(fmts[0]), 2)), packed[0], packed1


def _before():
    k, packed, packed1 = _layers()
    return bind(with_kernels(Before, nested_linear=k, nested_linear1=k), **packed, **packed1)


def test_two_balanced_stages():
    k, packed, packed1 = _layers()
    expected = with_kernels(Expected, nested_linear=k, nested_linear1=k)
    expected = bind(bind(bind(expected, **packed, **packed1), "nested_stage_0", **packed), "nested_stage_1", **packed1)
    after = SplitStages(2)(_before())
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    assert read_stage_plan(after) == {
        "num_stages": 2,
        "functions": ["nested_stage_0", "nested_stage_1"],
        "inputs": [["x"], ["y"]],
        "outputs": [["y"], None],
        "cuts": ["y"],  # after the first kernel (y and relu(y) are as wide: the cut stays)
        "macs": [2 * 48, 2 * 48],  # batch x the level-0 non-zeros of each kernel
        "main_inputs": ["x", "level"],
    }


def test_stages_in_turn_compute_main_at_every_level():
    after = SplitStages(2)(_before())
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((2, 8)).astype(F32))
    for level in range(L):
        lv = tvm.runtime.tensor(np.array(level, "int64"))
        (y,) = vm["nested_stage_0"](x, lv)
        staged = vm["nested_stage_1"](y, lv).numpy()
        np.testing.assert_array_equal(staged, vm["main"](x, lv).numpy(), err_msg=f"level {level}")


@pytest.mark.parametrize(
    "cuts, cut_after",
    [
        pytest.param([0], "y", id="after_nested_layer_0"),
        pytest.param(["a"], "a", id="after_a_named_binding"),
    ],
)
def test_explicit_cuts(cuts, cut_after):
    plan = read_stage_plan(SplitStages(None, cuts=cuts)(_before()))
    assert plan["cuts"] == [cut_after] and plan["outputs"][0] == [cut_after]


def test_more_stages_than_layers_are_capped():
    assert read_stage_plan(SplitStages(10)(_before()))["num_stages"] == 2


@I.ir_module
class Residual:
    """Two layers and a residual add (a block), then two more layers: the narrow points of the block
    mode are after the add (one value carried) and after the third layer, not inside the block."""

    I.module_attrs({"nested.info": INFO})

    @T.prim_func
    def nested_linear(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int64"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = Residual
        w = (values, col, row_ptr, level_len)
        with R.dataflow():
            lv = R.astype(level, "int32")
            a = R.call_tir(cls.nested_linear, (x, *w, lv), out_ty=R.Tensor((2, 8), "float32"))  # carried: x, a
            b = R.call_tir(cls.nested_linear, (a, *w, lv), out_ty=R.Tensor((2, 8), "float32"))  # x, b
            c = R.add(b, x)  # c: the block's output, the narrowest point after b
            d = R.nn.relu(c)
            e = R.call_tir(cls.nested_linear, (d, *w, lv), out_ty=R.Tensor((2, 8), "float32"))
            f = R.call_tir(cls.nested_linear, (e, *w, lv), out_ty=R.Tensor((2, 8), "float32"))
            R.output(f)
        return f


def _residual():
    k, packed, _ = _layers()
    return bind(with_kernels(Residual, nested_linear=k), **packed)


def test_blocks_cut_at_the_narrow_points():
    after = SplitStages("blocks")(_residual())
    plan = read_stage_plan(after)
    assert plan["cuts"] == ["c", "e"] and plan["num_stages"] == 3
    assert plan["inputs"] == [["x"], ["c"], ["e"]]
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((2, 8)).astype(F32))
    for level in range(L):
        lv = tvm.runtime.tensor(np.array(level, "int64"))
        (c,) = vm["nested_stage_0"](x, lv)
        (e,) = vm["nested_stage_1"](c, lv)
        np.testing.assert_array_equal(vm["nested_stage_2"](e, lv).numpy(), vm["main"](x, lv).numpy())


@pytest.mark.parametrize(
    "cost, decision_us, cuts, groups",
    [
        pytest.param([100, 10, 10, 100], 1.0, ["a"], [[0], [1, 2, 3]], id="cheap_stages_merge"),
        pytest.param([100, 10, 10, 100], 0.0, ["a", "b", "c"], [[0], [1], [2], [3]], id="free_decisions_keep_all"),
        pytest.param([100, 100, 10], 1.0, ["a"], [[0], [1, 2]], id="short_last_group_joins"),
        pytest.param([10, 10, 10, 10], 1.0, [], [[0, 1, 2, 3]], id="one_stage"),
    ],
)
def test_merge_stages(cost, decision_us, cuts, groups):
    plan = {"num_stages": 4 if len(cost) == 4 else 3, "cuts": ["a", "b", "c"][: len(cost) - 1]}
    assert merge_stages(plan, cost, decision_us, 0.02) == (cuts, groups)  # a stage must cost >= 50 x decision


@pytest.mark.parametrize(
    "cost, decision_us, share, match",
    [
        pytest.param([1.0, 2.0], 1.0, 0.02, r"one finite cost >= 0 per stage \(3\)", id="length"),
        pytest.param([1.0, -2.0, 1.0], 1.0, 0.02, "one finite cost >= 0", id="negative"),
        pytest.param([1.0, 2.0, 1.0], 1.0, 0.0, "0 < max_share <= 1", id="share"),
    ],
)
def test_merge_stages_refuses_bad_measurements(cost, decision_us, share, match):
    with pytest.raises(ValueError, match=match):
        merge_stages({"num_stages": 3, "cuts": ["a", "b"]}, cost, decision_us, share)


# --------------------------------------------------------------------------------- error cases
@I.ir_module
class NoLevel:
    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class NothingFromInputs:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.astype(level, "int32")
            R.output(y)
        return y


@pytest.mark.parametrize(
    "mod, split, match",
    [
        pytest.param(_before, SplitStages(None, cuts=[7]), r"layer 7: main has nested layers 0\.\.1", id="no_layer"),
        pytest.param(_before, SplitStages(None, cuts=["a", "y"]), "increasing order", id="cuts_out_of_order"),
        pytest.param(_before, SplitStages(None, cuts=["z"]), "leave every stage non-empty", id="empty_last_stage"),
        pytest.param(_before, SplitStages(None, cuts=["nope"]), "no binding named 'nope'", id="no_binding"),
        pytest.param(_before, SplitStages(None, cuts=[1.5]), "a cut is a nested-layer index", id="cut_type"),
        pytest.param(_before, SplitStages(0), "num_stages must be a positive integer", id="zero_stages"),
        pytest.param(_before, SplitStages("many"), "positive integer or 'blocks'", id="unknown_mode"),
        pytest.param(lambda: NoLevel, SplitStages(2), "main has no 'level' parameter", id="no_level"),
        pytest.param(lambda: NothingFromInputs, SplitStages(2), "computes nothing from its inputs", id="no_work"),
    ],
)
def test_bad_split_raises(mod, split, match):
    with pytest.raises(ValueError, match=match):
        split(mod())
