"""LevelGuard: ``main`` refuses a level outside ``0..L-1`` before any kernel runs (``R.assert_op``).

L comes from the module's ``nested.info`` attr (what ``LowerNestedLayers`` records) or from the
pass's argument. The guarded ``main`` is impure: its assert may raise.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_nested.relay_passes import LevelGuard
from tvm_nested.relay_passes.level_guard import guard_function


@I.ir_module
class Before:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class Expected:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function(pure=False)
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        R.func_attr({"num_input": 2})
        level_ge_0 = R.greater_equal(level, R.const(0, "int64"))
        level_lt_L = R.less(level, R.const(3, "int64"))
        level_in_range = R.logical_and(level_ge_0, level_lt_L)
        level_checked = R.assert_op(  # noqa: F841 (bound, as the pass binds it)
            level_in_range, level, format="level {} is out of range: this model has levels 0..2"
        )
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


def test_main_guarded_before_its_body():
    tvm.ir.assert_structural_equal(LevelGuard()(Before), Expected)


def _run(mod, level, dtype="int64"):
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    x = np.linspace(-1, 1, 16, dtype="float32").reshape(2, 8)
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array(level, dtype))).numpy(), x


@pytest.mark.parametrize("level", [0, 2])
def test_levels_in_range_run(level):
    out, x = _run(LevelGuard()(Before), level)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


@pytest.mark.parametrize("level", [-1, 3])
def test_levels_out_of_range_raise(level):
    with pytest.raises(AssertionError, match=rf"level {level} is out of range: this model has levels 0\.\.2"):
        _run(LevelGuard()(Before), level)


@I.ir_module
class NoInfo:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


def test_num_levels_argument_overrides_the_attr():
    guarded = LevelGuard(num_levels=2)(NoInfo)
    _run(guarded, 1, "int32")
    with pytest.raises(AssertionError, match=r"levels 0\.\.1"):
        _run(guarded, 2, "int32")


# ---------------------------------------------------------------------------------- negatives
@I.ir_module
class NoLevelNoLayers:
    """Nothing was lowered (no nested layers) and there is no knob: nothing to guard."""

    I.module_attrs({"nested.info": '{"num_levels": 1, "layers": []}'})

    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class NoMain:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function
    def forward(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(NoInfo, id="not_lowered"),
        pytest.param(NoLevelNoLayers, id="no_level_no_layers"),
        pytest.param(NoMain, id="no_main"),
    ],
)
def test_untouched(before):
    tvm.ir.assert_structural_equal(LevelGuard()(before), before)


# --------------------------------------------------------------------------------- error cases
@I.ir_module
class LayersButNoLevel:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class FloatLevel:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "float32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@I.ir_module
class VectorLevel:
    I.module_attrs({"nested.info": '{"num_levels": 3, "layers": [{"name": "linear_0 (y)"}]}'})

    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((1,), "int64")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@pytest.mark.parametrize(
    "before, match",
    [
        pytest.param(LayersButNoLevel, "main has nested layers but no 'level' input", id="no_level_input"),
        pytest.param(FloatLevel, "input 'level' must be a 0-d integer tensor", id="float_level"),
        pytest.param(VectorLevel, "input 'level' must be a 0-d integer tensor", id="vector_level"),
    ],
)
def test_bad_level_input_raises(before, match):
    with pytest.raises(ValueError, match=match):
        LevelGuard()(before)


def test_guard_function_needs_a_level_parameter():
    with pytest.raises(ValueError, match="no 'level' parameter to guard"):
        guard_function(LayersButNoLevel["main"], 3)
