"""Nested kernels against their NumPy references: the reference "rows" form (what CUDA schedules)
and the CPU form (``schedules/cpu.py``: packed for its knobs) with its defaults and with knobs
that exercise every structure (input-channel blocks, aligned and shifted staging, direct reads,
partial sums, output-channel chunks, prefetch, transposed and strided stores).

Every case runs at every level of the model (including levels above the layer's own maximum) and
at out-of-range levels (the kernels clamp); each kernel is compiled once per case and variant.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from ir_checks import loop_kinds
from nested_kernels import conv2d_spec, linear_spec

from tvm_nested.schedules import (
    VECTOR_LANES,
    NestedCSR,
    default_knobs,
    kernel,
    knob_space,
    nested_conv2d_ref,
    nested_linear_ref,
    schedule_cpu,
    spec_of,
    specialize,
    target_family,
)
from tvm_nested.schedules.reference import apply_epilogue

HOST = tvm.target.Target("llvm")
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4})
VL = VECTOR_LANES[target_family(HOST)]
EPILOGUES = {
    "plain": {},
    "res_relu": {"residual": True, "activation": "relu"},
    "relu6": {"activation": "clip", "clip": (0.0, 6.0)},
}


def _level_map(shape, num_levels, kind, rng):
    lm = rng.integers(-1, num_levels, size=shape).astype(np.int32)
    if kind == "all_pruned":
        lm[:] = -1
    elif kind == "empty_rows":
        lm[rng.permutation(shape[0])[: max(1, shape[0] // 3)]] = -1
    elif kind == "below_model_L":  # the model has L levels, this layer stops at level 1
        lm = np.minimum(lm, 1)
    return lm


def _assert_close(got, ref):
    assert np.isfinite(got).all(), "unwritten or non-finite outputs"
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


def _compiled(spec, fmt, variant: str, knobs_of):
    """(compiled kernel, its operands) for ``variant``: "rows", "cpu" (defaults) or a knob name."""
    if variant == "rows":
        return tvm.compile(kernel(spec), target=HOST), fmt
    knobs = default_knobs(spec, HOST) if variant == "cpu" else knobs_of(variant)
    cpu_spec, packed = specialize(spec, fmt, knobs)
    func = kernel(cpu_spec)
    assert schedule_cpu(func, HOST) is func  # a CPU kernel needs no schedule
    return tvm.compile(func, target=HOST), packed


def _runner(ex, operands, extra, out_shape):
    def call(level: int):
        args = [operands[0], *operands[1].arrays(), *extra, np.array(level, np.int32)]
        tensors = [tvm.runtime.tensor(np.array(a, copy=True, order="C")) for a in args]
        out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))  # unwritten outputs show
        ex["main"](*tensors, out)
        return out.numpy()

    return call


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
    "batch40_64x96_bias": LinearCase(64, 96, 40, True),  # several batch tiles, transposed stores
    "empty_rows_batch5": LinearCase(12, 20, 5, True, kind="empty_rows"),
    "all_pruned_gemv": LinearCase(6, 10, 1, True, num_levels=3, kind="all_pruned"),
    "layer_max_below_L_batch3": LinearCase(9, 16, 3, False, num_levels=5, kind="below_model_L"),
    "one_level_batch2": LinearCase(5, 7, 2, False, num_levels=1),
    "gemv_64x700_bias": LinearCase(64, 700, 1, True, num_levels=5),
    "batch8_40x90": LinearCase(40, 90, 8, True),
    "batch35_48x20_scatter": LinearCase(45, 20, 35, True),  # M % V != 0: strided stores
}
LINEAR_KNOBS = {
    "partial4_prefetch2": {"partial": 4, "prefetch": 2},
    "partial3_rows5": {"partial": 3, "rows_per_task": 5, "threads": 2},
    "tb2_scatter": {"tb": 2 * VL, "store": "scatter"},
}
LINEAR_VARIANTS = ["rows", "cpu", *LINEAR_KNOBS]


@functools.cache
def _linear(case_id: str, variant: str, epi: str = "plain"):
    case = LINEAR_CASES[case_id]
    rng = np.random.default_rng(len(case_id) * 1009 + case.rows)
    w = rng.standard_normal((case.rows, case.cols)).astype(np.float32)
    lm = _level_map(w.shape, case.num_levels, case.kind, rng)
    x = rng.standard_normal((case.batch, case.cols)).astype(np.float32)
    bias = rng.standard_normal(case.rows).astype(np.float32) if case.has_bias else None
    residual = rng.standard_normal((case.batch, case.rows)).astype(np.float32)
    fmt = NestedCSR.pack(w, lm, case.num_levels)
    spec = linear_spec(fmt, case.batch, case.has_bias, **EPILOGUES[epi])
    base = default_knobs(spec, HOST)
    ex, packed = _compiled(spec, fmt, variant, lambda v: dataclasses.replace(base, **LINEAR_KNOBS[v]))
    extra = ([bias] if case.has_bias else []) + ([residual] if spec.epilogue.residual else [])
    call = _runner(ex, (x, packed), extra, (case.batch, case.rows))

    def ref(level):
        out = nested_linear_ref(x, (w, lm), level, bias)
        return apply_epilogue(out, spec.epilogue, residual if spec.epilogue.residual else None)

    return call, ref, case


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("case_id", list(LINEAR_CASES))
def test_linear_every_level(case_id, variant):
    call, ref, case = _linear(case_id, variant)
    for level in range(case.num_levels):
        _assert_close(call(level), ref(level))


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
    "1x1_direct_tail": ConvCase((2, 16, 12, 12), 20, (1, 1), has_bias=True),
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
    "3x3_32ch_13x17": ConvCase((1, 32, 13, 17), 16, (3, 3), padding=(1, 1, 1, 1), has_bias=True),
}
CONV_KNOBS = {  # structures the defaults of these small cases do not reach
    "cblocks3_partial2_chunk5": {"cblocks": 3, "partial": 2, "oc_chunk": 5, "threads": 2},
    "aligned_shifted": {"pw_align": VL, "shift_copies": True},
    "direct_never_tile4": {"direct": "never", "tile": 4 * VL},
    "direct_always_tile2": {"direct": "always", "tile": 2 * VL, "threads": 2},
}
CONV_VARIANTS = ["rows", "cpu", *CONV_KNOBS]


@functools.cache
def _conv(case_id: str, variant: str, epi: str = "plain"):
    c = CONV_CASES[case_id]
    rng = np.random.default_rng(len(case_id) * 7919 + c.out_channels)
    _, ch, _, _ = c.x_shape
    kh, kw = c.kernel_size
    w = rng.standard_normal((c.out_channels, ch // c.groups, kh, kw)).astype(np.float32)
    lm = _level_map(w.shape, c.num_levels, c.kind, rng)
    x = rng.standard_normal(c.x_shape).astype(np.float32)
    bias = rng.standard_normal(c.out_channels).astype(np.float32) if c.has_bias else None
    fmt = NestedCSR.pack(w.reshape(c.out_channels, -1), lm.reshape(c.out_channels, -1), c.num_levels)
    spec = conv2d_spec(
        fmt, c.x_shape, c.kernel_size, c.strides, c.padding, c.dilation, c.groups, c.has_bias, **EPILOGUES[epi]
    )
    residual = rng.standard_normal(spec.out_shape).astype(np.float32)
    base = default_knobs(spec, HOST)
    ex, packed = _compiled(spec, fmt, variant, lambda v: dataclasses.replace(base, **CONV_KNOBS[v]))
    extra = ([bias] if c.has_bias else []) + ([residual] if spec.epilogue.residual else [])
    call = _runner(ex, (x, packed), extra, spec.out_shape)

    def ref(level):
        out = nested_conv2d_ref(x, (w, lm), level, c.kernel_size, c.strides, c.padding, c.dilation, c.groups, bias)
        return apply_epilogue(out, spec.epilogue, residual if spec.epilogue.residual else None)

    return call, ref, c


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("case_id", list(CONV_CASES))
def test_conv2d_every_level(case_id, variant):
    call, ref, c = _conv(case_id, variant)
    for level in range(c.num_levels):
        _assert_close(call(level), ref(level))


@pytest.mark.parametrize("epi", ["res_relu", "relu6"])
@pytest.mark.parametrize("variant", ["rows", "cpu", "cblocks3_partial2_chunk5"])
def test_conv2d_epilogue(variant, epi):
    call, ref, c = _conv("3x3_32ch_13x17", variant, epi)
    for level in range(c.num_levels):
        _assert_close(call(level), ref(level))


@pytest.mark.parametrize("epi", ["res_relu", "relu6"])
@pytest.mark.parametrize("variant", ["rows", "cpu", "tb2_scatter"])
@pytest.mark.parametrize("case_id", ["gemv_17x33_bias", "batch40_64x96_bias", "batch35_48x20_scatter"])
def test_linear_epilogue(case_id, variant, epi):
    call, ref, case = _linear(case_id, variant, epi)
    for level in range(case.num_levels):
        _assert_close(call(level), ref(level))


# ------------------------------------------------------------------------ out-of-range levels
@pytest.mark.parametrize("variant", ["rows", "cpu"])
@pytest.mark.parametrize(
    "level,clamped", [(99, "top"), (-5, "bottom"), (2**31 - 1, "top")], ids=["99", "-5", "int32_max"]
)
def test_out_of_range_level_is_clamped(level, clamped, variant):
    """The caller refuses bad levels; the kernel itself must stay memory-safe (it clamps)."""
    for call, case in [
        (_linear("batch5_odd_13x300", variant)[0], LINEAR_CASES["batch5_odd_13x300"]),
        (_linear("gemv_17x33_bias", variant)[0], LINEAR_CASES["gemv_17x33_bias"]),
        (_conv("3x3_pad1_bias", variant)[0], CONV_CASES["3x3_pad1_bias"]),
    ]:
        expect = call(case.num_levels - 1 if clamped == "top" else 0)
        np.testing.assert_array_equal(call(level), expect)


# ---------------------------------------------------------------------- CPU forms and targets
def test_cpu_kernels_are_parallel_and_vectorised():
    fmt = NestedCSR.pack(np.ones((16, 18), np.float32), np.zeros((16, 18), np.int32), 1)
    for spec in (linear_spec(fmt, 16), conv2d_spec(fmt, (1, 2, 12, 12), (3, 3), (1, 1), (1, 1), (1, 1), 1)):
        func = kernel(specialize(spec, fmt, default_knobs(spec, HOST))[0])
        kinds = loop_kinds(func)
        assert kinds["parallel"] and kinds["vectorized"], spec.op
        assert func.attrs["tirx.is_scheduled"]


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_compiles_for_aarch64_neon(op):
    fmt = NestedCSR.pack(np.ones((8, 18), np.float32), np.ones((8, 18), np.int32), 2)
    if op == "linear":
        spec = linear_spec(fmt, 8, True)
    else:
        spec = conv2d_spec(fmt, (1, 2, 6, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True)
    knobs = default_knobs(spec, AARCH64)
    assert knobs.vl == 4 and knobs.threads == 4
    func = kernel(specialize(spec, fmt, knobs)[0])
    llvm_ir = tvm.compile(func, target=AARCH64).mod.inspect_source("ll")
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
    assert VECTOR_LANES[family] == {"x86-avx512": 16, "x86-avx2": 8, "arm-neon": 4}[family]


def test_schedule_rule_applies_to_cpu_kernels_only():
    fmt = NestedCSR.pack(np.ones((2, 2), np.float32), np.zeros((2, 2), np.int32), 1)
    spec = linear_spec(fmt, 1)
    assert schedule_cpu(kernel(spec), HOST) is None  # the rows form: specialised, not scheduled
    cpu_func = kernel(specialize(spec, fmt, default_knobs(spec, HOST))[0])
    assert schedule_cpu(cpu_func, tvm.target.Target({"kind": "cuda"})) is None


def test_kernel_attrs_and_signature():
    fmt = NestedCSR.pack(np.ones((2, 3), np.float32), np.zeros((2, 3), np.int32), 3)
    lin = kernel(linear_spec(fmt, 1))
    spec = conv2d_spec(fmt, (1, 3, 4, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, True, residual=True)
    conv = kernel(spec)
    for func, op in [(lin, "linear"), (conv, "conv2d")]:
        assert func.attrs["nested.op"] == op
        assert int(func.attrs["nested.num_levels"]) == 3
        assert bool(func.attrs["tirx.noalias"])  # the key TVM 0.27 reads
        assert spec_of(func).op == op
    names = ["x", "val", "col", "row_ptr", "level_len", "bias", "residual", "level", "out"]
    assert [p.name for p in conv.params] == names
    cpu_conv = kernel(specialize(spec, fmt, default_knobs(spec, HOST))[0])
    assert [p.name for p in cpu_conv.params] == [*names[:2], "offset", *names[3:]]


def test_knob_space_starts_with_the_defaults_and_has_no_duplicates():
    fmt = NestedCSR.pack(np.ones((64, 64 * 9), np.float32), np.zeros((64, 64 * 9), np.int32), 1)
    spec = conv2d_spec(fmt, (1, 64, 14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    space = knob_space(spec, HOST)
    assert space[0] == default_knobs(spec, HOST) and len(set(space)) == len(space) > 10
    assert {k.cblocks for k in space} >= {1, 2, 4} and any(k.shift_copies for k in space)


def test_cpu_packing_stays_within_the_storage_budget():
    """DESIGN section 5: values, indices, offsets and padding at most 1.1x a plain CSR of level 0."""
    from tvm_nested.schedules import csr_nbytes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32 * 9)).astype(np.float32)
    lm = _level_map(w.shape, 4, "random", rng)
    fmt = NestedCSR.pack(w, lm, 4)
    spec = conv2d_spec(fmt, (1, 32, 14, 14), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    for knobs in knob_space(spec, HOST):
        _, packed = specialize(spec, fmt, knobs)
        assert packed.nbytes <= 1.1 * csr_nbytes(lm), knobs


# ------------------------------------------------------------------------ spec argument errors
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
        linear_spec(**args)


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
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        conv2d_spec(**args)


@pytest.mark.parametrize(
    "knobs,match",
    [({"tile": 20}, "multiple of vl"), ({"cblocks": 0}, "cblocks"), ({"direct": "maybe"}, "direct")],
    ids=["tile_not_vectors", "zero_cblocks", "bad_direct"],
)
def test_cpu_knobs_are_checked(knobs, match):
    from tvm_nested.schedules import CPUConvKnobs

    with pytest.raises(ValueError, match=match):
        CPUConvKnobs(vl=16, **knobs)
