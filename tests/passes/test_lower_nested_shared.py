"""LowerNestedLayers when one weight is used more than once, conv1d, and masked weights that no
kernel serves: Before (built with the BlockBuilder: the call sites repeat) against Expected, and
every level against the unlowered module.

Runs under the well-formed instrument (conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import relax_ops
from nested_kernels import nested_conv2d, nested_linear
from tvm import relax

from tvm_nested.contract import Constant
from tvm_nested.relay_passes import LowerNestedLayers, NestedLoweringWarning, read_nested_info
from tvm_nested.schedules.format import NestedCSR

F32 = "float32"


def _functions_only(mod: tvm.IRModule) -> tvm.IRModule:
    """The module without its attrs (nested.info is checked on its own)."""
    return tvm.IRModule(dict(mod.functions_items()))


def _assert_same_at_every_level(before, after, inputs, num_levels, level_dtype="int64"):
    vms = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu()) for m in (before, after)]
    args = [tvm.runtime.tensor(a) for a in inputs]
    for lvl in range(num_levels):
        lv = tvm.runtime.tensor(np.array(lvl, level_dtype))
        outs = []
        for vm in vms:
            out = vm["main"](*args, lv)
            outs.append((out if hasattr(out, "numpy") else out[0]).numpy())
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5, err_msg=f"level {lvl}")


def _level_map(rng, shape, top=2):
    return rng.integers(-1, top + 1, shape).astype("int64")


def _kernel_call(bb, kernel, name, x, fmt, bias, level, out_ty):
    gv = bb.add_func(kernel, name)
    bb.update_func(gv, kernel.with_attr("global_symbol", gv.name_hint))
    args = [x, *[relax.const(a) for a in fmt.arrays()], *([relax.const(bias)] if bias is not None else []), level]
    return relax.call_tir(gv, args, out_ty=out_ty)


def _main(bb, params, body):
    """main(params) with one dataflow block; body(bb, *params) -> output expr."""
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _var(name, shape, dtype=F32):
    return relax.Var(name, relax.TensorType(shape, dtype))


def _masked(bb, W, LM, level):
    """W * (LM >= level): the frontends' most common spelling of a nested weight."""
    keep = bb.emit(relax.op.astype(bb.emit(relax.op.greater_equal(relax.const(LM), level)), F32))
    return bb.emit(relax.op.multiply(relax.const(W), keep))


def _constants(func) -> set:
    """The distinct constant objects (by identity) a Relax function refers to."""
    found = set()

    def visit(e):
        if isinstance(e, Constant) and isinstance(e.ty, relax.TensorType):
            found.add(e)

    relax.analysis.post_order_visit(func, visit)
    return found


def test_weight_shared_by_three_calls_packed_once():
    """One masked weight feeding three matmuls (a recurrent matrix, a layer called three times):
    one kernel, one set of packed constants, one nested.info record with calls == 3."""
    rng = np.random.default_rng(20)
    W, LM = rng.standard_normal((8, 8)).astype(F32), _level_map(rng, (8, 8))

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_masked(bb, W, LM, level), [1, 0]))
        for _ in range(3):
            x = bb.emit(relax.op.tanh(bb.emit(relax.op.matmul(x, wt))))
        return x

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    fmt = NestedCSR.pack(W, LM, int(LM.max()) + 1)
    kernel = nested_linear(fmt, 2)

    def expected_body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        gv = bb.add_func(kernel, "nested_linear")
        bb.update_func(gv, kernel.with_attr("global_symbol", gv.name_hint))
        consts = [relax.const(a) for a in fmt.arrays()]
        for _ in range(3):
            y = bb.emit(relax.call_tir(gv, [x, *consts, lvl], out_ty=relax.TensorType((2, 8), F32)))
            x = bb.emit(relax.op.tanh(y))
        return x

    expected = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], expected_body)
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    assert len(_constants(after["main"])) == len(fmt.arrays()), "the call sites share one copy of the weight"
    (record,) = read_nested_info(after)["layers"]
    assert record["calls"] == 3 and record["payload_bytes"] == fmt.nbytes
    _assert_same_at_every_level(before, after, [rng.standard_normal((2, 8)).astype(F32)], int(LM.max()) + 1)


