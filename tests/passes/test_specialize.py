"""SpecializeKernels: on CPU targets every lowered (rows layout) nested kernel becomes the CPU kernel
for its knobs (a tuning log's choice, else the target family's defaults), with its weights packed
again for them; other targets keep the lowered kernels.

Before and Expected are TVMScript with the packed arrays as ``main``'s parameters bound to
constants; the kernels are generated and stand in the modules as stubs with their signatures
(``ir_checks.with_kernels``), so the change of signature (a conv's sub-rows) shows. The knobs
themselves are the CPU kernels' business (test_kernels.py); here a conv takes them from a tuning
log, so the repacking is fixed by the test, and a linear the target's defaults.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tvm
from ir_checks import bind, functions_only, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.contract import INFO_ATTR, Constant
from tvm_nested.relay_passes import SpecializeKernels, read_nested_info
from tvm_nested.schedules import Conv2dSpec, CPUConvKnobs, LinearSpec, Packed, cpu, kernel, knob_table, tuning_log
from tvm_nested.schedules.format import NestedCSR
from tvm_nested.schedules.tuning_log import TuningLogError
from tvm_nested.target import parse_target

F32 = "float32"
L = 3
NEON = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
PACKED = ("values", "col", "row_ptr", "level_len")


def _conv():
    """A 4x4x3x3 nested conv (108 of 144 weights kept, levels 0..2): spec, packed format, arrays."""
    W = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(F32)
    fmt = NestedCSR.pack(W.reshape(4, -1), (np.arange(144) % 4 - 1).reshape(4, 36), L)
    spec = Conv2dSpec(Packed.of(fmt), (1, 4, 6, 6), (3, 3), padding=(1, 1, 1, 1))
    return spec, fmt, dict(zip(PACKED, fmt.arrays()))


def _info(kernel_name, op, rows, cols):
    record = {"name": f"{op}_0 (y)", "op": op, "rows": rows, "cols": cols, "kernel": kernel_name}
    return json.dumps({"num_levels": L, "layers": [record]})


@I.ir_module
class ConvBefore:
    I.module_attrs({"nested.info": _info("nested_conv2d", "conv2d", 4, 36)})

    @T.prim_func
    def nested_conv2d(
        x: T.Buffer((1, 4, 6, 6), "float32"),
        values: T.Buffer((108,), "float32"),
        col: T.Buffer((108,), "uint8"),
        row_ptr: T.Buffer((5,), "int32"),
        level_len: T.Buffer((3, 4), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((1, 4, 6, 6), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((1, 4, 6, 6), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((108,), "float32"),
        col: R.Tensor((108,), "uint8"),
        row_ptr: R.Tensor((5,), "int32"),
        level_len: R.Tensor((3, 4), "uint8"),
    ):
        cls = ConvBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_conv2d, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((1, 4, 6, 6), "float32")
            )
            R.output(y)
        return y


@I.ir_module
class ConvExpected:
    @T.prim_func
    def nested_conv2d1(
        x: T.Buffer((1, 4, 6, 6), "float32"),
        values: T.Buffer((108,), "float32"),
        offset: T.Buffer((108,), "uint8"),  # each non-zero's input offset, not its column
        row_ptr: T.Buffer((9,), "int32"),  # 2 input-channel blocks: 8 sub-rows
        level_len: T.Buffer((3, 8), "uint8"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((1, 4, 6, 6), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated

    @R.function
    def main(
        x: R.Tensor((1, 4, 6, 6), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((108,), "float32"),
        offset: R.Tensor((108,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = ConvExpected
        with R.dataflow():
            y = R.call_tir(
                cls.nested_conv2d1,
                (x, values, offset, row_ptr, level_len, level),
                out_ty=R.Tensor((1, 4, 6, 6), "float32"),
            )
            R.output(y)
        return y


KNOBS = CPUConvKnobs(vl=4, tile=16, cblocks=2)


@pytest.fixture
def conv_log(tmp_path):
    """A tuning log for NEON whose knob table holds KNOBS for the conv."""
    spec, fmt, _ = _conv()
    with tuning_log.open_for_tuning(tmp_path / "log", NEON) as log:
        key = knob_table.kernel_key(spec, fmt.level_len)
        knob_table.save_knobs(log, {key: {"op": "conv2d", "knobs": dataclasses.asdict(KNOBS)}})
    return tmp_path / "log"


def _conv_before():
    spec, _, packed = _conv()
    return bind(with_kernels(ConvBefore, nested_conv2d=kernel(spec)), **packed)


def test_conv_repacked_for_the_logs_knobs(conv_log):
    spec, fmt, _ = _conv()
    cpu_spec, repacked = cpu.specialize(spec, fmt, KNOBS)
    expected = bind(
        with_kernels(ConvExpected, nested_conv2d1=kernel(cpu_spec)),
        **dict(zip(("values", "offset", "row_ptr", "level_len"), repacked.arrays())),
    )
    after = SpecializeKernels(NEON, conv_log)(_conv_before())
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    (layer,) = read_nested_info(after)["layers"]
    assert layer["kernel"] == "nested_conv2d1" and layer["tuned"] is True
    assert layer["knobs"] == dataclasses.asdict(KNOBS) and layer["payload_bytes"] == repacked.nbytes


def test_conv_same_values_at_every_level(conv_log):
    before = _conv_before()
    after = SpecializeKernels(NEON, conv_log)(before)
    vms = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu()) for m in (before, after)]
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(F32))
    for level in range(L):
        lv = tvm.runtime.tensor(np.array(level, "int32"))
        ref, got = (vm["main"](x, lv).numpy() for vm in vms)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"level {level}")


# ------------------------------------------------------------------- linear: the target's defaults
@I.ir_module
class LinearBefore:
    I.module_attrs({"nested.info": _info("nested_linear", "linear", 8, 8)})

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
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = LinearBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(y)
        return y

    @R.function
    def nested_stage_0(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = LinearBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(y)
        return y


@I.ir_module
class LinearExpected:
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

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = LinearExpected
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear1, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(y)
        return y

    @R.function
    def nested_stage_0(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = LinearExpected
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear1, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(y)
        return y


def _linear():
    W = np.random.default_rng(2).standard_normal((8, 8)).astype(F32)
    fmt = NestedCSR.pack(W, (np.arange(64) % 4 - 1).reshape(8, 8), L)
    return LinearSpec(Packed.of(fmt), 2), fmt, dict(zip(PACKED, fmt.arrays()))


def _linear_before():
    spec, _, packed = _linear()
    mod = with_kernels(LinearBefore, nested_linear=kernel(spec))
    return bind(bind(mod, **packed), "nested_stage_0", **packed)


def test_linear_gets_the_targets_default_knobs():
    spec, fmt, packed = _linear()
    knobs = cpu.default_knobs(spec, NEON)
    cpu_spec, _ = cpu.specialize(spec, fmt, knobs)
    expected = with_kernels(LinearExpected, nested_linear1=kernel(cpu_spec))
    expected = bind(bind(expected, **packed), "nested_stage_0", **packed)  # a linear keeps its operands
    after = SpecializeKernels(NEON)(_linear_before())
    tvm.ir.assert_structural_equal(functions_only(after), expected)
    (layer,) = read_nested_info(after)["layers"]
    assert layer["kernel"] == "nested_linear1" and layer["tuned"] is False
    assert layer["knobs"] == dataclasses.asdict(knobs)


def test_call_sites_share_one_copy_of_the_weights():
    """main and a stage function call one kernel: after the pass they pass the same constants."""
    after = SpecializeKernels(NEON)(_linear_before())
    operands = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            operands.append(list(expr.args[1].fields)[1:5])

    for name in ("main", "nested_stage_0"):
        relax.analysis.post_order_visit(after[name], visit)
    first, second = operands
    assert all(isinstance(c, Constant) and c.same_as(d) for c, d in zip(first, second))


# ---------------------------------------------------------------------------------- negatives
@I.ir_module
class NotNested:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), level: R.Tensor((), "int32")):
        with R.dataflow():
            y = R.nn.relu(x)
            R.output(y)
        return y


@pytest.mark.parametrize(
    "before, target",
    [
        pytest.param(_linear_before, parse_target("cuda -arch=sm_80"), id="gpu_target_keeps_lowered_kernels"),
        pytest.param(lambda: NotNested, NEON, id="no_nested_kernel"),
        pytest.param(lambda: with_kernels(LinearBefore, nested_linear=kernel(_linear()[0])), NEON, id="not_packed"),
        pytest.param(lambda: SpecializeKernels(NEON)(_linear_before()), NEON, id="specialised_already"),
    ],
)
def test_untouched(before, target):
    mod = before()
    tvm.ir.assert_structural_equal(SpecializeKernels(target)(mod), mod)


# --------------------------------------------------------------------------------- error cases
# TVM's FFI carries an exception raised inside a pass back with its message, but a class it does
# not know (TuningLogError) comes back as RuntimeError.
LOG_ERROR = (TuningLogError, RuntimeError)


def test_damaged_knob_table_is_named(tmp_path):
    with tuning_log.open_for_tuning(tmp_path / "log", NEON) as log:
        (log.path / knob_table.KNOBS_FILE).write_text('{"version": 1, "kernels": {')
    with pytest.raises(LOG_ERROR, match=rf"{knob_table.KNOBS_FILE} line 1 \(the knob table\) is not valid JSON"):
        SpecializeKernels(NEON, tmp_path / "log")(_linear_before())


def test_knob_table_of_another_version_is_refused(tmp_path):
    with tuning_log.open_for_tuning(tmp_path / "log", NEON) as log:
        (log.path / knob_table.KNOBS_FILE).write_text('{"version": 99, "kernels": {}}')
    with pytest.raises(LOG_ERROR, match="not a knob table of this tvm_nested: version 99"):
        SpecializeKernels(NEON, tmp_path / "log")(_linear_before())


def test_info_attr_records_the_new_payload():
    after = SpecializeKernels(NEON)(_linear_before())
    assert INFO_ATTR in after.attrs and read_nested_info(after)["layers"][0]["payload_bytes"] == _linear()[1].nbytes
