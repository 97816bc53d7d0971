"""ONNX side: turn a dense ONNX model into a nested one, and run any nested model as the oracle.

``nest_onnx`` adds the scalar input ``level`` and rewrites the weight ``W`` of each selected
Conv / Gemm / MatMul into the DESIGN section 2 form (opset >= 13)::

    W_eff = Mul(W, Cast(GreaterOrEqual(LM, level), to=FLOAT))

with ``LM`` a new initializer (int32; the level is cast once when its type differs).

onnxruntime evaluates those masks densely, so ORT running the nested model at a level *is* the
masked-dense oracle (``ort_run``); ``masked_dense_onnx`` also writes that level out as a plain dense
model (``W * (LM >= level)`` baked into the initializers) for executors that want no level input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..contract import LEVEL
from ..frontend import ONNX_OPSET, graph_inputs, load_onnx, onnx_opset, upgrade_onnx
from .levelmap import check_levelmap, levelmap_by_magnitude, levelmap_from_masks, num_levels_of

logger = logging.getLogger(__name__)

NESTABLE_OPS = ("Conv", "Gemm", "MatMul")
UNNESTED_WEIGHT_OPS = ("LSTM", "GRU", "RNN", "ConvTranspose")  # weights nest_onnx leaves dense (no kernel)
LEVELMAP_SUFFIX = "__levelmap"


def _weight_slot(node, inits: Mapping) -> int | None:
    """Index of the input of ``node`` that is its prunable weight initializer, or None."""

    def is_w(i):
        return (
            i < len(node.input)
            and node.input[i] in inits
            and inits[node.input[i]].ndim >= 2
            and inits[node.input[i]].dtype.kind == "f"
        )

    if node.op_type in ("Conv", "Gemm"):
        return 1 if is_w(1) else None
    if node.op_type == "MatMul":
        return 1 if is_w(1) else (0 if is_w(0) else None)
    return None


def prunable_weights(model, op_types: Sequence[str] = NESTABLE_OPS) -> list[str]:
    """Names of the weight initializers of ``op_types`` nodes, in graph (topological) order."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in op_types:
            slot = _weight_slot(node, inits)
            if slot is not None and node.input[slot] not in out:
                out.append(node.input[slot])
    return out


def _spec_to_levelmap(name: str, weight: np.ndarray, spec) -> np.ndarray:
    """A level map (array of W's shape), per-level masks (level 0 first) or densities -> level map."""
    try:
        nd = np.ndim(spec)
    except ValueError:  # ragged nested lists
        nd = -1
    if nd == weight.ndim:
        return check_levelmap(np.asarray(spec), weight.shape, layer=name)
    if nd == 1:
        return levelmap_by_magnitude(weight, [float(s) for s in spec])
    if nd == weight.ndim + 1:
        return levelmap_from_masks([np.asarray(m) for m in spec], layer=name)
    raise ValueError(
        f"{name}: expected a level map of shape {weight.shape}, per-level masks or a list of densities, "
        f"got {type(spec).__name__}"
    )


