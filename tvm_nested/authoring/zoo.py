"""Model-zoo architectures from the installed onnx package, with seeded weights that make sense.

The onnx package ships ``onnx/backend/test/data/light/light_<name>.onnx``: real architectures
(ResNet-50, SqueezeNet, ShuffleNet, VGG-19, ...) at opset 9 whose weights are ``ConstantOfShape``
nodes filled with one value. ``load`` replaces every such weight (and the few stored float
initializers) by a seeded random initializer chosen by role, so outputs are numerically meaningful:

* conv / gemm weights: He (Kaiming) normal, std = sqrt(2 / fan_in), activations stay O(1);
* BatchNorm (and the Unsqueeze + Mul/Add BatchNorm of DenseNet / Inception-v2): scale ~1, bias ~0,
  mean ~0, var ~1 (positive); the BatchNorm that ends a residual branch (feeds a Sum/Add) gets a small
  scale so that ResNet-style sums do not double the variance at every block;
* biases: small.

Dropout is dropped (inference), the model is converted to opset 17 (before the weights are
filled in, so the converter copies no large tensors), the classifier is rescaled
so that the softmax input has a fixed spread (one onnxruntime run on a seeded input: neither a
saturated nor a uniform softmax), and ``onnx.checker`` verifies it.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..contract import LEVEL
from ..frontend import ONNX_OPSET, graph_inputs
from .onnx_nest import nest_onnx

logger = logging.getLogger(__name__)

_LIGHT_DIR = os.path.join("backend", "test", "data", "light")
LOGIT_STD = 2.0  # spread of the softmax input after calibration: a peaked but not saturated softmax
RESIDUAL_BN_SCALE = 0.2  # scale of the BatchNorm that ends a residual branch
_SHAPE_OPS = ("Unsqueeze", "Reshape", "Flatten", "Squeeze")  # ops that move values without changing them


def _light_dir() -> str:
    import onnx

    return os.path.join(os.path.dirname(onnx.__file__), _LIGHT_DIR)


def list_models() -> list[str]:
    """Names accepted by ``load`` (``resnet50``, ``squeezenet``, ``shufflenet``, ...)."""
    d = _light_dir()
    if not os.path.isdir(d):
        return []
    return sorted(
        f[len("light_") : -len(".onnx")] for f in os.listdir(d) if f.startswith("light_") and f.endswith(".onnx")
    )


def path_of(name: str) -> str:
    """Path of the zoo file for ``name``; ValueError listing the names when there is none."""
    names = list_models()
    if name not in names:
        raise ValueError(f"zoo: no model named {name!r}; available: {names}")
    return os.path.join(_light_dir(), f"light_{name}.onnx")


# -------------------------------------------------------------------------------- weight roles
def _consumers(graph) -> dict[str, list[tuple[object, int]]]:
    out = defaultdict(list)
    for n in graph.node:
        for k, i in enumerate(n.input):
            out[i].append((n, k))
    return out


def _role(name: str, consumers) -> tuple[str, int, object]:
    """(op_type, input slot, node) of the op that finally reads tensor ``name``.

    Looks through shape-only ops (Unsqueeze, Reshape, Flatten, Squeeze) on the way.
    """
    seen = 0
    while seen < 8:
        uses = consumers.get(name, [])
        if not uses:
            return ("", -1, None)
        node, slot = uses[0]
        if node.op_type in _SHAPE_OPS and slot == 0 and len(uses) == 1:
            name, seen = node.output[0], seen + 1
            continue
        return (node.op_type, slot, node)
    return ("", -1, None)


def _fan_in(shape: Sequence[int], node) -> int:
    if node is not None and node.op_type == "Gemm" and len(shape) == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(shape[1] if trans_b else shape[0])
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def _feeds_residual_sum(node, consumers) -> bool:
    """True for a BatchNorm whose output is summed with another tensor (end of a residual branch)."""
    if node is None or node.op_type != "BatchNormalization":
        return False
    uses = consumers.get(node.output[0], [])
    return any(u.op_type in ("Sum", "Add") and len(u.input) >= 2 for u, _ in uses)


def _random_tensor(shape, op: str, slot: int, node, consumers, rng) -> np.ndarray | None:
    shape = tuple(int(s) for s in shape)

    def normal(mean, std, shape):  # float32 draws: VGG-19 has 140M weights
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean)

    if (op in ("Conv", "Gemm") and slot == 1) or (op == "MatMul" and slot in (0, 1)):
        std = np.sqrt(2.0 / max(_fan_in(shape, node), 1))
        return normal(0.0, std, shape)
    if op in ("Conv", "Gemm") and slot == 2:
        return normal(0.0, 0.01, shape)
    if op == "BatchNormalization":
        if slot == 1:
            base = RESIDUAL_BN_SCALE if _feeds_residual_sum(node, consumers) else 1.0
            return base * rng.uniform(0.8, 1.2, shape)
        if slot == 2:
            return normal(0.0, 0.05, shape)
        if slot == 3:
            return normal(0.0, 0.05, shape)
        if slot == 4:
            return rng.uniform(0.8, 1.2, shape)
    if op == "Mul":  # the scale of an Unsqueeze + Mul + Add BatchNorm
        return rng.uniform(0.8, 1.2, shape)
    if op == "Add":
        return normal(0.0, 0.05, shape)
    return None


# ---------------------------------------------------------------------------------- the rewrite
def _seed_weights(model, rng) -> None:
    """Replace ConstantOfShape weights and float initializers by seeded random initializers, in place."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    consumers = _consumers(g)
    inits = {t.name: t for t in g.initializer}
    generated: list[tuple[str, tuple[int, ...]]] = []
    drop_nodes = []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input and n.input[0] in inits:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None and value.data_type != TensorProto.FLOAT:
                continue
            generated.append((n.output[0], tuple(numpy_helper.to_array(inits[n.input[0]]).tolist())))
            drop_nodes.append(n)
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and consumers.get(t.name):
            generated.append((t.name, tuple(t.dims)))

    new_inits = {}
    for name, shape in generated:  # graph order: one seed gives one model
        op, slot, node = _role(name, consumers)
        arr = _random_tensor(shape, op, slot, node, consumers, rng)
        if arr is None:
            logger.warning(
                "zoo: %s (shape %s) feeds %s input %d: no role known, small normal weights",
                name,
                shape,
                op or "nothing",
                slot,
            )
            arr = rng.normal(0.0, 0.01, shape)
        new_inits[name] = numpy_helper.from_array(arr.astype(np.float32), name)

    for n in drop_nodes:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in new_inits and t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + list(new_inits.values()))
    # IR v3 listed initializers as graph inputs; from IR v4 on they need not be: keep only real inputs
    init_names = {t.name for t in g.initializer}
    real = [
        i
        for i in g.input
        if i.name not in init_names
        and (i.name in used or i.name in {o.name for o in g.output})
        and not i.name.endswith("__SHAPE")
    ]
    del g.input[:]
    g.input.extend(real)


