"""Nested pruning: level maps from density targets, converted masks, what a level costs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from tvm_nested.authoring.levelmap import NestingError
from tvm_nested.authoring.nn import NestedModel
from tvm_nested.authoring.pruning import (
    PruningConfig,
    level_stats,
    levelmap_structured,
    levelmaps_from_masks,
    levelmaps_from_prune,
    nest_pruned,
    nested_levelmaps,
    prunable_weights,
    prune_model,
    weights_of,
)

torch.set_num_threads(1)


@st.composite
def densities(draw, max_levels=4):
    n = draw(st.integers(1, max_levels))
    ds = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n))
    return sorted(ds, reverse=True)


@st.composite
def weight(draw, block=1):
    rows = block * draw(st.integers(1, 6))
    shape = draw(st.sampled_from([(rows, 7), (rows, 3, 3, 3), (rows, 2, 1, 1)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rows(lm, lvl):
    return (lm >= lvl).reshape(lm.shape[0], -1).sum(axis=1)


@settings(max_examples=40, deadline=None)
@given(w=weight(), d=densities())
def test_unstructured_counts_exact_and_by_magnitude(w, d):
    lm = levelmap_structured(w, d)
    a = np.abs(w)
    for lvl, dens in enumerate(d):
        keep = lm >= lvl
        assert keep.sum() == round(dens * w.size)
        if keep.any() and (~keep).any():
            assert a[keep].min() >= a[~keep].max()
    assert lm.min() >= -1 and lm.max() <= len(d) - 1


@settings(max_examples=40, deadline=None)
@given(w=weight(), d=densities())
def test_row_balanced_every_row_keeps_the_same_count(w, d):
    lm = levelmap_structured(w, d, balanced=True)
    cols = w.size // w.shape[0]
    for lvl, dens in enumerate(d):
        counts = _rows(lm, lvl)
        assert (counts == round(dens * cols)).all()
        assert abs(counts.sum() / w.size - dens) <= 0.5 / cols + 1e-12


@pytest.mark.parametrize("block", [4, 8], ids=["4x1", "8x1"])
@pytest.mark.parametrize("balanced", [False, True], ids=["free", "balanced"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_blocks_along_output_channels(block, balanced, data):
    w = data.draw(weight(block))
    d = data.draw(densities())
    lm = levelmap_structured(w, d, block=block, balanced=balanced)
    rows = w.shape[0]
    lm3 = lm.reshape(rows // block, block, -1)
    assert (lm3 == lm3[:, :1, :]).all()  # one level per block
    units = lm3.shape[0] * lm3.shape[2]
    for lvl, dens in enumerate(d):
        kept_units = int((lm3[:, 0, :] >= lvl).sum())
        if balanced:
            assert kept_units == lm3.shape[0] * round(dens * lm3.shape[2])
        else:
            assert kept_units == round(dens * units)


def test_block_must_divide_output_channels():
    with pytest.raises(ValueError, match=r"conv3: 10 output channels are not a multiple of block=4"):
        levelmap_structured(np.ones((10, 3)), [0.5], block=4, layer="conv3")


def test_densities_must_be_non_increasing():
    with pytest.raises(NestingError, match="non-increasing"):
        PruningConfig(densities=(0.2, 0.5))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=densities())
def test_global_scope_one_threshold(seed, d):
    rng = np.random.default_rng(seed)
    ws = {
        "a": rng.standard_normal((4, 3)) * 3,
        "b": rng.standard_normal((6, 5)),
        "c": rng.standard_normal((2, 9)) * 0.1,
    }
    maps = nested_levelmaps(ws, PruningConfig(densities=tuple(d), scope="global"))
    total = sum(w.size for w in ws.values())
    a = np.concatenate([np.abs(w).ravel() for w in ws.values()])
    lm = np.concatenate([m.ravel() for m in maps.values()])
    for lvl, dens in enumerate(d):
        keep = lm >= lvl
        assert keep.sum() == round(dens * total)
        if keep.any() and (~keep).any():
            assert a[keep].min() >= a[~keep].max()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_first_last_kept_dense(scope):
    rng = np.random.default_rng(0)
    ws = {
        "first": rng.standard_normal((4, 9)),
        "mid": rng.standard_normal((64, 64)),
        "last": rng.standard_normal((10, 8)),
    }
    maps = nested_levelmaps(ws, PruningConfig(densities=(0.5, 0.1), scope=scope, first_last=1.0))
    assert (maps["first"] == 1).all() and (maps["last"] == 1).all()
    total = sum(w.size for w in ws.values())
    if scope == "global":  # the budget counts every weight
        assert sum(int((m >= 1).sum()) for m in maps.values()) == round(0.1 * total)
    else:
        assert (maps["mid"] >= 1).sum() == round(0.1 * 64 * 64)


def test_first_last_denser():
    rng = np.random.default_rng(0)
    ws = {
        "first": rng.standard_normal((4, 10)),
        "mid": rng.standard_normal((8, 10)),
        "last": rng.standard_normal((2, 10)),
    }
    maps = nested_levelmaps(ws, PruningConfig(densities=(0.5, 0.1), first_last=0.3))
    assert [(maps["first"] >= lvl).mean() for lvl in (0, 1)] == [0.5, 0.3]
    assert [(maps["mid"] >= lvl).mean() for lvl in (0, 1)] == [0.5, 0.1]


def test_masks_converted():
    m0 = np.array([[1, 1], [1, 0]], bool)
    m1 = np.array([[1, 0], [0, 0]], bool)
    assert (levelmaps_from_masks({"fc": [m0, m1]})["fc"] == np.array([[1, 0], [0, -1]])).all()


def test_non_nested_masks_refused_naming_layer_and_level():
    m0 = np.array([1, 1, 0, 0], bool)
    m1 = np.array([1, 1, 0, 0], bool)
    m2 = np.array([1, 0, 1, 0], bool)
    with pytest.raises(NestingError, match=r"features\.3: .*level 2"):
        levelmaps_from_masks({"features.3": [m0, m1, m2]})


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _pruned_levels(amounts, method=prune.l1_unstructured):
    """One model per level; level k+1 continues pruning level k's model (torch's PruningContainer)."""
    from tvm_nested.authoring.pruning import copy_pruned

    models, m = [], _small_model()
    for amount in amounts:
        m = copy_pruned(m)
        for layer in (m[0], m[3]):
            method(layer, "weight", amount=amount)
        models.append(m)
    return models


def test_torch_prune_masks_converted_and_outputs_match():
    models = _pruned_levels([0.5, 0.5])  # 50% then 75% pruned
    maps = levelmaps_from_prune(models)
    assert set(maps) == {"0", "3"}
    for lvl, m in enumerate(models):
        assert ((maps["0"] >= lvl) == m[0].weight_mask.numpy().astype(bool)).all()
    nested = nest_pruned(models)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for lvl, m in enumerate(models):
        torch.testing.assert_close(nested(x, level=torch.tensor(lvl)), m(x))


def test_torch_prune_non_nested_refused():
    torch.manual_seed(3)
    models = [_small_model(), _small_model()]
    for m, amount in zip(models, (0.5, 0.8)):
        prune.random_unstructured(m[3], "weight", amount=amount)
    with pytest.raises(NestingError, match=r"3: masks are not nested: level 1"):
        levelmaps_from_prune(models)


def test_prune_model_and_level_stats():
    model = _small_model()
    nested = prune_model(model, PruningConfig(densities=(1.0, 0.5, 0.1)))
    assert isinstance(nested, NestedModel) and nested.num_levels == 3
    stats = level_stats(nested, torch.zeros(1, 1, 8, 8))
    w = weights_of(model)
    sizes = {n: a.size for n, a in w.items()}
    for s, dens in zip(stats, (1.0, 0.5, 0.1)):
        kept = sum(round(dens * n) for n in sizes.values())
        assert s["weights"] == pytest.approx(kept / sum(sizes.values()))
    # conv: 36 output positions per weight, linear: 1
    dense_f = 36 * 36 + 144 * 5
    assert stats[2]["flops"] == pytest.approx((36 * round(0.1 * 36) + round(0.1 * 720)) / dense_f)


class _Seq(nn.Module):
    """An LSTM over a sequence, a Conv3d (no nested kernel yet) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, bidirectional=True)
        self.vol = nn.Conv3d(1, 1, 1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1]) + self.vol(x[None, None]).mean()


