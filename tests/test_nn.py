"""tvm_nested.authoring.nn and tvm_nested.authoring.levelmap: nested layers equal the dense model with W * (LM >= l)."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tvm_nested.authoring import levelmap as lmod
from tvm_nested.authoring import nn as tnn

DENSITIES = [0.6, 0.3, 0.1]
L = len(DENSITIES)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU())
        self.fc = nn.Linear(6 * 5 * 5, 7)

    def forward(self, x):
        return self.fc(torch.flatten(self.block(x), 1))


def _dense_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Inner()).eval()


NAMES = ["0", "2.block.0", "2.fc"]


def _masked_dense(dense, nested, level):
    """The dense model with every nested weight replaced by W * (LM >= level)."""
    ref = _dense_model()
    ref.load_state_dict(dense.state_dict())
    for name in NAMES:
        layer = ref.get_submodule(name)
        lm = nested.module.get_submodule(name).level_map
        with torch.no_grad():
            layer.weight.mul_((lm >= level).to(layer.weight.dtype))
    return ref


@pytest.mark.parametrize("level", range(L), ids=[f"level{l}" for l in range(L)])
def test_nested_model_equals_masked_dense(level):
    dense = _dense_model()
    nested = tnn.nest(dense, {n: DENSITIES for n in NAMES})
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    got = nested(x, level=torch.tensor(level))
    want = _masked_dense(dense, nested, level)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_level_reaches_layers_inside_containers():
    nested = tnn.nest(_dense_model(), {n: DENSITIES for n in NAMES})
    assert [n for n, _ in nested.nested_layers()] == NAMES
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, int(mod.level)))
        for n, m in nested.nested_layers()
    ]
    nested(torch.zeros(1, 3, 5, 5), level=torch.tensor(2))
    for h in hooks:
        h.remove()
    assert seen == {n: 2 for n in NAMES}
    assert all(m.level is None for _, m in nested.nested_layers()), "the level must not stay behind in a layer"


def test_levels_differ_and_nest():
    nested = tnn.nest(_dense_model(), {n: DENSITIES for n in NAMES})
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    outs = [nested(x, level=torch.tensor(l)) for l in range(L)]
    assert not torch.allclose(outs[0], outs[-1])
    assert nested.num_levels == L


def test_nest_does_not_touch_the_dense_model():
    dense = _dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    tnn.nest(dense, {"0": DENSITIES})
    assert isinstance(dense[0], nn.Conv2d) and not isinstance(dense[0], tnn.NestedConv2d)
    for k, v in dense.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_nested_layer_without_level_is_refused():
    nested = tnn.nest(_dense_model(), {"0": DENSITIES})
    with pytest.raises(RuntimeError, match="no level given"):
        nested.module(torch.zeros(1, 3, 5, 5))


def test_nest_unknown_submodule():
    with pytest.raises(KeyError, match="nope"):
        tnn.nest(_dense_model(), {"nope": DENSITIES})


def test_nest_accepts_masks_and_level_maps():
    dense = _dense_model()
    w = dense[0].weight.detach().numpy()
    lm = lmod.levelmap_by_magnitude(w, DENSITIES)
    masks = lmod.masks_from_levelmap(lm, L)
    a = tnn.nest(dense, {"0": lm}).module[0].level_map.numpy()
    b = tnn.nest(dense, {"0": masks}).module[0].level_map.numpy()
    np.testing.assert_array_equal(a, lm)
    np.testing.assert_array_equal(b, lm)


# ------------------------------------------------------------------------------------ levelmap
def test_levelmap_from_masks_roundtrip():
    rng = np.random.default_rng(0)
    lm = rng.integers(-1, 4, size=(5, 6)).astype(np.int32)
    np.testing.assert_array_equal(lmod.levelmap_from_masks(lmod.masks_from_levelmap(lm, 4)), lm)


@pytest.mark.parametrize("bad_level", [1, 2], ids=["level1", "level2"])
def test_levelmap_from_masks_refuses_non_nested(bad_level):
    rng = np.random.default_rng(0)
    masks = lmod.masks_from_levelmap(rng.integers(-1, 3, size=(4, 4)), 3)
    masks[bad_level] = masks[bad_level].copy()
    pos = tuple(np.argwhere(~masks[bad_level - 1])[0])
    masks[bad_level][pos] = True
    with pytest.raises(lmod.NestingError, match=rf"conv7: .*level {bad_level} keeps weight"):
        lmod.levelmap_from_masks(masks, layer="conv7")


def test_levelmap_from_masks_refuses_shape_mismatch():
    with pytest.raises(lmod.NestingError, match="fc: mask of level 1 has shape"):
        lmod.levelmap_from_masks([np.ones((2, 2)), np.ones((3, 2))], layer="fc")


@pytest.mark.parametrize(
    "lm,match",
    [
        (np.zeros((2, 2), np.float32), "integer"),
        (np.zeros((3, 2), np.int32), "shape"),
        (np.full((2, 2), -2, np.int32), "-2"),
    ],
    ids=["float", "shape", "below-minus-one"],
)
def test_check_levelmap_errors(lm, match):
    with pytest.raises(lmod.NestingError, match=match):
        lmod.check_levelmap(lm, (2, 2), layer="w")


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dens=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_levelmap_by_magnitude_densities_exact(shape, dens, seed):
    dens = sorted(dens, reverse=True)
    w = np.random.default_rng(seed).standard_normal(shape)
    lm = lmod.levelmap_by_magnitude(w, dens)
    n = w.size
    for lvl, d in enumerate(dens):
        keep = lm >= lvl
        assert keep.sum() == round(d * n)
        if keep.any() and (~keep).any():  # magnitude: every kept weight at least as large as every pruned one
            assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max()
    assert lmod.densities(lm, len(dens)) == pytest.approx([round(d * n) / n for d in dens])


@pytest.mark.parametrize("dens", [[0.2, 0.5], [1.5], []], ids=["increasing", "above-one", "empty"])
def test_levelmap_by_magnitude_refuses_bad_densities(dens):
    with pytest.raises(lmod.NestingError, match="densities"):
        lmod.levelmap_by_magnitude(np.ones((2, 2)), dens)


def test_num_levels_of():
    assert lmod.num_levels_of([np.full((2,), -1), np.array([0, 3])]) == 4
    assert lmod.num_levels_of([np.full((2,), -1)]) == 1


@pytest.mark.parametrize(
    "value, dtype",
    [(2**32, np.int64), (2**31 + 2, np.int64), (2**40, np.int64), (-2, np.int64), (300, np.int16), (2**63, np.uint64)],
    ids=["2**32", "2**31+2", "huge", "below-minus-one", "above-max-levels", "uint64"],
)
def test_level_maps_are_checked_in_their_own_dtype(value, dtype):
    """2**32 in an int64 map became level 0 after the int32 cast, 2**31+2 became -2147483646 reported
    on 'NestedLinear', and huge values ended in 'Unable to allocate 32.0 TiB'."""
    lm = np.zeros((4, 8), dtype)
    lm[1, 2] = value
    with pytest.raises(lmod.NestingError, match=rf"^fc: level map holds {value} \("):
        lmod.check_levelmap(lm, (4, 8), layer="fc")
    with pytest.raises(lmod.NestingError, match=rf"^0: level map holds {value} "):
        tnn.nest(nn.Sequential(nn.Linear(8, 4)), {"0": lm})


def test_a_model_level_map_out_of_range_is_refused_by_name_before_packing():
    """The passes read the level map from the model (ONNX or torch.export): the same check, naming
    the layer, before anything is allocated per level."""
    import tvm_nested

    model = tnn.nest(nn.Sequential(nn.Linear(8, 4)).eval(), {"0": (0.5, 0.25)}).eval()
    model.module[0].level_map = torch.full((4, 8), 2**32, dtype=torch.int64)
    mod = tvm_nested.from_torch(model, (torch.ones(1, 8),), {"level": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"nested linear linear_0 .*level map holds 4294967296 \(int64\)"):
        tvm_nested.build(mod, "llvm")


# ------------------------------------------------------------- recurrent layers and attention
def _stock_at(dense: nn.Module, nested: tnn.NestedModel, level: int) -> nn.Module:
    """The stock module (PyTorch's own LSTM / GRU / attention kernels) with the level's masked weights."""
    ref = copy.deepcopy(dense)
    ref.load_state_dict(tnn.masked_state_dict(nested, level))
    return ref.eval()


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


class One(nn.Module):
    """One layer called with every argument (nn.Sequential passes one)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return self.layer(*args)


RNN_CASES = {
    "lstm_2layer_bidir": (nn.LSTM, dict(num_layers=2, bidirectional=True), (5, 2, 6), False),
    "lstm_batch_first_hx": (nn.LSTM, dict(batch_first=True), (2, 5, 6), True),
    "lstm_proj_no_bias": (nn.LSTM, dict(proj_size=3, bias=False), (5, 2, 6), False),
    "lstm_unbatched": (nn.LSTM, dict(bidirectional=True), (5, 6), True),
    "gru_2layer_bidir": (nn.GRU, dict(num_layers=2, bidirectional=True), (5, 2, 6), False),
    "gru_batch_first_hx": (nn.GRU, dict(batch_first=True, num_layers=2), (2, 5, 6), True),
}


@pytest.mark.parametrize("case", RNN_CASES, ids=list(RNN_CASES))
def test_nested_recurrent_layer_equals_stock_at_every_level(case):
    cls, kwargs, x_shape, with_state = RNN_CASES[case]
    torch.manual_seed(0)
    dense = One(cls(6, 8, **kwargs)).eval()
    nested = tnn.nest(dense, {"layer": DENSITIES})
    rnn = dense.layer
    assert [w.name for w in nested.nested_weights()] == [
        f"layer.{n}" for n in rnn._flat_weights_names if n.startswith("weight_")
    ]
    x = torch.randn(*x_shape)
    args = (x,)
    if with_state:
        out_size = rnn.proj_size or rnn.hidden_size if cls is nn.LSTM else rnn.hidden_size
        lead = (rnn.num_layers * (2 if rnn.bidirectional else 1),)
        batch = () if len(x_shape) == 2 else (x_shape[0] if rnn.batch_first else x_shape[1],)
        h0 = torch.randn(*lead, *batch, out_size)
        args = (x, (h0, torch.randn(*lead, *batch, rnn.hidden_size)) if cls is nn.LSTM else h0)
    for level in range(L):
        with torch.no_grad():
            got = _flat(nested(*args, level=torch.tensor(level)))
            want = _flat(_stock_at(dense, nested, level)(*args))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_recurrent_weights_by_name_and_gradients_masked():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.GRU(4, 5))
    nested = tnn.nest(dense, {"0.weight_hh_l0": DENSITIES})
    gru = nested.module[0]
    assert gru.nested_params == ["weight_hh_l0"]
    loss = nested(torch.randn(3, 2, 4), level=torch.tensor(1))[0].square().sum()
    loss.backward()
    dropped = gru.level_map_of("weight_hh_l0") < 1
    assert (gru.weight_hh_l0.grad[dropped] == 0).all() and (gru.weight_hh_l0.grad[~dropped] != 0).any()
    assert (gru.weight_ih_l0.grad != 0).any(), "the dense matrix trains as usual"
    with pytest.raises(ValueError, match=r"one level map for several weights; .*0.weight_ih_l0, 0.weight_hh_l0"):
        tnn.nest(dense, {"0": np.zeros((15, 4), np.int32)})
    with pytest.raises(KeyError, match=r"'bias_hh_l0' is not a nestable weight of GRU"):
        tnn.nest(dense, {"0.bias_hh_l0": DENSITIES})


