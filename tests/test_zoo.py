"""tvm_nested.authoring.zoo: onnx-package zoo architectures with seeded weights give meaningful outputs."""

import numpy as np
import onnx
import pytest

from tvm_nested.authoring import zoo
from tvm_nested.authoring.onnx_nest import nested_level_maps, ort_run, ort_session
from tvm_nested.frontend import from_onnx

SMALL = ["squeezenet", "shufflenet"]


@pytest.fixture(scope="module", params=SMALL)
def small(request):
    return request.param, zoo.load(request.param, seed=0)


def test_list_models():
    names = zoo.list_models()
    assert {"resnet50", "squeezenet", "shufflenet"} <= set(names)


def test_unknown_model():
    with pytest.raises(ValueError, match="no model named 'lenet'"):
        zoo.load("lenet")


def test_load_is_checked_opset17_without_constantofshape(small):
    _, model = small
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    ops = {n.op_type for n in model.graph.node}
    assert "ConstantOfShape" not in ops and "Dropout" not in ops
    inits = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input if i.name not in inits] == [model.graph.input[0].name]


def test_outputs_finite_and_not_degenerate(small):
    _, model = small
    x = zoo.example_input(model, seed=1)
    y = ort_run(model, x)[0]
    zoo.check_outputs([y])
    p = y.reshape(1, -1)
    assert p.max() < 0.99 and p.max() > 1.5 / p.size, "softmax neither saturated nor uniform"
    # different inputs give different outputs: the network does not ignore its input
    y2 = ort_run(model, zoo.example_input(model, seed=2))[0]
    assert not np.allclose(y, y2)


def test_seeded(small):
    name, model = small
    again = zoo.load(name, seed=0)
    other = zoo.load(name, seed=1)
    a = {t.name: t.raw_data for t in model.graph.initializer}
    assert a == {t.name: t.raw_data for t in again.graph.initializer}
    assert a != {t.name: t.raw_data for t in other.graph.initializer}


@pytest.mark.parametrize(
    "outputs,match",
    [
        ([np.array([[np.nan, 1.0]])], "inf/NaN"),
        ([np.zeros((1, 4))], "all zero"),
        ([np.full((1, 4), 0.3)], "constant"),
        ([np.array([[0.995, 0.005]])], "saturated"),
    ],
    ids=["nan", "zero", "constant", "saturated"],
)
def test_check_outputs_rejects(outputs, match):
    with pytest.raises(ValueError, match=match):
        zoo.check_outputs(outputs)


def test_nested_squeezenet_levels_differ_and_import():
    model = zoo.nested("squeezenet", densities=(0.5, 0.2), keep_first_dense=True)
    lms = nested_level_maps(model)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    assert len(lms) == 25 and not first.input[1].endswith("__nested"), "first conv stays dense"
    x = zoo.example_input(model, seed=1)
    sess = ort_session(model)
    outs = [ort_run(sess, x, level)[0] for level in range(2)]
    for y in outs:
        zoo.check_outputs([y])
    assert not np.allclose(outs[0], outs[1])
    mod = from_onnx(model)
    assert [p.name for p in mod["main"].params][-1] == "level"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v1", "inception_v2"])
def test_big_models_meaningful_and_import(name):
    model = zoo.load(name, seed=0)
    zoo.check_outputs(ort_run(model, zoo.example_input(model, seed=1)))
    nested = zoo.nested(name, densities=(0.5, 0.1))
    mod = from_onnx(nested)
    assert [p.name for p in mod["main"].params][-1] == "level"


def test_dense_squeezenet_tvm_matches_ort():
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    model = zoo.load("squeezenet", seed=0)
    x = zoo.example_input(model, seed=1)
    vm = relax.VirtualMachine(tvm.compile(tvm_from_onnx(model), "llvm"), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(v) for v in x.values()])
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    np.testing.assert_allclose(got, ort_run(model, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_nested_squeezenet_plain_tvm_matches_ort_at_every_level():
    """from_onnx + a plain tvm.compile (masks evaluated densely) against ORT, one module for every level."""
    import tvm
    from tvm import relax

    densities = (0.5, 0.2, 0.05)
    model = zoo.nested("squeezenet", densities=densities)
    x = zoo.example_input(model, seed=1)
    vm = relax.VirtualMachine(tvm.compile(from_onnx(model), "llvm"), tvm.cpu())
    sess = ort_session(model)
    for level in range(len(densities)):
        got = vm["main"](*[tvm.runtime.tensor(v) for v in x.values()], tvm.runtime.tensor(np.array(level, "int32")))
        got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
        np.testing.assert_allclose(got, ort_run(sess, x, level)[0], rtol=1e-4, atol=1e-5, err_msg=f"level {level}")
