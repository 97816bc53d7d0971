"""Nested kernels (unscheduled and scheduled with schedule_cpu) against their NumPy references.

Every case runs at every level of the model (including levels above the layer's own maximum).
Each kernel is compiled once per case and variant (module-scope cache).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from ir_checks import block_names, loop_kinds
from nested_kernels import nested_conv2d, nested_linear, respecialized

from tvm_nested.schedules import (
    CPU_KNOBS,
    NestedCSR,
    nested_conv2d_ref,
    nested_linear_ref,
    schedule_cpu,
    spec_of,
    target_family,
)

HOST = tvm.target.Target("llvm")
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
VARIANTS = ["unscheduled", "scheduled"]
# linear only: the interleaved partial-sum structure (LinearSpec.lanes), unscheduled and scheduled
LINEAR_VARIANTS = [*VARIANTS, "lanes3_unscheduled", "lanes3_scheduled", "lanes1_scheduled"]


def _level_map(shape, num_levels, kind, rng):
    lm = rng.integers(-1, num_levels, size=shape).astype(np.int32)
    rows = shape[0]
    if kind == "all_pruned":
        lm[:] = -1
    elif kind == "empty_rows":
        lm[rng.permutation(rows)[: max(1, rows // 3)]] = -1
    elif kind == "below_model_L":  # the model has L levels, this layer stops at level 1
        lm = np.minimum(lm, 1)
    return lm


def _assert_close(got, ref):
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


def _run(ex, args):
    tensors = [tvm.runtime.tensor(np.array(a, copy=True, order="C")) for a in args]
    ex["main"](*tensors)
    return tensors[-1].numpy()


# ------------------------------------------------------------------------------------ linear
@dataclass(frozen=True)
class LinearCase:
    rows: int
    cols: int
    batch: int
    has_bias: bool
    num_levels: int = 4
    kind: str = "random"


LINEAR_CASES = {
    "gemv_17x33_bias": LinearCase(17, 33, 1, True),
    "batch5_odd_13x300": LinearCase(13, 300, 5, False),  # uint16 columns, odd batch
    "batch40_64x96_bias": LinearCase(64, 96, 40, True),  # vector split of the batch
    "empty_rows_batch5": LinearCase(12, 20, 5, True, kind="empty_rows"),
    "all_pruned_gemv": LinearCase(6, 10, 1, True, num_levels=3, kind="all_pruned"),
    "layer_max_below_L_batch3": LinearCase(9, 16, 3, False, num_levels=5, kind="below_model_L"),
    "one_level_batch2": LinearCase(5, 7, 2, False, num_levels=1),
    "gemv_64x700_bias": LinearCase(64, 700, 1, True, num_levels=5),  # lanes: full + tail
    "batch8_40x90": LinearCase(40, 90, 8, True),  # 4 lanes x one vector of batch
}


@functools.cache
def _linear(case_id: str, variant: str):
    case = LINEAR_CASES[case_id]
    rng = np.random.default_rng(len(case_id) * 1009 + case.rows)
    w = rng.standard_normal((case.rows, case.cols)).astype(np.float32)
    lm = _level_map(w.shape, case.num_levels, case.kind, rng)
    x = rng.standard_normal((case.batch, case.cols)).astype(np.float32)
    bias = rng.standard_normal(case.rows).astype(np.float32) if case.has_bias else None
    fmt = NestedCSR.pack(w, lm, case.num_levels)
    func = nested_linear(fmt, case.batch, case.has_bias, lanes=3 if variant.startswith("lanes3") else 1)
    if variant.endswith("scheduled") and not variant.endswith("unscheduled"):
        knobs = CPU_KNOBS[target_family(HOST)]
        if variant == "lanes1_scheduled":  # the plain structure, scheduled
            knobs = dataclasses.replace(knobs, lanes=1)
        func = schedule_cpu(func, HOST, knobs)
        assert func is not None
    ex = tvm.compile(func, target=HOST)

    def call(level: int):
        args = [x, *fmt.arrays()] + ([bias] if case.has_bias else [])
        args += [np.array(level, np.int32), np.zeros((case.batch, case.rows), np.float32)]
        return _run(ex, args)

    return call, (x, w, lm, bias), case


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("case_id", list(LINEAR_CASES))
def test_linear_every_level(case_id, variant):
    call, (x, w, lm, bias), case = _linear(case_id, variant)
    for level in range(case.num_levels):
        _assert_close(call(level), nested_linear_ref(x, (w, lm), level, bias))


# ------------------------------------------------------------------------------------ conv2d
@dataclass(frozen=True)
class ConvCase:
    x_shape: tuple
    out_channels: int
    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    has_bias: bool = False
    num_levels: int = 3
    kind: str = "random"


CONV_CASES = {
    "3x3_pad1_bias": ConvCase((1, 4, 9, 9), 6, (3, 3), padding=(1, 1, 1, 1), has_bias=True),
    "1x1_odd": ConvCase((2, 5, 7, 11), 3, (1, 1)),
    "stride2_asym_pad": ConvCase((1, 3, 10, 9), 4, (3, 3), strides=(2, 2), padding=(0, 1, 2, 0), has_bias=True),
    "dilation2": ConvCase((1, 2, 12, 10), 4, (3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)),
    "groups2_5x3": ConvCase((1, 4, 8, 8), 6, (5, 3), padding=(2, 1, 2, 1), groups=2, has_bias=True),
    "depthwise_3x3_s2": ConvCase((2, 6, 9, 9), 6, (3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=6),
    "wide_row_70": ConvCase((1, 2, 3, 70), 3, (1, 3), padding=(0, 1, 0, 1)),  # OW > tile
    "empty_rows": ConvCase((1, 3, 6, 6), 8, (3, 3), padding=(1, 1, 1, 1), kind="empty_rows", has_bias=True),
    "all_pruned": ConvCase((1, 2, 5, 5), 3, (3, 3), has_bias=True, kind="all_pruned"),
    "layer_max_below_L": ConvCase((1, 3, 6, 5), 4, (2, 2), num_levels=5, kind="below_model_L"),
    "stem_7x7_s2": ConvCase((1, 3, 15, 15), 4, (7, 7), strides=(2, 2), padding=(3, 3, 3, 3), has_bias=True),
    "s3x2_d2x1": ConvCase((1, 2, 13, 12), 3, (3, 3), strides=(3, 2), padding=(1, 2, 1, 0), dilation=(2, 1)),
    "1x1_s2_14": ConvCase((1, 8, 14, 14), 8, (1, 1), strides=(2, 2), has_bias=True),
}
# conv only: the rows layout as built (unscheduled; schedule_cpu turns it into the flat one), the
# flat layout unscheduled, and the dense path (scatter + dense conv) forced at some / every level
CONV_VARIANTS = [
    *VARIANTS,
    "flat_unscheduled",
    "flat_dense1_unscheduled",
    "flat_dense1_scheduled",
    "flat_dense_all_scheduled",
]


@functools.cache
def _conv(case_id: str, variant: str):
    c = CONV_CASES[case_id]
    rng = np.random.default_rng(len(case_id) * 7919 + c.out_channels)
    _n, ch, _h, _w = c.x_shape
    kh, kw = c.kernel_size
    w = rng.standard_normal((c.out_channels, ch // c.groups, kh, kw)).astype(np.float32)
    lm = _level_map(w.shape, c.num_levels, c.kind, rng)
    x = rng.standard_normal(c.x_shape).astype(np.float32)
    bias = rng.standard_normal(c.out_channels).astype(np.float32) if c.has_bias else None
    fmt = NestedCSR.pack(w.reshape(c.out_channels, -1), lm.reshape(c.out_channels, -1), c.num_levels)
    func = nested_conv2d(fmt, c.x_shape, c.kernel_size, c.strides, c.padding, c.dilation, c.groups, c.has_bias)
    if variant.startswith("flat"):
        dense = {"dense1": [min(1, c.num_levels - 1)], "dense_all": list(range(c.num_levels))}
        levels = next((v for k, v in dense.items() if f"_{k}_" in variant), [])
        func = respecialized(func, layout="flat", dense_levels=tuple(levels))
        assert list(spec_of(func).dense_levels) == levels
    if variant.endswith("scheduled") and not variant.endswith("unscheduled"):
        func = schedule_cpu(func, HOST)
        assert func is not None
        assert spec_of(func).layout == "flat"
    ex = tvm.compile(func, target=HOST)
    out_shape = spec_of(func).out_shape

    def call(level: int):
        args = [x, *fmt.arrays()] + ([bias] if c.has_bias else [])
        args += [np.array(level, np.int32), np.zeros(out_shape, np.float32)]
        return _run(ex, args)

    return call, (x, w, lm, bias), c


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("case_id", list(CONV_CASES))
def test_conv2d_every_level(case_id, variant):
    call, (x, w, lm, bias), c = _conv(case_id, variant)
    for level in range(c.num_levels):
        ref = nested_conv2d_ref(x, (w, lm), level, c.kernel_size, c.strides, c.padding, c.dilation, c.groups, bias)
        _assert_close(call(level), ref)


# ------------------------------------------------------------------------ out-of-range levels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "level,clamped", [(99, "top"), (-5, "bottom"), (2**31 - 1, "top")], ids=["99", "-5", "int32_max"]
)
def test_out_of_range_level_is_clamped(level, clamped, variant):
    """The caller refuses bad levels; the kernel itself must stay memory-safe (it clamps)."""
    for call, case in [
        (_linear("batch5_odd_13x300", variant)[0], LINEAR_CASES["batch5_odd_13x300"]),
        (_conv("3x3_pad1_bias", variant)[0], CONV_CASES["3x3_pad1_bias"]),
    ]:
        expect = call(case.num_levels - 1 if clamped == "top" else 0)
        np.testing.assert_array_equal(call(level), expect)


# ---------------------------------------------------------------------- schedules and targets
def test_scheduled_kernel_is_parallel_and_vectorised():
    fmt = NestedCSR.pack(np.ones((8, 8), np.float32), np.zeros((8, 8), np.int32), 1)
    func = schedule_cpu(nested_linear(fmt, 16, False), HOST)
    kinds = loop_kinds(func)
    assert kinds["parallel"] and kinds["vectorized"]
    assert func.attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_compiles_for_aarch64_neon(op):
    fmt = NestedCSR.pack(np.ones((8, 18), np.float32), np.ones((8, 18), np.int32), 2)
    if op == "linear":
        func = nested_linear(fmt, 8, True)
    else:
        func = nested_conv2d(fmt, (1, 2, 6, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True)
    func = schedule_cpu(func, AARCH64)
    ex = tvm.compile(func, target=AARCH64)
    llvm_ir = ex.mod.inspect_source("ll")
    assert "aarch64" in llvm_ir and "<4 x float>" in llvm_ir


@pytest.mark.parametrize(
    "target,family",
    [
        ({"kind": "llvm", "mcpu": "icelake-server"}, "x86-avx512"),
        ({"kind": "llvm", "mcpu": "haswell"}, "x86-avx2"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "arm-neon"),
        ("raspberry-pi/4b-aarch64", "arm-neon"),
    ],
    ids=["avx512", "avx2", "neon", "rpi4_tag"],
)
def test_target_family_table(target, family):
    assert target_family(tvm.target.Target(target)) == family
    assert CPU_KNOBS[family].vector_lanes == {"x86-avx512": 16, "x86-avx2": 8, "arm-neon": 4}[family]


def test_schedule_rule_does_not_apply_elsewhere():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def plain(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("b"):
                vi = T.axis.spatial(4, i)
                b[vi] = a[vi]

    assert schedule_cpu(plain, HOST) is None
    fmt = NestedCSR.pack(np.ones((2, 2), np.float32), np.zeros((2, 2), np.int32), 1)
    assert schedule_cpu(nested_linear(fmt, 1, False), tvm.target.Target({"kind": "cuda"})) is None


def test_kernel_attrs():
    fmt = NestedCSR.pack(np.ones((2, 3), np.float32), np.zeros((2, 3), np.int32), 3)
    lin = nested_linear(fmt, 1, False)
    conv = nested_conv2d(fmt, (1, 3, 4, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True)
    for func, op in [(lin, "linear"), (conv, "conv2d")]:
        assert func.attrs["nested.op"] == op
        assert int(func.attrs["nested.num_levels"]) == 3
        assert bool(func.attrs["tirx.noalias"])  # the key TVM 0.27 reads
    assert [p.name for p in conv.params] == ["x", "val", "col", "row_ptr", "level_len", "bias", "level", "out"]


# ------------------------------------------------------------------------ factory argument errors
_FMT = NestedCSR.pack(np.ones((4, 18), np.float32), np.zeros((4, 18), np.int32), 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch": 0}, "batch"),
        ({"batch": 2.5}, "batch"),
        ({"has_bias": 1}, "bias"),
        ({"fmt": np.ones((4, 18))}, "NestedCSR"),
    ],
    ids=["batch_zero", "batch_float", "has_bias_int", "fmt_array"],
)
def test_linear_rejects_bad_arguments(kwargs, match):
    args = {"fmt": _FMT, "batch": 1, "has_bias": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        nested_linear(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x_shape": (1, 2, 6)}, "x_shape"),
        ({"groups": 4}, "groups=4"),
        ({"x_shape": (1, 3, 6, 6)}, "fmt.cols"),
        ({"strides": (0, 1)}, "strides"),
        ({"padding": (1, 1, -1, 1)}, "padding"),
        ({"x_shape": (1, 2, 2, 2)}, "output would be empty"),
        ({"dilation": (1,)}, "dilation"),
    ],
    ids=[
        "x_rank",
        "groups_not_dividing",
        "cols_mismatch",
        "zero_stride",
        "negative_padding",
        "empty_output",
        "dilation_len",
    ],
)
def test_conv2d_rejects_bad_arguments(kwargs, match):
    args = {
        "fmt": _FMT,
        "x_shape": (1, 2, 6, 6),
        "kernel_size": (3, 3),
        "strides": (1, 1),
        "padding": (0, 0, 0, 0),
        "dilation": (1, 1),
        "groups": 1,
        "has_bias": False,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        nested_conv2d(**args)


def test_schedule_cpu_leaves_its_input_intact():
    fmt = NestedCSR.pack(np.ones((8, 8), np.float32), np.zeros((8, 8), np.int32), 1)
    func = nested_linear(fmt, 16, False)
    before = tvm.ir.save_json(func)
    scheduled = schedule_cpu(func, HOST)
    assert tvm.ir.save_json(func) == before
    assert loop_kinds(scheduled)["vectorized"] and not loop_kinds(func)["vectorized"]


# ------------------------------------------------------------------------ lanes (partial sums)
@pytest.mark.parametrize("batch,lanes", [(1, 8), (8, 4), (40, 1)], ids=["gemv", "batch8", "batch40"])
def test_schedule_cpu_picks_lanes_by_batch(batch, lanes):
    from tvm_nested.schedules.cpu import linear_lanes

    knobs = CPU_KNOBS["x86-avx2"]
    assert linear_lanes(batch, knobs) == lanes
    fmt = NestedCSR.pack(np.ones((8, 40), np.float32), np.zeros((8, 40), np.int32), 1)
    func = schedule_cpu(nested_linear(fmt, batch, False), tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    assert spec_of(func).lanes == lanes
    assert ("tail_update" in block_names(func)) == (lanes > 1)


def test_lanes_keep_signature_and_spec():
    fmt = NestedCSR.pack(np.ones((6, 30), np.float32), np.zeros((6, 30), np.int32), 2)
    plain = nested_linear(fmt, 3, True)
    lanes = respecialized(plain, lanes=4)
    assert [(p.name, str(p.ty.shape)) for p in plain.params] == [(p.name, str(p.ty.shape)) for p in lanes.params]
    assert spec_of(lanes).lanes == 4 and spec_of(plain).lanes == 1
    tvm.ir.assert_structural_equal(respecialized(lanes, lanes=1), plain)
    with pytest.raises(ValueError, match="lanes"):
        nested_linear(fmt, 3, True, lanes=0)
