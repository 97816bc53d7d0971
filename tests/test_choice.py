"""Sparse-or-dense choice per layer and level (schedules/choice.py): table logic, keys, and the
forced-dense path giving the sparse numbers at every level, in a kernel and in a whole model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from ir_checks import run_pipeline
from nested_kernels import nested_conv2d, respecialized
from torch import nn

import tvm_nested
from tvm_nested.authoring import nn as tnn
from tvm_nested.schedules import NestedCSR, nested_conv2d_ref, schedule_cpu, spec_of
from tvm_nested.schedules.choice import (
    CHOICE_FILE,
    apply_choices,
    choose,
    kernel_key,
    kernels_with_keys,
    load_choices,
    save_choices,
    specialize_module,
)

HOST = tvm.target.Target("llvm")


# ------------------------------------------------------------------------------- choice logic
@pytest.mark.parametrize(
    "sparse,dense,expect",
    [
        ([1.0, 0.5, 0.2, 0.1], [0.6, 0.6, 0.6, 0.6], [1, 0, 0, 0]),  # dense wins at the densest level
        ([1.0, 0.5, 0.2], [2.0, 2.0, 2.0], [0, 0, 0]),  # never
        ([1.0, 0.5, 0.2], [0.1, 0.1, 0.1], [1, 1, 1]),  # always
        ([1.0, 1.0], [0.95, 0.89], [0, 1]),
    ],  # within the 10 % margin: stays sparse
    ids=["densest_only", "never", "always", "margin"],
)
def test_choose_from_synthetic_timings(sparse, dense, expect):
    table = choose(sparse, dense)
    assert table.dtype == np.int8 and table.tolist() == expect


def test_choose_rejects_mismatched_timings():
    with pytest.raises(ValueError, match="per-level timings"):
        choose([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="margin"):
        choose([1.0], [1.0], margin=0)


# ------------------------------------------------------------------------------ kernel numerics
def _conv_case(levels=4, seed=3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    lm = rng.integers(-1, levels, w.shape).astype(np.int32)
    x = rng.standard_normal((1, 6, 10, 10)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    fmt = NestedCSR.pack(w.reshape(8, -1), lm.reshape(8, -1), levels)
    func = nested_conv2d(fmt, x.shape, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, True)
    return w, lm, x, bias, fmt, func


def _run(func, fmt, x, bias, level):
    ex = tvm.compile(schedule_cpu(func, HOST), target=HOST)
    args = [
        tvm.runtime.tensor(a)
        for a in [x, *fmt.arrays(), bias, np.array(level, np.int32), np.zeros((1, 8, 5, 5), np.float32)]
    ]
    ex["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("dense_levels", [[0], [2, 3], [0, 1, 2, 3]], ids=["l0", "l2_3", "all"])
def test_forced_dense_gives_the_sparse_numbers_at_every_level(dense_levels):
    w, lm, x, bias, fmt, func = _conv_case()
    dense = respecialized(func, layout="flat", dense_levels=tuple(dense_levels))
    assert list(spec_of(dense).dense_levels) == dense_levels
    for level in range(4):
        ref = nested_conv2d_ref(x, (w, lm), level, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, bias)
        got_sparse = _run(func, fmt, x, bias, level)
        got_dense = _run(dense, fmt, x, bias, level)
        np.testing.assert_allclose(got_dense, got_sparse, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_dense, ref, rtol=1e-4, atol=1e-4)


def test_key_ignores_the_choice_and_follows_the_level_lengths():
    _, _, _, _, fmt, func = _conv_case()
    flat = respecialized(func, layout="flat", dense_levels=())
    key = kernel_key(flat, fmt.level_len)
    assert kernel_key(respecialized(func, layout="flat", dense_levels=(1,)), fmt.level_len) == key
    other = fmt.level_len.copy()
    other[0, 0] += 1
    assert kernel_key(flat, other) != key


def test_dense_level_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"dense levels \(4,\) outside 0\.\.3"):
        respecialized(_conv_case()[-1], layout="flat", dense_levels=(4,))


# --------------------------------------------------------------------------------- whole model
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.fc(torch.flatten(torch.relu(self.c2(y)), 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = tnn.nest(_Net().eval(), {"c1": (0.5, 0.2, 0.1), "c2": (0.5, 0.2, 0.1), "fc": (0.5, 0.2, 0.1)}).eval()
    x = torch.randn(1, 3, 8, 8)
    return model, x, tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)})


def test_untuned_build_is_all_sparse_and_records_it(net):
    _model, _x, mod = net
    lib = tvm_nested.build(mod, "llvm")
    convs = [layer for layer in lib.info["layers"] if layer["op"] == "conv2d"]
    assert len(convs) == 2 and all(layer["dense_levels"] == [] for layer in convs)


def test_choice_table_from_log_is_compiled_in_and_recorded(net, tmp_path):
    """A table in the log (as tune writes it) makes build compile the dense path for those levels;
    the numbers stay those of the model at every level."""
    model, x, mod = net
    lowered, _ = specialize_module(run_pipeline(mod), HOST)
    kernels = kernels_with_keys(lowered)
    assert len(kernels) == 2
    (name0, _, _, key0), (name1, _, _, key1) = kernels
    measured = {
        key0: {"name": name0, "table": [1, 0, 1], "sparse_s": [], "dense_s": []},
        key1: {"name": name1, "table": [0, 0, 0], "sparse_s": [], "dense_s": []},
    }
    from tvm_nested.schedules import tuning_log as tunelog

    tunelog.open_for_tuning(tmp_path, tvm_nested.parse_target("llvm"))  # as tune: manifest first
    save_choices(tmp_path, measured, str(HOST))
    assert json.loads((tmp_path / CHOICE_FILE).read_text())["kernels"][key0]["table"] == [1, 0, 1]
    assert load_choices(tmp_path) == {key0: [1, 0, 1], key1: [0, 0, 0]}
    chosen_mod, chosen = apply_choices(lowered, load_choices(tmp_path))
    assert chosen == {name0: [0, 2], name1: []}
    assert list(spec_of(chosen_mod[name0]).dense_levels) == [0, 2] and list(spec_of(lowered[name0]).dense_levels) == []

    # build reads the table from the log directory (a tuning log with only the manifest + table)
    lib = tvm_nested.build(mod, "llvm", tuning_log=tmp_path)
    recorded = {layer["kernel"]: layer["dense_levels"] for layer in lib.info["layers"] if layer["op"] == "conv2d"}
    assert recorded == {name0: [0, 2], name1: []}
    rt = lib.runtime()
    for level in range(lib.num_levels):
        ref = model(x, level=torch.tensor(level)).detach().numpy()
        got = rt.run(x.numpy(), level=level)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
