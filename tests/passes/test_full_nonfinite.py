"""BroadcastNonFiniteFull: ``full`` / ``full_like`` of -inf, inf or NaN becomes a broadcast constant
(TVM 0.27's ``topi.full`` cannot legalize it); finite fills and dynamic shapes are left alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_nested.relay_passes import BroadcastNonFiniteFull

F32 = "float32"


def _module(fill, shape=(3, 4), like=False):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            if like:
                y = bb.emit(relax.op.full_like(x, relax.const(fill, F32)))
            else:
                y = bb.emit(relax.op.full(relax.ShapeExpr(shape), relax.const(fill, F32), F32))
            out = bb.emit_output(relax.op.add(x, y))
        bb.emit_func_output(out)
    return bb.get()


def _expected(fill, shape=(3, 4)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.broadcast_to(relax.const(fill, F32), relax.ShapeExpr(shape)))
            out = bb.emit_output(relax.op.add(x, y))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("fill", [-math.inf, math.inf, math.nan], ids=["-inf", "inf", "nan"])
@pytest.mark.parametrize("like", [False, True], ids=["full", "full_like"])
def test_non_finite_full_becomes_broadcast_and_builds(fill, like):
    after = BroadcastNonFiniteFull()(_module(fill, like=like))
    tvm.ir.assert_structural_equal(after, _expected(fill))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x + np.float32(fill))


def test_finite_full_untouched():
    before = _module(0.5)
    tvm.ir.assert_structural_equal(BroadcastNonFiniteFull()(before), before)
