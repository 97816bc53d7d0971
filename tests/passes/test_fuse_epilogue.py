"""FuseEpilogue: a nested kernel and the residual add / activation after it become one kernel.

Before and Expected are TVMScript; the packed arrays are ``main``'s parameters, and the kernels
(generated: ``schedules.kernel``) stand in the modules as stubs with their signatures
(``ir_checks.with_kernels``). The fused kernel is a new function (its signature gains the
residual), named uniquely beside the old one, which goes; ``nested.info`` names the new kernel.
The pass has no error cases: a chain it cannot fuse is left as it is.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir_checks import bind, relax_ops, run_pipeline, with_kernels
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_nested.relay_passes import FuseEpilogue, read_nested_info
from tvm_nested.schedules import Epilogue, LinearSpec, Packed, kernel, spec_of
from tvm_nested.schedules.format import NestedCSR

F32 = "float32"
L = 3
INFO = '{"num_levels": 3, "layers": [{"name": "linear_0 (y)", "kernel": "nested_linear"}]}'
FUSED_INFO = '{"num_levels": 3, "layers": [{"name": "linear_0 (y)", "kernel": "nested_linear1"}]}'


def _packed():
    """An 8x8 nested weight (48 of 64 weights kept, levels 0..2) and its packed arrays."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 8)).astype(F32)
    LM = (np.arange(64) % 4 - 1).reshape(8, 8)
    fmt = NestedCSR.pack(W, LM, L)
    return fmt, dict(zip(("values", "col", "row_ptr", "level_len"), fmt.arrays()))


def _kernel(fmt, **epilogue):
    return kernel(LinearSpec(Packed.of(fmt), 2, Epilogue(**epilogue)))


@I.ir_module
class ResidualReluBefore:
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
        r: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = ResidualReluBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            z = R.add(y, r)
            a = R.nn.relu(z)
            R.output(a)
        return a


@I.ir_module
class ResidualReluExpected:
    I.module_attrs({"nested.info": FUSED_INFO})

    @T.prim_func
    def nested_linear1(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        residual: T.Buffer((2, 8), "float32"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated (out = relu(acc + residual))

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        r: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = ResidualReluExpected
        with R.dataflow():
            a = R.call_tir(
                cls.nested_linear1,
                (x, values, col, row_ptr, level_len, r, level),  # the residual before the level
                out_ty=R.Tensor((2, 8), "float32"),
            )
            R.output(a)
        return a


def _before(mod):
    fmt, packed = _packed()
    return bind(with_kernels(mod, nested_linear=_kernel(fmt)), **packed)


def test_residual_and_relu_fused():
    fmt, packed = _packed()
    expected = with_kernels(
        bind(ResidualReluExpected, **packed), nested_linear1=_kernel(fmt, residual=True, activation="relu")
    )
    after = FuseEpilogue()(_before(ResidualReluBefore))
    tvm.ir.assert_structural_equal(after, expected)
    assert read_nested_info(after)["layers"][0]["kernel"] == "nested_linear1"


def test_residual_and_relu_same_values_at_every_level():
    before = _before(ResidualReluBefore)
    after = FuseEpilogue()(before)
    vms = [relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu()) for m in (before, after)]
    rng = np.random.default_rng(1)
    x, r = (tvm.runtime.tensor(rng.standard_normal((2, 8)).astype(F32)) for _ in range(2))
    for level in range(L):
        lv = tvm.runtime.tensor(np.array(level, "int32"))
        ref, got = (vm["main"](x, r, lv).numpy() for vm in vms)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f"level {level}")


@I.ir_module
class Relu6Before:
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
        r: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = Relu6Before
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            z = R.add(r, y)  # the residual on the left
            a = R.clip(z, R.prim_value(0), R.prim_value(6))  # relu6
            R.output(a)
        return a