def test_prune_model_nests_recurrent_matrices_and_counts_them_per_step():
    torch.manual_seed(0)
    model = _Seq().eval()
    names = [n for n, _, _ in prunable_weights(model)]
    assert names == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l0_reverse",
        "rnn.weight_hh_l0_reverse",
        "head",
    ]
    with pytest.warns(UserWarning, match=r"prune_model: vol stay dense \(no nested kernel for Conv3d yet\)"):
        nested = prune_model(model, PruningConfig(densities=(1.0, 0.5)))
    assert [w.name for w in nested.nested_weights()] == names
    x = torch.randn(5, 2, 4)  # 5 steps, batch 2: every recurrent matrix is used on 10 rows
    stats = level_stats(nested, x)
    sizes = {n: a.size for n, a in weights_of(model).items()}
    uses = {n: (2 if n == "head" else 10) for n in sizes}
    dense_f = sum(uses[n] * sizes[n] for n in sizes)
    assert stats[1]["flops"] == pytest.approx(sum(uses[n] * round(0.5 * sizes[n]) for n in sizes) / dense_f)
    assert stats[1]["layers"]["rnn.weight_hh_l0"] == pytest.approx(0.5)


def test_nest_exported_nests_conv1d_and_names_the_recurrent_op_it_leaves_dense():
    from tvm_nested.authoring.torch_nest import nest_exported

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.rnn = nn.GRU(4, 5)

        def forward(self, x):
            return self.rnn(self.conv(x).permute(2, 0, 1))[0]

    torch.manual_seed(0)
    ep = torch.export.export(Net().eval(), (torch.randn(1, 3, 6),))
    with pytest.warns(UserWarning, match=r"aten.gru.input keep dense weights"):
        nested = nest_exported(ep, PruningConfig(densities=(0.5, 0.25)))
    x = torch.randn(1, 3, 6)
    full, half = (nested.module()(x, level=torch.tensor(lvl)) for lvl in (0, 1))
    assert not torch.allclose(full, half), "the conv1d follows the level"