def test_shared_weight_at_two_batch_sizes_two_kernels_one_weight():
    rng = np.random.default_rng(21)
    W, LM = rng.standard_normal((6, 4)).astype(F32), _level_map(rng, (6, 4))

    def body(bb, x, level):
        wt = bb.emit(relax.op.permute_dims(_masked(bb, W, LM, level), [1, 0]))
        a = bb.emit(relax.op.matmul(x, wt))
        first = bb.emit(relax.op.strided_slice(x, axes=[0], begin=[0], end=[1]))
        b = bb.emit(relax.op.matmul(first, wt))
        return relax.op.add(bb.emit(relax.op.sum(a, axis=[0], keepdims=True)), b)

    before = _main(relax.BlockBuilder(), [_var("x", (3, 4)), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    assert sum(1 for _, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)) == 2
    assert len(_constants(after["main"])) == len(NestedCSR.pack(W, LM, 3).arrays())
    assert [r["calls"] for r in read_nested_info(after)["layers"]] == [2]
    _assert_same_at_every_level(before, after, [rng.standard_normal((3, 4)).astype(F32)], int(LM.max()) + 1)


def test_conv1d_lowered_as_height_one_conv2d():
    rng = np.random.default_rng(22)
    W, LM, B = (
        rng.standard_normal((4, 3, 3)).astype(F32),
        _level_map(rng, (4, 3, 3)),
        rng.standard_normal(4).astype(F32),
    )
    x_shape = (2, 3, 10)

    def body(bb, x, level):
        w = _masked(bb, W, LM, level)
        y = bb.emit(relax.op.nn.conv1d(x, w, strides=2, padding=(1, 2), dilation=1))
        return relax.op.add(y, relax.const(B.reshape(1, 4, 1)))

    before = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], body)
    after = LowerNestedLayers()(before)
    fmt = NestedCSR.pack(W.reshape(4, 9), LM.reshape(4, 9), int(LM.max()) + 1)
    kernel = nested_conv2d(fmt, (2, 3, 1, 10), (1, 3), (1, 2), (0, 1, 0, 2), (1, 1), 1, True)

    def expected_body(bb, x, level):
        lvl = bb.emit(relax.op.astype(level, "int32"))
        x4 = bb.emit(relax.op.reshape(x, relax.ShapeExpr((2, 3, 1, 10))))
        y = bb.emit(_kernel_call(bb, kernel, "nested_conv2d", x4, fmt, B, lvl, relax.TensorType((2, 4, 1, 6), F32)))
        return relax.op.reshape(y, relax.ShapeExpr((2, 4, 6)))

    expected = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("level", (), "int64")], expected_body)
    tvm.ir.assert_structural_equal(_functions_only(after), expected)
    assert read_nested_info(after)["layers"][0]["op"] == "conv1d"
    _assert_same_at_every_level(before, after, [rng.standard_normal(x_shape).astype(F32)], int(LM.max()) + 1)


@pytest.mark.parametrize(
    "op, w_shape, x_shape",
    [("conv3d", (4, 3, 3, 3, 3), (1, 3, 5, 5, 5)), ("conv2d_transpose", (3, 4, 3, 3), (1, 3, 5, 5))],
    ids=["conv3d", "conv2d_transpose"],
)
def test_masked_weight_no_kernel_serves_warns_naming_it(op, w_shape, x_shape):
    """A masked weight that feeds an op without a nested kernel is named in a warning (never computed
    densely in silence) and still counts towards L, next to a lowered nested layer."""
    rng = np.random.default_rng(23)
    W1, LM1 = rng.standard_normal(w_shape).astype(F32), _level_map(rng, w_shape, top=3)
    W2, LM2 = rng.standard_normal((5, 6)).astype(F32), _level_map(rng, (5, 6), top=1)

    def body(bb, x, h, level):
        y = bb.emit(getattr(relax.op.nn, op)(x, _masked(bb, W1, LM1, level)))
        wt = bb.emit(relax.op.permute_dims(_masked(bb, W2, LM2, level), [1, 0]))
        return relax.Tuple([y, bb.emit(relax.op.matmul(h, wt))])

    before = _main(relax.BlockBuilder(), [_var("x", x_shape), _var("h", (2, 6)), _var("level", (), "int64")], body)
    with pytest.warns(
        NestedLoweringWarning, match=rf"masked weight \w+ \[{w_shape[0]}, .*feeds relax.nn.{op} .*densely"
    ):
        after = LowerNestedLayers()(before)
    info = read_nested_info(after)
    assert info["num_levels"] == 4 and len(info["layers"]) == 1
    assert relax_ops(after["main"])[f"relax.nn.{op}"] == 1


def test_equal_kernels_of_two_weights_stay_apart():
    """Two weights of one shape and one level map have structurally equal kernels; each keeps its own
    (BlockBuilder.add_func would merge them, and the CPU form would then compute both with one's weights)."""
    import tvm_nested

    rng = np.random.default_rng(24)
    W1, W2 = rng.standard_normal((2, 8, 8)).astype(F32)
    LM = _level_map(rng, (8, 8))

    def body(bb, x, level):
        for W in (W1, W2):
            wt = bb.emit(relax.op.permute_dims(_masked(bb, W, LM, level), [1, 0]))
            x = bb.emit(relax.op.nn.relu(bb.emit(relax.op.matmul(x, wt))))
        return x

    before = _main(relax.BlockBuilder(), [_var("x", (2, 8)), _var("level", (), "int64")], body)
    kernels = [gv for gv, f in LowerNestedLayers()(before).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 2
    x = rng.standard_normal((2, 8)).astype(F32)
    rt = tvm_nested.build(before, "llvm").runtime()
    for lvl in range(int(LM.max()) + 1):
        keep = (LM >= lvl).astype(F32)
        ref = np.maximum(np.maximum(x @ (W1 * keep).T, 0) @ (W2 * keep).T, 0)
        np.testing.assert_allclose(rt.run(x, level=lvl)[0], ref, rtol=1e-5, atol=1e-5)
