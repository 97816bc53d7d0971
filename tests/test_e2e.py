"""End to end: nested models in, one module out, every level against an independent executor.

PyTorch models are checked against PyTorch at every level; ONNX models (including the onnx
package's model-zoo architectures) against onnxruntime running the masked dense model.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tvm_nested
from tvm_nested.authoring import nn as tnn

DENSITIES = (0.5, 0.2, 0.1, 0.05)


def _close(got, ref, tol=1e-4):
    scale = max(float(np.max(np.abs(ref))), 1.0)
    assert float(np.max(np.abs(got - ref))) <= tol * scale, f"max err {np.max(np.abs(got - ref))} (scale {scale})"


class SmallCNN(nn.Module):
    """conv + BN + relu, strided conv with bias, grouped conv, depthwise conv, linear, in containers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(32, 24, 1), nn.ReLU()),
        )
        self.head = nn.Linear(24 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


NESTED_LAYERS = ["features.0", "features.3", "features.5", "features.7", "features.9.0", "head"]


@pytest.fixture(scope="module")
def torch_case():
    torch.manual_seed(0)
    dense = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics so folding is really exercised
        bn = dense.features[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    model = tnn.nest(dense, {name: DENSITIES for name in NESTED_LAYERS}).eval()
    x = torch.randn(2, 3, 12, 12)
    mod = tvm_nested.from_torch(model, (x,), {"level": torch.tensor(0)})
    lib = tvm_nested.build(mod, target="llvm")
    return model, x, lib


def test_torch_model_every_level(torch_case):
    model, x, lib = torch_case
    assert lib.num_levels == len(DENSITIES)
    rt = lib.runtime()
    for level in range(lib.num_levels):
        ref = model(x, level=torch.tensor(level)).detach().numpy()
        (got,) = rt.run(x.numpy(), level=level)
        _close(got, ref)


def test_levels_change_without_reload(torch_case):
    _model, x, lib = torch_case
    rt = lib.runtime()
    outs = {lvl: rt.run(x.numpy(), level=lvl)[0] for lvl in (0, 3, 1, 0)}
    assert not np.allclose(outs[0], outs[3])
    _close(rt.run(x.numpy(), level=0)[0], outs[0], tol=0)


def test_every_nested_layer_lowered(torch_case):
    _, _, lib = torch_case
    assert len(lib.info["layers"]) == len(NESTED_LAYERS)
    ops = sorted(layer["op"] for layer in lib.info["layers"])
    assert ops == ["conv2d"] * 5 + ["linear"]


def test_densities_recorded(torch_case):
    _, _, lib = torch_case
    d = lib.densities
    assert all(a >= b for a, b in itertools.pairwise(d))
    for got, want in zip(d, DENSITIES):
        assert abs(got - want) < 0.01


def test_storage_within_csr_yardstick(torch_case):
    _, _, lib = torch_case
    for layer in lib.info["layers"]:
        assert layer["payload_bytes"] <= 1.1 * layer["csr_bytes"], layer
    assert lib.payload_bytes <= 1.1 * lib.csr_bytes


@pytest.mark.parametrize(
    "level, match",
    [
        (-1, "out of range"),
        (4, "out of range"),
        (1.5, "must be an integer"),
        ("2", "must be an integer"),
        (True, "must be an integer"),
        (None, "must be an integer"),
    ],
    ids=["minus-one", "L", "float", "string", "bool", "none"],
)
def test_bad_levels_raise(torch_case, level, match):
    _, x, lib = torch_case
    with pytest.raises(ValueError, match=match):
        lib.runtime().run(x.numpy(), level=level)


def test_wrong_input_shape_raises(torch_case):
    _, _, lib = torch_case
    with pytest.raises(ValueError, match="expected shape"):
        lib.runtime().run(np.zeros((1, 3, 12, 12), "float32"), level=0)


def test_wrong_input_count_raises(torch_case):
    _, x, lib = torch_case
    with pytest.raises(ValueError, match="expected 1 input"):
        lib.runtime().run(x.numpy(), x.numpy(), level=0)


def test_raw_vm_call_out_of_range_is_an_error_not_a_crash(torch_case):
    """The guard is compiled into main: a caller bypassing the Python checks still gets an error."""
    import tvm
    from tvm import relax

    _, x, lib = torch_case
    vm = relax.VirtualMachine(lib.executable, tvm.cpu())
    level_dtype = next(p["dtype"] for p in lib.info["inputs"] if p["name"] == "level")
    for bad in (99, -3):
        with pytest.raises(AssertionError, match="out of range"):
            vm["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(np.array(bad, level_dtype)))


def test_non_nested_masks_refused():
    layer = nn.Linear(4, 3)
    masks = [np.ones((3, 4), bool), np.eye(3, 4, dtype=bool), np.eye(3, 4, k=1, dtype=bool)]
    with pytest.raises(tvm_nested.NestingError, match=r"head: masks are not nested: level 2"):
        tnn.nest(_Wrap(layer), {"head": masks})


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.head = layer

    def forward(self, x):
        return self.head(x)


def test_exported_library_in_fresh_process(torch_case, tmp_path):
    _model, x, lib = torch_case
    so = lib.export_library(tmp_path / "model.so")
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import json, sys, numpy as np, tvm_nested\n"
        f"rt = tvm_nested.load({str(so)!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "outs = {l: rt.run(x, level=l)[0].tolist() for l in range(rt.num_levels)}\n"
        "print(json.dumps(outs))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    outs = json.loads(res.stdout.strip().splitlines()[-1])
    rt = lib.runtime()
    for lvl, values in outs.items():
        _close(np.asarray(values, "float32"), rt.run(x.numpy(), level=int(lvl))[0], tol=0)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no compiled module"):
        tvm_nested.load(tmp_path / "nope.so")


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_onnx_zoo_every_level(name):
    """Model-zoo architectures (seeded weights), every level against onnxruntime on the masked dense model."""
    from tvm_nested.authoring.onnx_nest import ort_run
    from tvm_nested.authoring.zoo import nested

    model = nested(name, densities=DENSITIES, seed=0)
    inp = next(
        i
        for i in model.graph.input
        if i.name != "level" and i.name not in {init.name for init in model.graph.initializer}
    )
    x = (
        np.random.default_rng(0)
        .standard_normal([d.dim_value for d in inp.type.tensor_type.shape.dim])
        .astype("float32")
    )
    lib = tvm_nested.build(tvm_nested.from_onnx(model), target="llvm")
    assert lib.num_levels == len(DENSITIES)
    assert lib.payload_bytes <= 1.1 * lib.csr_bytes
    rt = lib.runtime()
    for level in range(lib.num_levels):
        (ref,) = ort_run(model, {inp.name: x}, level=level)
        (got,) = rt.run(x, level=level)
        _close(got, ref)


def test_num_threads_really_changes():
    """TVM sizes its pool once from TVM_NUM_THREADS; tvm_nested sizes it to every core before TVM starts it."""
    cores = os.cpu_count() or 1
    try:
        tvm_nested.set_num_threads(1)
        assert tvm_nested.num_threads() == 1
        tvm_nested.set_num_threads(cores)
        assert tvm_nested.num_threads() == cores
        with pytest.raises(ValueError, match="at most"):
            tvm_nested.set_num_threads(cores + 1)
        with pytest.raises(ValueError, match="positive integer"):
            tvm_nested.set_num_threads(0)
    finally:
        tvm_nested.set_num_threads(cores)