def _drop_dropout(model) -> None:
    """Remove inference-time Dropout (identity) whose mask output is unused; keeps graph outputs."""
    from onnx import helper

    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    outputs = {o.name for o in g.output}
    for n in list(g.node):
        if n.op_type != "Dropout" or (len(n.output) > 1 and n.output[1] in used):
            continue
        src, dst = n.input[0], n.output[0]
        if dst in outputs:
            idx = list(g.node).index(n)
            g.node.remove(n)
            g.node.insert(idx, helper.make_node("Identity", [src], [dst], name=n.name))
            continue
        g.node.remove(n)
        for m in g.node:
            for k, i in enumerate(m.input):
                if i == dst:
                    m.input[k] = src


def _softmax_input(model) -> str | None:
    sm = [n for n in model.graph.node if n.op_type == "Softmax"]
    return sm[-1].input[0] if sm else None


def _classifier(model):
    """The last Conv/Gemm (graph order): weight and bias initializer names, or None."""
    for n in reversed(model.graph.node):
        if n.op_type in ("Conv", "Gemm") and len(n.input) >= 2:
            return n
    return None


def _run_with(model, extra_outputs: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra_outputs:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _calibrate_classifier(model, x: np.ndarray, target_std: float = LOGIT_STD) -> float:
    """Scale the classifier (last Conv/Gemm weight and bias) so the softmax input has std ``target_std``.

    Exact, because everything between the classifier and the softmax (ReLU, pooling, reshapes) is
    positively homogeneous. Returns the factor applied (1.0 when there is no softmax).
    """
    from onnx import numpy_helper

    logits_name = _softmax_input(model)
    cls = _classifier(model)
    if logits_name is None or cls is None:
        return 1.0
    logits = _run_with(model, [logits_name], x)[-1]
    std = float(np.std(logits))
    if not np.isfinite(std) or std == 0.0:
        raise ValueError(f"zoo: the softmax input is degenerate before calibration (std {std})")
    factor = target_std / std
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for name in cls.input[1:3]:
        while name not in inits and name in producer and producer[name].op_type in _SHAPE_OPS:
            name = producer[name].input[0]  # e.g. Inception-v1 reshapes its classifier weight
        if name not in inits:
            raise ValueError(f"zoo: cannot find the initializer behind classifier input {name!r}")
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), name))
    return factor


