"""The paper families (authoring/families.py), nested by prune_model, built from from_torch: every level
against the stock dense PyTorch model holding the level's masked weights (eval, no_grad: PyTorch's fast
paths included), every prunable weight nested and counted once, however many calls use it."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tvm_nested
from tvm_nested.authoring import families
from tvm_nested.authoring import nn as tnn
from tvm_nested.authoring.pruning import PruningConfig, prunable_weights, prune_model
from tvm_nested.relay_passes import NestedLoweringWarning

DENSITIES = (0.5, 0.2, 0.1)
FAMILIES = sorted(families.FAMILIES)


def _close(got, ref, tol=1e-4):
    scale = max(float(np.max(np.abs(ref))), 1.0)
    assert float(np.max(np.abs(got - ref))) <= tol * scale, f"max err {np.max(np.abs(got - ref))} (scale {scale})"


def _reference(dense: nn.Module, nested: tnn.NestedModel, level: int) -> nn.Module:
    """The stock dense model with the level's masked weights: the independent oracle."""
    ref = copy.deepcopy(dense)
    ref.load_state_dict(tnn.masked_state_dict(nested, level))
    return ref.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    dense, inputs = families.build(request.param)
    nested = prune_model(dense, PruningConfig(DENSITIES))
    mod = tvm_nested.from_torch(nested, inputs, {"level": torch.tensor(0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", NestedLoweringWarning)  # nothing nested is left dense
        lib = tvm_nested.build(mod, "llvm")
    return request.param, dense, nested, inputs, lib


def test_every_level_matches_stock_pytorch(family):
    _, dense, nested, inputs, lib = family
    assert lib.num_levels == len(DENSITIES)
    rt = lib.runtime()
    outs = []
    for level in range(lib.num_levels):
        with torch.no_grad():
            ref = _reference(dense, nested, level)(*inputs).numpy()
            eager = nested(*inputs, level=torch.tensor(level)).numpy()
        (got,) = rt.run(*[i.numpy() for i in inputs], level=level)
        _close(eager, ref)
        _close(got, ref)
        outs.append(got)
    assert not np.allclose(outs[0], outs[-1]), "the levels compute different sub-models"


def test_every_prunable_weight_nested_and_counted_once(family):
    name, dense, nested, _, lib = family
    weights = prunable_weights(dense)
    assert len(nested.nested_weights()) == len(weights)
    total = sum(getattr(m, p).numel() for _, m, p in weights)
    # one record per weight (an attention's cross projections: one per q / k / v block), whatever
    # number of calls use it: their dense sizes add up to the model's prunable weights exactly once
    assert sum(layer["dense_bytes"] // 4 for layer in lib.info["layers"]) == total
    kept0 = sum(int((w.level_map >= 0).sum()) for w in nested.nested_weights())
    assert sum(layer["nnz"][0] for layer in lib.info["layers"]) == kept0
    for got, want in zip(lib.densities, DENSITIES):
        assert abs(got - want) < 0.02
    calls = [layer["calls"] for layer in lib.info["layers"]]
    if name == "gnmt":  # recurrent matrices and the attention query: one weight, one call per step
        assert max(calls) >= 4 and lib.payload_bytes <= 1.1 * lib.csr_bytes
    else:
        assert set(calls) == {1}


def test_gnmt_from_onnx_every_level(tmp_path):
    """The nested GNMT exported to ONNX (its recurrences as MatMul / Gemm) imports through from_onnx."""
    from tvm_nested.authoring.onnx_nest import ort_run, ort_session
    from tvm_nested.authoring.training import export_onnx

    dense, (src, tgt) = families.build("gnmt")
    nested = prune_model(dense, PruningConfig(DENSITIES))
    path = tmp_path / "gnmt.onnx"
    export_onnx(nested, src, tgt, path=path, input_names=["src", "tgt"], dynamic_batch=False)
    lib = tvm_nested.build(tvm_nested.from_onnx(str(path)), "llvm")
    assert max(layer["calls"] for layer in lib.info["layers"]) >= 4
    rt, sess = lib.runtime(), ort_session(str(path))
    for level in range(len(DENSITIES)):
        ref = ort_run(sess, [src.numpy(), tgt.numpy()], level=level)[0]
        _close(rt.run(src.numpy(), tgt.numpy(), level=level)[0], ref)


class Conv1dCircular(nn.Module):
    """A 1-D conv net with circular padding (torch.export writes it as slice_scatter ops) and a 2-D one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=2)
        self.c3 = nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8 * 6 + 4 * 4 * 6, 3)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        z = torch.relu(self.c3(x[:, None, :, :6]))
        return self.fc(torch.cat([y.flatten(1), z.flatten(1)], 1))


def test_conv1d_and_circular_padding_every_level():
    torch.manual_seed(0)
    dense = Conv1dCircular().eval()
    nested = prune_model(dense, PruningConfig(DENSITIES))
    x = torch.randn(2, 4, 12)
    lib = tvm_nested.build(tvm_nested.from_torch(nested, (x,), {"level": torch.tensor(0)}), "llvm")
    assert sorted(layer["op"] for layer in lib.info["layers"]) == ["conv1d", "conv1d", "conv2d", "linear"]
    rt = lib.runtime()
    for level in range(len(DENSITIES)):
        with torch.no_grad():
            ref = _reference(dense, nested, level)(x).numpy()
        _close(rt.run(x.numpy(), level=level)[0], ref)


def test_hand_written_masked_conv_transpose_is_named_not_silent():
    """A masked weight no kernel serves (here a transposed conv) next to a nested layer: a warning
    names it, and the knob still counts its levels (never dense compute in silence)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.register_buffer("lm", torch.randint(-1, 3, (4, 2, 3, 3)))
            self.fc = tnn.NestedLinear(2 * 7 * 7, 3, level_map=np.random.default_rng(0).integers(-1, 2, (3, 98)))

        def forward(self, x, level):
            self.fc.level = level
            y = F.conv_transpose2d(x, self.w * (self.lm >= level).float(), stride=2)
            return self.fc(y.flatten(1))

    x = torch.randn(1, 4, 3, 3)
    mod = tvm_nested.from_torch(Model().eval(), (x,), {"level": torch.tensor(0)})
    with pytest.warns(NestedLoweringWarning, match=r"masked weight .*\[4, 2, 3, 3\] feeds relax.nn.conv2d_transpose"):
        lib = tvm_nested.build(mod, "llvm")
    assert lib.num_levels == 3 and len(lib.info["layers"]) == 1
