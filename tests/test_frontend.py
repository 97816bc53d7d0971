"""tvm_nested.frontend: from_torch / from_onnx give Relax modules with a 0-d integer ``level`` input."""

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tvm import relax

from tvm_nested.authoring import nn as tnn
from tvm_nested.frontend import from_onnx, from_torch

DENS = [0.5, 0.25, 0.1]


def _level_param(mod):
    params = {p.name: p for p in mod["main"].params}
    assert "level" in params, list(params)
    ty = params["level"].ty
    assert ty.ndim == 0
    return ty.dtype.dtype if hasattr(ty.dtype, "dtype") else str(ty.dtype)


def _run(mod, *args):
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


# -------------------------------------------------------------------------------------- PyTorch
def _torch_nested():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    return tnn.nest(dense, {"0": DENS, "3": DENS})


class ExplicitLevel(nn.Module):
    """A hand-written nested model: level is an ordinary positional argument."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 8, generator=g))
        self.register_buffer("lm", torch.randint(-1, 3, (6, 8), generator=g, dtype=torch.int32))

    def forward(self, x, level):
        return x @ (self.w * (self.lm >= level)).T


X = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "args,kwargs",
    [((X, torch.tensor(1)), None), ((X,), {"level": torch.tensor(1, dtype=torch.int32)}), ((X, 1), None)],
    ids=["positional-int64", "kwarg-int32", "python-int"],
)
def test_from_torch_nested_model(args, kwargs):
    nm = _torch_nested()
    mod = from_torch(nm, args, kwargs)
    assert _level_param(mod) == "int32"
    assert [p.name for p in mod["main"].params][-1] == "level"


def test_from_torch_matches_pytorch_at_every_level():
    nm = _torch_nested()
    mod = from_torch(nm, (X, torch.tensor(0)))
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    for level in range(len(DENS)):
        want = nm(X, level=torch.tensor(level)).detach().numpy()
        got = vm["main"](tvm.runtime.tensor(X.numpy()), tvm.runtime.tensor(np.array(level, "int32")))[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"level {level}")


def test_from_torch_positional_level_and_eval_mode():
    m = ExplicitLevel().train()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    mod = from_torch(m, (x, torch.tensor(2)))
    assert not m.training
    assert [p.name for p in mod["main"].params] == ["x", "level"]
    got = _run(mod, x.numpy(), np.array(2, "int32"))
    np.testing.assert_allclose(got, m(x, torch.tensor(2)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_from_torch_refuses_model_without_level():
    with pytest.raises(ValueError, match=r"takes no argument named 'level'"):
        from_torch(nn.Linear(3, 2), (torch.zeros(1, 3),))


@pytest.mark.parametrize(
    "level,match",
    [(torch.tensor([1]), r"0-d tensor .*shape \[1\]"), (torch.tensor(1.0), "integer dtype"), ("1", "0-d integer")],
    ids=["rank1", "float", "string"],
)
def test_from_torch_refuses_bad_level(level, match):
    with pytest.raises(ValueError, match=match):
        from_torch(ExplicitLevel(), (torch.zeros(1, 8), level))


@pytest.mark.parametrize("bad", [None, "model.onnx", 3], ids=["none", "str", "int"])
def test_from_torch_refuses_non_module(bad):
    with pytest.raises(ValueError, match=r"expected a torch\.nn\.Module"):
        from_torch(bad, ())


def test_from_torch_refuses_missing_level_example():
    with pytest.raises(ValueError, match="has no example"):
        from_torch(ExplicitLevel(), (torch.zeros(1, 8),))


# ----------------------------------------------------------------------------------------- ONNX
def _onnx_model(level_type=TensorProto.INT64, level_shape=(), name="level", opset=17):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 8)).astype(np.float32)
    lm = rng.integers(-1, 3, (5, 8)).astype(np.int64)
    nodes = [
        helper.make_node("GreaterOrEqual", ["lm", name], ["keep"]),
        helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["W", "mask"], ["w_eff"]),
        helper.make_node("Gemm", ["x", "w_eff"], ["y"], transB=1),
    ]
    if level_type != TensorProto.INT64 and level_type in (TensorProto.INT32,):
        lm = lm.astype(np.int32)
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info(name, level_type, list(level_shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(lm, "lm")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), w, lm


@pytest.mark.parametrize("level_type", [TensorProto.INT64, TensorProto.INT32], ids=["int64", "int32"])
def test_from_onnx_level_is_scalar_int(level_type):
    model, w, lm = _onnx_model(level_type)
    mod = from_onnx(model)
    assert _level_param(mod) == "int32"
    assert [p.name for p in mod["main"].params] == ["x", "level"]
    assert int(mod["main"].attrs["num_input"]) == 2
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    got = _run(mod, x, np.array(1, "int32"))
    np.testing.assert_allclose(got, x @ (w * (lm >= 1)).T, rtol=1e-5, atol=1e-5)


def test_from_onnx_path_and_dtype_override(tmp_path):
    model, _, _ = _onnx_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    mod = from_onnx(str(path), dtype_dict={"level": "int64"})
    assert _level_param(mod) == "int64"
    mod = from_onnx(path)  # os.PathLike
    assert _level_param(mod) == "int32"


def test_from_onnx_refuses_model_without_level():
    model, _, _ = _onnx_model(name="lvl")
    with pytest.raises(ValueError, match=r"no input named 'level' \(inputs: 'x', 'lvl'\)"):
        from_onnx(model)


def test_from_onnx_refuses_non_scalar_level():
    model, _, _ = _onnx_model(level_shape=(1,))
    with pytest.raises(ValueError, match=r"'level' has rank 1 \(shape \[1\]\)"):
        from_onnx(model)


def test_from_onnx_refuses_float_level():
    model, _, _ = _onnx_model(level_type=TensorProto.FLOAT)
    with pytest.raises(ValueError, match="integer type, got float32"):
        from_onnx(model)


def test_from_onnx_refuses_non_scalar_shape_dict():
    model, _, _ = _onnx_model()
    with pytest.raises(ValueError, match="scalar, shape"):
        from_onnx(model, shape_dict={"level": [1]})


def test_from_onnx_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no ONNX file at"):
        from_onnx(str(tmp_path / "missing.onnx"))


def test_from_onnx_not_onnx(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\xff\x00 this is not protobuf")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        from_onnx(str(p))


@pytest.mark.parametrize("bad", [None, 3, nn.Linear(2, 2)], ids=["none", "int", "torch-module"])
def test_from_onnx_wrong_type(bad):
    with pytest.raises(ValueError, match=r"expected an onnx\.ModelProto or a path"):
        from_onnx(bad)


def test_from_onnx_unknown_shape_dict_name():
    model, _, _ = _onnx_model()
    with pytest.raises(ValueError, match="does not have"):
        from_onnx(model, shape_dict={"y": [2, 5]})


def test_from_onnx_converts_old_opset(caplog):
    model, _, _ = _onnx_model(opset=12)  # GreaterOrEqual exists from opset 12
    with caplog.at_level("INFO", logger="tvm_nested.frontend"):
        mod = from_onnx(model)
    assert "converting to opset 17" in caplog.text
    assert _level_param(mod) == "int32"


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_from_onnx_refuses_recurrent_ops_naming_the_torch_route(op):
    """TVM's ONNX frontend has no LSTM / GRU: the refusal names the op, the node and what works."""
    gates = 4 if op == "LSTM" else 3
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, gates * 5, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, gates * 5, 5)).astype(np.float32), "R"),
    ]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W", "R"], ["y"], name="encoder", hidden_size=5)],
        "rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, 3]),
            helper.make_tensor_value_info("level", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, 1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match=rf"node 'encoder' is an ONNX {op}, .*cannot import; .*tvm_nested.from_torch"):
        from_onnx(model)