def nest_onnx(
    model,
    level_maps: Mapping[str, object] | None = None,
    *,
    densities: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    op_types: Sequence[str] = NESTABLE_OPS,
    level_dtype: str = "int64",
    opset: int = ONNX_OPSET,
):
    """A nested copy of the dense ONNX ``model`` (ModelProto or path); DESIGN section 2 form.

    Give either ``level_maps`` ({weight initializer name: level map | per-level masks | densities})
    or ``densities`` (level 0 densest first; magnitude pruning of every selected layer). ``layers``
    restricts ``densities`` to those weight names; ``keep_first_dense`` / ``keep_last_dense`` leave the
    first / last prunable layer (graph order) dense. ``level_dtype``: the type of the new ``level``
    input ("int64", as PyTorch exports, or "int32"). Models older than opset 13 are converted to
    ``opset`` first.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if (level_maps is None) == (densities is None):
        raise ValueError("nest_onnx: give exactly one of level_maps or densities")
    if level_dtype not in ("int32", "int64"):
        raise ValueError(f"nest_onnx: level_dtype must be 'int32' or 'int64', got {level_dtype!r}")
    src = load_onnx(model)
    if any(i.name == LEVEL for i in graph_inputs(src)):
        raise ValueError(f"nest_onnx: the model already has an input named {LEVEL!r} (already nested?)")
    m = onnx.ModelProto()
    m.CopyFrom(upgrade_onnx(src, opset))
    g = m.graph

    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    candidates = prunable_weights(m, op_types)
    if level_maps is not None:
        if not isinstance(level_maps, Mapping):
            raise ValueError(
                f"nest_onnx: level_maps must be a mapping from weight name to level map, "
                f"got {type(level_maps).__name__}"
            )
        unknown = [k for k in level_maps if k not in candidates]
        if unknown:
            raise ValueError(
                f"nest_onnx: {unknown} are not weights of {'/'.join(op_types)} nodes; prunable weights: {candidates}"
            )
        chosen = {k: _spec_to_levelmap(k, inits[k], v) for k, v in level_maps.items()}
    else:
        names = list(candidates)
        if layers is not None:
            missing = [k for k in layers if k not in candidates]
            if missing:
                raise ValueError(f"nest_onnx: layers {missing} are not prunable weights; prunable: {candidates}")
            names = [k for k in names if k in set(layers)]
        if keep_first_dense and candidates:
            names = [k for k in names if k != candidates[0]]
        if keep_last_dense and candidates:
            names = [k for k in names if k != candidates[-1]]
        chosen = {k: levelmap_by_magnitude(inits[k], densities) for k in names}
    if not chosen:
        logger.warning("nest_onnx: no layer selected; the model gets a level input that nothing reads")
    dense = [f"{n.op_type} {n.name or n.output[0]!r}" for n in g.node if n.op_type in UNNESTED_WEIGHT_OPS]
    if dense:
        logger.warning(
            "nest_onnx: %s keep dense weights (no nested kernel for them in ONNX; nest LSTM / GRU models "
            "in PyTorch with tvm_nested.nn.nest and import them with from_torch)",
            ", ".join(dense),
        )

    taken = (
        {n for node in g.node for n in list(node.input) + list(node.output)}
        | set(inits)
        | {i.name for i in g.input}
        | {o.name for o in g.output}
    )

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    lvl_type = TensorProto.INT64 if level_dtype == "int64" else TensorProto.INT32
    g.input.append(helper.make_tensor_value_info(LEVEL, lvl_type, []))
    taken.add(LEVEL)
    new_nodes = []
    level_i32 = LEVEL
    if chosen and level_dtype != "int32":
        level_i32 = fresh(f"{LEVEL}__int32")
        new_nodes.append(
            helper.make_node("Cast", [LEVEL], [level_i32], to=TensorProto.INT32, name=fresh("nested/level_cast"))
        )
    renamed: dict[str, str] = {}
    for wname, lm in chosen.items():
        w = inits[wname]
        lm_name = fresh(wname + LEVELMAP_SUFFIX)
        g.initializer.append(numpy_helper.from_array(lm.astype(np.int32), lm_name))
        if m.ir_version < 4:  # IR v3: every initializer must also be a graph input
            g.input.append(helper.make_tensor_value_info(lm_name, TensorProto.INT32, list(lm.shape)))
        keep, mask, eff = fresh(wname + "__keep"), fresh(wname + "__mask"), fresh(wname + "__nested")
        new_nodes += [
            helper.make_node("GreaterOrEqual", [lm_name, level_i32], [keep], name=fresh(f"nested/{wname}/ge")),
            helper.make_node(
                "Cast", [keep], [mask], to=helper.np_dtype_to_tensor_dtype(w.dtype), name=fresh(f"nested/{wname}/cast")
            ),
            helper.make_node("Mul", [wname, mask], [eff], name=fresh(f"nested/{wname}/mul")),
        ]
        renamed[wname] = eff
    for node in g.node:
        if node.op_type in op_types:
            slot = _weight_slot(node, inits)
            if slot is not None and node.input[slot] in renamed:
                node.input[slot] = renamed[node.input[slot]]
    old = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + old)  # the mask nodes read only initializers and level: first is topological
    onnx.checker.check_model(m)
    return m


# ------------------------------------------------------------------------------------- inspection
def nested_level_maps(model) -> dict[str, np.ndarray]:
    """{weight initializer name: level map} of a model in the DESIGN section 2 form.

    Recognises ``Mul(W, Cast(GreaterOrEqual(LM, level')))`` (and the commuted Mul, ``LessOrEqual(level',
    LM)``), ``level'`` being ``level`` or a Cast of it, W and LM initializers.
    """
    from onnx import numpy_helper

    model = load_onnx(model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    levelish = {LEVEL} | {n.output[0] for n in g.node if n.op_type == "Cast" and n.input[0] == LEVEL}

    def level_map_of(mask: str):
        n = producer.get(mask)
        if n is not None and n.op_type == "Cast":
            n = producer.get(n.input[0])
        if n is None:
            return None
        if n.op_type == "GreaterOrEqual" and n.input[0] in inits and n.input[1] in levelish:
            return n.input[0]
        if n.op_type == "LessOrEqual" and n.input[1] in inits and n.input[0] in levelish:
            return n.input[1]
        return None

    out = {}
    for n in g.node:
        if n.op_type != "Mul":
            continue
        for w, mask in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            lm = level_map_of(mask)
            if w in inits and lm is not None:
                out[w] = numpy_helper.to_array(inits[lm])
    return out


def num_levels(model) -> int:
    """L of a nested ONNX model (1 + the largest level-map value)."""
    return num_levels_of(list(nested_level_maps(model).values()))


def masked_dense_onnx(model, level: int):
    """The dense model of one level: every nested weight replaced by ``W * (LM >= level)``; no level input."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(load_onnx(model))
    lms = nested_level_maps(m)
    if not lms:
        raise ValueError("masked_dense_onnx: the model has no nested layer in the DESIGN section 2 form")
    g = m.graph
    for t in g.initializer:
        if t.name in lms:
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((w * (lms[t.name] >= level)).astype(w.dtype), t.name))
    # the level becomes a constant; TVM/ORT constant folding removes the masks
    from onnx import helper

    lvl = next(i for i in g.input if i.name == LEVEL)
    np_dt = helper.tensor_dtype_to_np_dtype(lvl.type.tensor_type.elem_type)
    g.initializer.append(numpy_helper.from_array(np.array(level, dtype=np_dt), LEVEL))
    g.input.remove(lvl)
    onnx.checker.check_model(m)
    return m


