"""The scheduling passes: ApplyTuningLog (the log's records), ScheduleKernels (the target's rules),
ReportUnscheduled (what no rule scheduled: a warning on CPU, an error on GPU).

Before is a legalized module in TVMScript: a dense PrimFunc (``relu``) and a nested kernel (generated,
a stub with its signature in the module; ``ir_checks.with_kernels``). A record's schedule is written
out in Expected; the default rules' schedules are the schedule modules' business (test_cpu_dense.py,
test_cuda.py), so here they are checked by the loops and thread axes they leave.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tvm
from ir_checks import loop_kinds, thread_tags, with_kernels
from tvm.s_tir import meta_schedule as ms
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.contract import IS_SCHEDULED, Schedule
from tvm_nested.relay_passes import ApplyTuningLog, ReportUnscheduled, ScheduleKernels
from tvm_nested.schedules import LinearSpec, Packed, cpu, kernel, tuning_log
from tvm_nested.schedules.format import NestedCSR
from tvm_nested.schedules.tuning_log import TuningLogError
from tvm_nested.target import parse_target

NEON = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
CUDA = parse_target("cuda -arch=sm_80")
# TVM's FFI carries an exception raised inside a pass back with its message, but a class it does
# not know (TuningLogError) comes back as RuntimeError.
LOG_ERROR = (TuningLogError, RuntimeError)


@I.ir_module
class Before:
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

    @T.prim_func(private=True, s_tir=True)
    def relu(x: T.Buffer((2, 8), "float32"), out: T.Buffer((2, 8), "float32")):
        for i, j in T.grid(2, 8):
            with T.sblock("relu"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = T.max(x[vi, vj], T.float32(0))

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = Before
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            z = R.call_tir(cls.relu, (y,), out_ty=R.Tensor((2, 8), "float32"))
            R.output(z)
        return z


def _before(layout="cpu"):
    """Before with its nested kernel in the CPU form (as the kernels phase leaves it on a CPU) or
    the lowered rows form (what GPU rules schedule)."""
    W = np.random.default_rng(0).standard_normal((8, 8)).astype("float32")
    fmt = NestedCSR.pack(W, (np.arange(64) % 4 - 1).reshape(8, 8), 3)
    spec = LinearSpec(Packed.of(fmt), 2)
    if layout == "cpu":
        spec = cpu.specialize(spec, fmt, cpu.default_knobs(spec, NEON))[0]
    return with_kernels(Before, nested_linear=kernel(spec))


# ------------------------------------------------------------------------------ ApplyTuningLog
@I.ir_module
class RecordApplied:
    @T.prim_func(private=True, s_tir=True)
    def relu(x: T.Buffer((2, 8), "float32"), out: T.Buffer((2, 8), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        for i in T.parallel(2):  # the record's one step
            for j in range(8):
                with T.sblock("relu"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    out[vi, vj] = T.max(x[vi, vj], T.float32(0))


@pytest.fixture
def relu_log(tmp_path):
    """A NEON tuning log with one record for relu: its outer loop parallel."""
    path = tmp_path / "log"
    with tuning_log.open_for_tuning(path, NEON) as log:
        (task,) = [t for t in ms.relax_integration.extract_tasks(_before(), NEON) if t.task_name == "relu"]
        sch = Schedule(task.dispatched[0])
        outer, _ = sch.get_loops(sch.get_sblock("relu"))
        sch.parallel(outer)
        workload = log.database.commit_workload(task.dispatched[0])
        log.database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6], NEON))
    return path


def test_log_record_applied(relu_log):
    before = _before()
    with NEON:
        after = ApplyTuningLog(NEON, relu_log)(before)
    tvm.ir.assert_structural_equal(after["relu"], RecordApplied["relu"])
    for name in ("main", "nested_linear"):  # nothing else has a record
        tvm.ir.assert_structural_equal(after[name], before[name])


def test_log_without_records_changes_nothing(tmp_path):
    with tuning_log.open_for_tuning(tmp_path / "log", NEON):
        pass
    before = _before()
    with NEON:
        tvm.ir.assert_structural_equal(ApplyTuningLog(NEON, tmp_path / "log")(before), before)


def test_log_for_another_target_is_refused(relu_log):
    host = parse_target("llvm -mtriple=x86_64-linux-gnu")
    with pytest.raises(LOG_ERROR, match=r"was made for target .*aarch64.*, not .*x86_64"):
        ApplyTuningLog(host, relu_log)(_before())


# ---------------------------------------------------------------------------- ScheduleKernels
def test_cpu_rules_schedule_the_nested_kernel_and_the_dense_remainder():
    before = _before()
    after = ScheduleKernels(NEON)(before)
    # a nested kernel in its CPU form needs no schedule: the same function, marked scheduled
    expected_kernel = before["nested_linear"].with_attr(IS_SCHEDULED, True).with_attr("global_symbol", "nested_linear")
    tvm.ir.assert_structural_equal(after["nested_linear"], expected_kernel)
    assert loop_kinds(after["relu"])["vectorized"] >= 1 and bool(after["relu"].attrs[IS_SCHEDULED])
    tvm.ir.assert_structural_equal(after["main"], before["main"])


def test_gpu_rules_bind_every_function_to_threads():
    after = ScheduleKernels(CUDA)(_before(layout="rows"))
    for name in ("nested_linear", "relu"):
        assert {"blockIdx.x", "threadIdx.x"} <= thread_tags(after[name]), name


def test_a_lowered_kernel_is_not_a_cpu_kernel():
    """A rows-layout kernel on a CPU (the kernels phase did not run): no rule schedules it."""
    after = ScheduleKernels(NEON)(_before(layout="rows"))
    attrs = after["nested_linear"].attrs
    assert IS_SCHEDULED not in attrs


def test_scheduled_functions_untouched():
    once = ScheduleKernels(NEON)(_before())
    tvm.ir.assert_structural_equal(ScheduleKernels(NEON)(once), once)


# -------------------------------------------------------------------------- ReportUnscheduled
def test_cpu_warns_naming_what_runs_as_plain_loops():
    before = _before(layout="rows")
    with pytest.warns(
        UserWarning, match=r"no llvm schedule for 2 function\(s\) \(1 nested kernels\): nested_linear, relu"
    ):
        after = ReportUnscheduled(NEON)(before)
    tvm.ir.assert_structural_equal(after, before)


def test_gpu_refuses_an_unscheduled_function():
    with pytest.raises(RuntimeError, match=r"no cuda schedule for 2 function\(s\) \(1 nested kernels\): nested_linear"):
        ReportUnscheduled(CUDA)(_before(layout="rows"))


@I.ir_module
class HandWrittenLoops:
    """No blocks (like the rerouting clock and rule): nothing for a schedule rule to do."""

    @T.prim_func(private=True)
    def double(x: T.Buffer((4,), "float32"), out: T.Buffer((4,), "float32")):
        for i in range(4):
            out[i] = x[i] * T.float32(2)


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(lambda: ScheduleKernels(NEON)(_before()), id="everything_scheduled"),
        pytest.param(lambda: HandWrittenLoops, id="no_blocks"),
    ],
)
def test_nothing_to_report(before):
    mod = before()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = ReportUnscheduled(NEON)(mod)
    tvm.ir.assert_structural_equal(after, mod)
