"""Default CPU schedules for the dense remainder (schedules/cpu_dense.py): numerics and structure."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import block_names, loop_kinds
from tvm import relax

from tvm_nested.pipeline import pipeline
from tvm_nested.schedules.cpu_dense import schedule_dense_func

HOST = tvm.target.Target("llvm")


def _legalized(mod, stop_after="legalize"):
    """``mod`` through the pipeline's legalize phase (and on to ``stop_after``)."""
    with HOST, tvm.transform.PassContext(opt_level=3):
        return pipeline(HOST, start_at="legalize", stop_after=stop_after)(mod)


def _module(kind: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    if kind == "conv_relu_pool":
        x = relax.Var("x", relax.TensorType((1, 3, 12, 12), "float32"))
        w = relax.Var("w", relax.TensorType((8, 3, 3, 3), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, padding=(1, 1)))
                y = bb.emit(relax.op.nn.relu(y))
                y = bb.emit(relax.op.nn.max_pool2d(y, (3, 3), (2, 2), padding=(1, 1)))
                y = bb.emit(relax.op.nn.adaptive_avg_pool2d(y, (1, 1)))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    else:  # "matmul_softmax": a batch-1 linear left dense, then softmax
        x = relax.Var("x", relax.TensorType((1, 40), "float32"))
        w = relax.Var("w", relax.TensorType((24, 40), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w, [1, 0])))
                y = bb.emit(relax.op.nn.softmax(y, axis=-1))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return bb.get()


def _inputs(kind: str):
    rng = np.random.default_rng(7)
    if kind == "conv_relu_pool":
        return [
            rng.standard_normal((1, 3, 12, 12)).astype(np.float32),
            rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        ]
    return [rng.standard_normal((1, 40)).astype(np.float32), rng.standard_normal((24, 40)).astype(np.float32)]


def _run(mod, args):
    with HOST, tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("kind", ["conv_relu_pool", "matmul_softmax"])
def test_scheduled_dense_matches_unscheduled(kind):
    mod = _module(kind)
    args = _inputs(kind)
    expect = _run(mod, args)
    scheduled = _legalized(mod, stop_after="schedule")
    prims = [f for _, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert prims and all(bool(f.attrs["tirx.is_scheduled"]) for f in prims)
    assert any(loop_kinds(f)["parallel"] for f in prims)
    assert any(loop_kinds(f)["vectorized"] for f in prims)
    np.testing.assert_allclose(_run(scheduled, args), expect, rtol=1e-5, atol=1e-5)


def test_rule_leaves_nested_kernels_and_other_targets_alone():
    from nested_kernels import nested_linear

    from tvm_nested.schedules import NestedCSR

    fmt = NestedCSR.pack(np.ones((4, 8), np.float32), np.zeros((4, 8), np.int32), 1)
    assert schedule_dense_func(nested_linear(fmt, 1, False), HOST) is None
    legal = _legalized(_module("matmul_softmax"))
    func = next(f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert schedule_dense_func(func, tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) is None
    scheduled = schedule_dense_func(func, HOST)
    assert scheduled is not None and schedule_dense_func(scheduled, HOST) is None  # already scheduled


def test_strided_pool_inlines_its_pad_and_unrolls_the_window():
    """A 3x3/2 max pool: vectorising the output columns would gather every other input, so the
    rule keeps them scalar, computes the pad where it is read (no padded copy) and unrolls the
    window; the result matches the unscheduled pool."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 15, 15), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), padding=(1, 1)))
        bb.emit_func_output(out)
    mod = bb.get()
    legal = _legalized(mod)
    func = next(f for _, f in legal.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert "pad_temp" in block_names(func)
    scheduled = schedule_dense_func(func, HOST)
    assert "pad_temp" not in block_names(scheduled)
    kinds = loop_kinds(scheduled)
    assert kinds["unrolled"] == 2 and kinds["parallel"] == 1 and not kinds["vectorized"]
    args = [np.random.default_rng(3).standard_normal((1, 4, 15, 15)).astype(np.float32)]
    np.testing.assert_allclose(_run(_legalized(mod, stop_after="schedule"), args), _run(mod, args), rtol=0, atol=0)


def test_bool_blocks_build_and_match():
    """``slice_scatter`` (torch.export's circular padding) legalizes into bool mask buffers; the
    rule keeps their blocks scalar (TVM 0.27 cannot vectorise bool) and the module builds and runs."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 10, 10), "float32"))
    y = relax.Var("y", relax.TensorType((1, 3, 10, 1), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.slice_scatter(x, y, 9, 10, 1, axis=3))
        bb.emit_func_output(out)
    mod = bb.get()
    rng = np.random.default_rng(3)
    args = [
        rng.standard_normal((1, 3, 10, 10)).astype(np.float32),
        rng.standard_normal((1, 3, 10, 1)).astype(np.float32),
    ]
    scheduled = _legalized(mod, stop_after="schedule")
    (func,) = [f for _, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert bool(func.attrs["tirx.is_scheduled"]) and loop_kinds(func)["vectorized"]
    expect = args[0].copy()
    expect[..., 9:10] = args[1]
    np.testing.assert_array_equal(_run(scheduled, args), expect)
