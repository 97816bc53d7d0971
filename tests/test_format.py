"""NestedCSR: pack/unpack round trip (property-tested), nesting, storage budget, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_nested.contract import FORMAT_VERSION
from tvm_nested.schedules import NestedCSR, csr_nbytes


@st.composite
def nested_layers(draw):
    num_levels = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 300))  # crosses the uint8 -> uint16 column index boundary
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "all_pruned", "empty_rows", "below_model_L"]))
    lm = rng.integers(-1, num_levels, size=(rows, cols)).astype(np.int32)
    if kind == "all_pruned":
        lm[:] = -1
    elif kind == "empty_rows":
        lm[rng.random(rows) < 0.5] = -1
    elif kind == "below_model_L":  # this layer's own max level is below the model's L - 1
        lm = np.minimum(lm, num_levels // 2 - 1)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w, lm, num_levels


@settings(max_examples=60, deadline=None)
@given(nested_layers())
def test_round_trip_every_level(layer):
    w, lm, num_levels = layer
    fmt = NestedCSR.pack(w, lm, num_levels)
    for level in range(num_levels + 1):  # one past L: all pruned
        np.testing.assert_array_equal(fmt.unpack(level), w * (lm >= level))
        assert fmt.nnz(level) == int((lm >= level).sum())
    np.testing.assert_array_equal(fmt.level_map(), lm)


@settings(max_examples=30, deadline=None)
@given(nested_layers())
def test_levels_are_nested_prefixes(layer):
    w, lm, num_levels = layer
    fmt = NestedCSR.pack(w, lm, num_levels)
    nnz = [fmt.nnz(level) for level in range(num_levels)]
    assert nnz == sorted(nnz, reverse=True)
    ll = fmt.level_len.astype(np.int64)
    assert (np.diff(ll, axis=0) <= 0).all()  # each row's prefix shrinks with the level
    np.testing.assert_array_equal(np.diff(fmt.row_ptr), ll[0])
    for level in range(1, num_levels):  # level l+1's non-zeros are a subset of level l's
        assert not (fmt.unpack_mask(level) & ~fmt.unpack_mask(level - 1)).any()


@settings(max_examples=30, deadline=None)
@given(nested_layers())
def test_operands_match_kernel_contract(layer):
    w, lm, num_levels = layer
    fmt = NestedCSR.pack(w, lm, num_levels)
    values, col, row_ptr, level_len = fmt.arrays()
    rows, cols = w.shape
    assert values.dtype == np.float32 and values.shape == (max(fmt.nnz(0), 1),)
    assert col.shape == values.shape
    assert col.dtype == (np.uint8 if cols <= 256 else np.uint16)
    assert row_ptr.dtype == np.int32 and row_ptr.shape == (rows + 1,)
    assert level_len.shape == (num_levels, rows) and level_len.dtype.kind in "ui"
    assert fmt.nbytes == sum(a.nbytes for a in fmt.arrays())
    assert all(not a.flags.writeable for a in fmt.arrays())


def test_all_pruned_layer_keeps_a_dummy_entry():
    fmt = NestedCSR.pack(np.ones((3, 4), np.float32), np.full((3, 4), -1), 2)
    assert fmt.nnz(0) == 0 and fmt.values.shape == (1,) and fmt.col.shape == (1,)
    np.testing.assert_array_equal(fmt.unpack(0), np.zeros((3, 4), np.float32))
    assert fmt.density(0) == 0.0


def test_int32_column_indices_for_wide_rows():
    lm = np.zeros((1, 70000), np.int32)
    lm[0, ::7000] = 1
    fmt = NestedCSR.pack(np.ones((1, 70000), np.float32), lm, 2)
    assert fmt.col.dtype == np.int32
    np.testing.assert_array_equal(fmt.unpack(1), (lm >= 1).astype(np.float32))


def _realistic_level_map(rows, cols, density, num_levels, rng):
    """Level 0 keeps `density`; every further level keeps about half of the one before."""
    lm = np.full((rows, cols), -1, np.int32)
    keep = rng.random((rows, cols)) < density
    lm[keep] = np.minimum(rng.geometric(0.5, keep.sum()) - 1, num_levels - 1)
    return lm


@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05], ids=lambda d: f"d{d}")
@pytest.mark.parametrize(
    "rows,cols", [(64, 576), (256, 2304), (1000, 2048)], ids=["resnet_conv3x3_64", "resnet_conv3x3_256", "fc_1000x2048"]
)
def test_storage_within_budget(rows, cols, density):
    rng = np.random.default_rng(rows * 7 + int(density * 100))
    lm = _realistic_level_map(rows, cols, density, 4, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    fmt = NestedCSR.pack(w, lm, 4)
    assert fmt.nbytes <= 1.1 * csr_nbytes(lm), (fmt.nbytes, csr_nbytes(lm))


def test_csr_nbytes_is_plain_fp32_int32_csr():
    lm = np.array([[0, -1, 2], [-1, -1, -1]])
    assert csr_nbytes(lm) == 2 * 4 + 2 * 4 + 3 * 4


def test_format_version_is_an_int():
    assert isinstance(FORMAT_VERSION, int)


@pytest.mark.parametrize(
    "weight,level_map,num_levels,match",
    [
        (np.ones((2, 3)), np.zeros((3, 2), np.int32), 2, "shape"),
        (np.ones((2, 3)), np.zeros((2, 3), np.float32), 2, "integer"),
        (np.ones((2, 3)), np.full((2, 3), -2), 2, "-2"),
        (np.ones((2, 3)), np.full((2, 3), 2), 2, "num_levels"),
        (np.ones((2, 3)), np.zeros((2, 3), np.int32), 0, "num_levels"),
        (np.ones(6), np.zeros(6, np.int32), 2, "2-D"),
        (np.ones((0, 3)), np.zeros((0, 3), np.int32), 2, "zero"),
    ],
    ids=[
        "shape_mismatch",
        "float_level_map",
        "below_minus_one",
        "level_too_high",
        "zero_levels",
        "not_2d",
        "empty_weight",
    ],
)
def test_pack_rejects_bad_input(weight, level_map, num_levels, match):
    with pytest.raises(ValueError, match=match):
        NestedCSR.pack(weight, level_map, num_levels)


def test_unpack_rejects_negative_level():
    fmt = NestedCSR.pack(np.ones((2, 2), np.float32), np.zeros((2, 2), np.int32), 1)
    with pytest.raises(ValueError, match="level"):
        fmt.unpack(-1)