@I.ir_module
class Relu6Expected:
    @T.prim_func
    def nested_linear1(
        x: T.Buffer((2, 8), "float32"),
        values: T.Buffer((48,), "float32"),
        col: T.Buffer((48,), "uint8"),
        row_ptr: T.Buffer((9,), "int32"),
        level_len: T.Buffer((3, 8), "uint8"),
        residual: T.Buffer((2, 8), "float32"),
        level: T.Buffer((), "int32"),
        out: T.Buffer((2, 8), "float32"),
    ):
        T.evaluate(0)  # stub: the kernel is generated (out = clip(acc + residual, 0, 6))

    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"),
        r: R.Tensor((2, 8), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = Relu6Expected
        with R.dataflow():
            a = R.call_tir(
                cls.nested_linear1, (x, values, col, row_ptr, level_len, r, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(a)
        return a


def test_left_residual_and_relu6_fused():
    fmt, packed = _packed()
    fused = _kernel(fmt, residual=True, activation="clip", clip=(0.0, 6.0))
    expected = with_kernels(bind(Relu6Expected, **packed), nested_linear1=fused)
    tvm.ir.assert_structural_equal(FuseEpilogue()(_before(Relu6Before)), expected)


# ---------------------------------------------------------------------------------- negatives
@I.ir_module
class TwoUsersBefore:
    """``y`` is used by the relu and by the add: fusing would compute it twice."""

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
        cls = TwoUsersBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            a = R.add(R.nn.relu(y), y)
            R.output(a)
        return a


@I.ir_module
class SharedKernelBefore:
    """One kernel called twice (a shared weight): one kernel, one epilogue, so nothing is fused."""

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
        cls = SharedKernelBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            a = R.nn.relu(y)
            z = R.call_tir(
                cls.nested_linear, (a, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            R.output(z)
        return z


@I.ir_module
class BroadcastAddBefore:
    """An add of another shape (a bias row) is not a residual."""

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
        b: R.Tensor((8,), "float32"),
        level: R.Tensor((), "int32"),
        values: R.Tensor((48,), "float32"),
        col: R.Tensor((48,), "uint8"),
        row_ptr: R.Tensor((9,), "int32"),
        level_len: R.Tensor((3, 8), "uint8"),
    ):
        cls = BroadcastAddBefore
        with R.dataflow():
            y = R.call_tir(
                cls.nested_linear, (x, values, col, row_ptr, level_len, level), out_ty=R.Tensor((2, 8), "float32")
            )
            z = R.add(y, b)
            R.output(z)
        return z


@I.ir_module
class NotNestedBefore:
    """A call_tir of a plain PrimFunc (no ``nested.spec``) is not a nested layer."""

    @T.prim_func(s_tir=True)
    def copy(x: T.Buffer((2, 8), "float32"), out: T.Buffer((2, 8), "float32")):
        for i, j in T.grid(2, 8):
            with T.sblock("copy"):
                vi, vj = T.axis.remap("SS", [i, j])
                out[vi, vj] = x[vi, vj]

    @R.function
    def main(x: R.Tensor((2, 8), "float32")):
        cls = NotNestedBefore
        with R.dataflow():
            y = R.call_tir(cls.copy, (x,), out_ty=R.Tensor((2, 8), "float32"))
            a = R.nn.relu(y)
            R.output(a)
        return a


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(lambda: _before(TwoUsersBefore), id="result_with_two_users"),
        pytest.param(lambda: _before(SharedKernelBefore), id="kernel_called_twice"),
        pytest.param(lambda: _before(BroadcastAddBefore), id="add_of_another_shape"),
        pytest.param(lambda: NotNestedBefore, id="not_a_nested_kernel"),
        pytest.param(lambda: FuseEpilogue()(_before(ResidualReluBefore)), id="fused_already"),
    ],
)
def test_untouched(before):
    mod = before()
    tvm.ir.assert_structural_equal(FuseEpilogue()(mod), mod)


# ------------------------------------------------------------------------ through the frontend
def test_residual_relu_and_relu6_from_torch_match_torch():
    """conv -> BN -> relu, conv + x -> relu, conv -> relu6: three fused kernels, no elementwise op left
    in main, and the compiled model equals torch at every level."""
    import torch
    from torch import nn

    import tvm_nested
    from tvm_nested.authoring import nn as tnn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            z = torch.relu(self.c2(y) + x)
            return nn.functional.relu6(self.c3(z))

    torch.manual_seed(0)
    model = Block().eval()
    for p in model.b1.parameters():
        nn.init.normal_(p)
    nested = tnn.nest(model, {n: [0.5, 0.2] for n in ("c1", "c2", "c3")}).eval()
    x = torch.randn(1, 8, 6, 6)
    mod = tvm_nested.from_torch(nested, (x,), {"level": torch.tensor(0)})
    graph = run_pipeline(mod)
    ops = relax_ops(graph["main"])
    assert ops["relax.call_tir"] == 3 and not {"relax.nn.relu", "relax.add", "relax.clip"} & set(ops)
    epilogues = sorted(
        (e.residual, e.activation, e.clip) for f in graph.functions.values() if (s := spec_of(f)) for e in [s.epilogue]
    )
    assert epilogues == [(False, "clip", (0.0, 6.0)), (False, "relu", None), (True, "relu", None)]
    rt = tvm_nested.build(mod, "llvm").runtime()
    for level in (0, 1):
        ref = nested(x, level=torch.tensor(level)).detach().numpy()
        np.testing.assert_allclose(rt.run(x.numpy(), level=level)[0], ref, rtol=1e-5, atol=1e-5)