class Attention(nn.Module):
    def __init__(self, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, q, kv):
        self_out, _ = self.attn(q, q, q) if self.attn._qkv_same_embed_dim else (0, None)
        cross, weights = self.attn(q, kv, kv)
        return self_out + cross, weights


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed_in_proj", "separate_qkv"])
def test_nested_attention_equals_stock_with_masked_weights(kdim):
    torch.manual_seed(0)
    dense = Attention(kdim).eval()
    nested = tnn.nest(dense, {"attn": DENSITIES})
    names = [w.name for w in nested.nested_weights()]
    assert names == (
        ["attn.in_proj_weight", "attn.out_proj"]
        if kdim is None
        else ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"]
    )
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, kdim or 8)
    for level in range(L):
        with torch.no_grad():
            got = nested(q, kv, level=torch.tensor(level))
            want = _stock_at(dense, nested, level)(q, kv)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_nesting_out_proj_alone_takes_effect():
    """Nesting only attn.out_proj used to be accepted and ignored (MultiheadAttention reads the raw weight)."""
    torch.manual_seed(0)
    dense = Attention().eval()
    nested = tnn.nest(dense, {"attn.out_proj": [1.0, 0.1]})
    assert isinstance(nested.module.attn, tnn.NestedMultiheadAttention)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        outs = [nested(q, kv, level=torch.tensor(level))[0] for level in range(2)]
        torch.testing.assert_close(outs[1], _stock_at(dense, nested, 1)(q, kv)[0])
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_nested_encoder_layer_matches_the_stock_fast_path(norm_first):
    """In eval under no_grad the stock encoder layer takes PyTorch's fast path (raw weights); the nested
    one runs the reference path with masked weights: they agree at every level."""
    torch.manual_seed(0)
    dense = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    nested = tnn.nest(nn.Sequential(dense), {"0.self_attn": DENSITIES, "0.linear1": DENSITIES, "0.linear2": DENSITIES})
    assert type(nested.module[0]) is tnn.NestedTransformerEncoderLayer
    x = torch.randn(2, 5, 8)
    outs = []
    for level in range(L):
        with torch.no_grad():
            got = nested(x, level=torch.tensor(level))
            want = _stock_at(nn.Sequential(dense), nested, level)(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[-1])


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.Conv3d(2, 4, 3), "Conv3d cannot be nested yet"),
        (nn.ConvTranspose2d(2, 4, 3), "ConvTranspose2d cannot be nested yet"),
        (nn.LayerNorm(4), "LayerNorm: cannot nest"),
    ],
    ids=["conv3d", "conv_transpose2d", "layernorm"],
)
def test_nest_refuses_layers_without_a_kernel(layer, match):
    with pytest.raises(TypeError, match=match):
        tnn.nest(nn.Sequential(layer), {"0": DENSITIES})


def test_nested_conv1d_circular_equals_masked_dense():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular", groups=1)).eval()
    nested = tnn.nest(dense, {"0": DENSITIES})
    assert isinstance(nested.module[0], tnn.NestedConv1d)
    x = torch.randn(2, 3, 7)
    for level in range(L):
        with torch.no_grad():
            torch.testing.assert_close(nested(x, level=torch.tensor(level)), _stock_at(dense, nested, level)(x))
