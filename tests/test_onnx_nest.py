"""tvm_nested.authoring.onnx_nest: nest_onnx output is valid ONNX and ORT at every level equals W * (LM >= l)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_nested.authoring import onnx_nest as on
from tvm_nested.authoring.levelmap import NestingError, levelmap_by_magnitude

DENS = [0.6, 0.3, 0.1]
L = len(DENS)


def _weights():
    rng = np.random.default_rng(0)
    return {
        "conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(4).astype(np.float32),
        "fc_w": rng.standard_normal((6, 4 * 5 * 5)).astype(np.float32),
        "fc_b": rng.standard_normal(6).astype(np.float32),
        "mm_w": rng.standard_normal((6, 3)).astype(np.float32),
    }


def _dense_model(opset=17):
    w = _weights()
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "mm_w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _numpy_forward(x, w, lms, level):
    """The model in NumPy with every nested weight W * (LM >= level)."""

    def eff(name):
        return w[name] * (lms[name] >= level) if name in lms else w[name]

    cw, n = eff("conv_w"), x.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    c = np.zeros((n, 4, 5, 5), np.float64)
    for i in range(5):
        for j in range(5):
            c[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i : i + 3, j : j + 3], cw)
    c += w["conv_b"][None, :, None, None]
    f = np.maximum(c, 0).reshape(n, -1)
    g = f @ eff("fc_w").T + w["fc_b"]
    return g @ eff("mm_w")


X = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("level_dtype", ["int64", "int32"])
@pytest.mark.parametrize("level", range(L), ids=[f"level{l}" for l in range(L)])
def test_ort_every_level_equals_numpy(level, level_dtype):
    model = on.nest_onnx(_dense_model(), densities=DENS, level_dtype=level_dtype)
    onnx.checker.check_model(model, full_check=True)
    lvl = next(i for i in model.graph.input if i.name == "level")
    assert lvl.type.tensor_type.elem_type == {"int64": TensorProto.INT64, "int32": TensorProto.INT32}[level_dtype]
    assert len(lvl.type.tensor_type.shape.dim) == 0 and lvl.type.tensor_type.HasField("shape")
    w = _weights()
    lms = {k: levelmap_by_magnitude(w[k], DENS) for k in ("conv_w", "fc_w", "mm_w")}
    got = on.ort_run(model, {"x": X}, level)[0]
    np.testing.assert_allclose(got, _numpy_forward(X, w, lms, level), rtol=1e-4, atol=1e-4)


def test_design_form_and_level_maps():
    model = on.nest_onnx(_dense_model(), densities=DENS)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GreaterOrEqual") == 3 and ops.count("Mul") == 3
    lms = on.nested_level_maps(model)
    assert sorted(lms) == ["conv_w", "fc_w", "mm_w"]
    assert on.num_levels(model) == L
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert conv.input[1] != "conv_w" and conv.input[2] == "conv_b", "only the weight is rewritten"


def test_masked_dense_onnx_matches_nested():
    model = on.nest_onnx(_dense_model(), densities=DENS)
    sess = on.ort_session(model)
    for level in range(L):
        dense = on.masked_dense_onnx(model, level)
        assert "level" not in [i.name for i in dense.graph.input]
        np.testing.assert_allclose(on.ort_run(dense, X)[0], on.ort_run(sess, X, level)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,nested",
    [
        ({"keep_first_dense": True}, ["fc_w", "mm_w"]),
        ({"keep_last_dense": True}, ["conv_w", "fc_w"]),
        ({"keep_first_dense": True, "keep_last_dense": True}, ["fc_w"]),
        ({"layers": ["fc_w"]}, ["fc_w"]),
    ],
    ids=["first", "last", "both", "layers"],
)
def test_keep_dense_options(kwargs, nested):
    model = on.nest_onnx(_dense_model(), densities=DENS, **kwargs)
    assert sorted(on.nested_level_maps(model)) == nested


def test_explicit_level_maps_and_masks():
    w = _weights()
    rng = np.random.default_rng(3)
    lm = rng.integers(-1, 4, w["fc_w"].shape).astype(np.int32)
    masks = [lm >= l for l in range(4)]
    a = on.nest_onnx(_dense_model(), {"fc_w": lm})
    b = on.nest_onnx(_dense_model(), {"fc_w": masks})
    np.testing.assert_array_equal(on.nested_level_maps(a)["fc_w"], lm)
    np.testing.assert_array_equal(on.nested_level_maps(b)["fc_w"], lm)
    for level in range(4):
        np.testing.assert_allclose(
            on.ort_run(a, X, level)[0], _numpy_forward(X, w, {"fc_w": lm}, level), rtol=1e-4, atol=1e-4
        )


def test_old_opset_is_converted():
    model = on.nest_onnx(_dense_model(opset=11), densities=DENS)
    assert on.onnx_opset(model) >= 13
    onnx.checker.check_model(model)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((), {}, "exactly one of"),
        (({"conv_w": DENS},), {"densities": DENS}, "exactly one of"),
        (({"nope": DENS},), {}, r"\['nope'\] are not weights"),
        (({"conv_w": np.zeros((2, 2), np.int32)},), {}, "shape"),
        ((), {"densities": DENS, "level_dtype": "float32"}, "level_dtype"),
        ((), {"densities": DENS, "layers": ["fc_b"]}, "not prunable"),
    ],
    ids=["none", "both", "unknown-weight", "bad-levelmap", "bad-level-dtype", "bias-layer"],
)
def test_nest_onnx_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        on.nest_onnx(_dense_model(), *args, **kwargs)


def test_non_nested_masks_refused():
    masks = [np.zeros((6, 3), bool), np.ones((6, 3), bool)]
    with pytest.raises(NestingError, match="mm_w: masks are not nested: level 1"):
        on.nest_onnx(_dense_model(), {"mm_w": masks})


def test_already_nested_refused():
    with pytest.raises(ValueError, match="already has an input named 'level'"):
        on.nest_onnx(on.nest_onnx(_dense_model(), densities=DENS), densities=DENS)


def test_ort_run_level_errors():
    model = on.nest_onnx(_dense_model(), densities=DENS)
    with pytest.raises(ValueError, match="pass level="):
        on.ort_run(model, X)
    with pytest.raises(ValueError, match="no 'level' input"):
        on.ort_run(_dense_model(), X, 1)
