"""NormalizeTakeIndices: a constant negative ``take`` index made non-negative (TVM 0.27 imports
``x[-1]`` as ``take(x, -1, mode="fast")``, which reads out of bounds); other takes untouched."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from tvm_nested.relay_passes import NormalizeTakeIndices

F32 = "float32"


def _main(bb, params, body):
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _var(name, shape, dtype=F32):
    return relax.Var(name, relax.TensorType(shape, dtype))


def test_negative_constant_take_index_made_non_negative():
    """TVM 0.27 imports x[-1] as take(x, -1, mode="fast"), which reads out of bounds."""

    def module(index):
        return _main(
            relax.BlockBuilder(),
            [_var("x", (5, 3))],
            lambda bb, x: relax.op.take(x, relax.const(index, "int64"), axis=0, mode="fast"),
        )

    before, expected = module(-1), module(4)
    after = NormalizeTakeIndices()(before)
    tvm.ir.assert_structural_equal(after, expected)
    tvm.ir.assert_structural_equal(NormalizeTakeIndices()(expected), expected)  # nothing to fix: unchanged
    x = np.arange(15, dtype=F32).reshape(5, 3)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), x[-1])