# ----------------------------------------------------------------------------------- ORT oracle
def ort_session(model, threads: int | None = None):
    """An onnxruntime CPU session for ``model`` (ModelProto or path); ``threads``: intra-op
    threads (None: onnxruntime's default, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(load_onnx(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(model_or_session, inputs, level: int | None = None) -> list[np.ndarray]:
    """Run a (nested) ONNX model with onnxruntime: the masked-dense oracle at ``level``.

    ``inputs``: {name: array} or a sequence in graph-input order (without the level), or one array.
    ``level`` is cast to the model's declared level type. Reuse ``ort_session(model)`` across levels.
    """
    sess = model_or_session if hasattr(model_or_session, "get_inputs") else ort_session(model_or_session)
    decl = {i.name: i for i in sess.get_inputs()}
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    if not isinstance(inputs, Mapping):
        names = [n for n in decl if n != LEVEL]
        if len(inputs) != len(names):
            raise ValueError(f"ort_run: {len(inputs)} inputs given, the model takes {names}")
        inputs = dict(zip(names, inputs))
    feed = {k: np.asarray(v) for k, v in inputs.items()}
    if LEVEL in decl:
        if level is None:
            raise ValueError(f"ort_run: the model takes {LEVEL!r}; pass level=")
        dt = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(decl[LEVEL].type, np.int64)
        feed[LEVEL] = np.array(level, dtype=dt)
    elif level is not None:
        raise ValueError(f"ort_run: the model has no {LEVEL!r} input, but level={level} was given")
    return [np.asarray(o) for o in sess.run(None, feed)]


__all__ = [
    "NESTABLE_OPS",
    "masked_dense_onnx",
    "nest_onnx",
    "nested_level_maps",
    "num_levels",
    "onnx_opset",
    "ort_run",
    "ort_session",
    "prunable_weights",
]