def example_input(model, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for the model's float inputs (shapes from the graph)."""

    rng = np.random.default_rng(seed)
    out = {}
    for vi in graph_inputs(model):
        if vi.name == LEVEL:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        if batch is not None and shape:
            shape[0] = batch
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _is_probability(y: np.ndarray) -> bool:
    p = y.reshape(y.shape[0], -1) if y.ndim >= 2 else y.reshape(1, -1)
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-3))


def check_outputs(outputs: Sequence[np.ndarray], softmax: bool | None = None) -> None:
    """Raise ValueError unless outputs are finite, not all-zero, not constant and not a saturated softmax.

    ``softmax=None`` treats an output as probabilities when its rows are non-negative and sum to 1.
    """
    for k, y in enumerate(outputs):
        y = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise ValueError(f"output {k} holds inf/NaN")
        if not np.any(y):
            raise ValueError(f"output {k} is all zero")
        if np.ptp(y) == 0:
            raise ValueError(f"output {k} is constant ({y.ravel()[0]})")
        if softmax or (softmax is None and _is_probability(y)):
            p = y.reshape(y.shape[0], -1)
            if np.max(p) > 0.99:
                raise ValueError(f"output {k}: saturated softmax (max probability {np.max(p):.4f})")


def load(name: str, seed: int = 0, *, opset: int = ONNX_OPSET, calibrate: bool = True):
    """Zoo architecture ``name`` (see ``list_models``) with seeded weights, at ``opset`` (checked)."""
    import onnx
    from onnx import helper, version_converter

    model = onnx.load(path_of(name))
    _drop_dropout(model)
    try:  # convert while the weights are still ConstantOfShape nodes: the converter copies tensors
        model = version_converter.convert_version(model, opset)
    except Exception as err:
        raise ValueError(f"zoo: onnx.version_converter could not convert {name} to opset {opset}: {err}") from err
    _seed_weights(model, np.random.default_rng(seed))
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(model.opset_import))
    if calibrate:
        x = next(iter(example_input(model, seed).values()))
        _calibrate_classifier(model, x)
    onnx.checker.check_model(model, full_check=True)
    return model


def nested(
    name: str,
    densities: Sequence[float] = (0.5, 0.2, 0.1, 0.05),
    seed: int = 0,
    keep_first_dense: bool = False,
    **kwargs,
):
    """``nest_onnx(load(name, seed), densities=densities, ...)``: the zoo model, nested by magnitude."""

    return nest_onnx(load(name, seed), densities=densities, keep_first_dense=keep_first_dense, **kwargs)


__all__ = ["LOGIT_STD", "check_outputs", "example_input", "list_models", "load", "nested", "path_of"]
