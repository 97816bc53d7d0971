"""Frontends: a nested model from PyTorch or ONNX into a Relax IRModule (DESIGN sections 2 and 3).

Both frontends return the module that TVM's own Relax frontend produces, with

* every weight and level map bound as a constant,
* the model's inputs as ``main``'s parameters, in order (``func_attr num_input`` as TVM sets it),
* the level as a 0-d integer parameter named ``level`` (``R.Tensor((), "int32")`` by default,
  whatever integer type the model declares; the nested kernels read an int32 level).

TVM sanitises parameter names that are not identifiers (``gpu_0/data_0`` becomes ``gpu_0_data_0``);
the order of the parameters is the model's input order.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import stat
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from .contract import LEVEL, LEVEL_DTYPE, dtype_of
from .relay_passes import BroadcastNonFiniteFull, NormalizeTakeIndices

logger = logging.getLogger(__name__)

MIN_ONNX_OPSET = 13  # GreaterOrEqual, Cast to FLOAT and the DESIGN section 2 form need opset >= 13
ONNX_OPSET = 17  # what older models are converted to


# --------------------------------------------------------------------------------------------- ONNX
def load_onnx(model_or_path):
    """An ``onnx.ModelProto`` from a ModelProto, a path or bytes; ValueError on anything else."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isfile(path):
            raise ValueError(f"from_onnx: no ONNX file at {path!r}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"from_onnx: {path!r} is empty (0 bytes): not an ONNX model")
        try:
            model = onnx.load(path)
        except Exception as err:  # protobuf DecodeError and friends
            raise ValueError(f"from_onnx: {path!r} is not a readable ONNX model: {err}") from err
        if not model.graph.node and not model.graph.input:  # protobuf reads many byte strings as empty messages
            raise ValueError(f"from_onnx: {path!r} holds no ONNX graph (not an ONNX model?)")
        return model
    raise ValueError(
        f"from_onnx: expected an onnx.ModelProto or a path to a .onnx file, got {type(model_or_path).__name__}"
    )


def onnx_opset(model) -> int:
    """The default-domain (ai.onnx) opset of ``model``."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("ONNX model imports no default-domain (ai.onnx) opset")


def upgrade_onnx(model, opset: int = ONNX_OPSET, *, min_opset: int = MIN_ONNX_OPSET):
    """Convert ``model`` to ``opset`` with onnx.version_converter when it is older than ``min_opset``."""
    from onnx import version_converter

    have = onnx_opset(model)
    if have >= min_opset:
        return model
    logger.info(
        "ONNX model has opset %d (< %d): converting to opset %d with onnx.version_converter", have, min_opset, opset
    )
    try:
        return version_converter.convert_version(model, opset)
    except Exception as err:
        raise ValueError(
            f"onnx.version_converter could not convert the model from opset {have} to {opset}: {err}"
        ) from err


def graph_inputs(model) -> list:
    """The real inputs of the graph (ValueInfoProto), without initializers listed as inputs (IR v3)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _onnx_dtype(elem_type: int) -> str:
    from onnx import helper

    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _onnx_shape(vi):
    """Declared shape of a graph input: a list of ints/str (dim_param), or None when undeclared."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def check_level_input(model, shape_dict: Mapping | None = None) -> None:
    """Refuse, naming what was found, a model without a scalar integer input named ``level``."""
    inputs = graph_inputs(model)
    by_name = {i.name: i for i in inputs}
    if LEVEL not in by_name:
        found = ", ".join(repr(n) for n in by_name) or "none"
        raise ValueError(
            f"ONNX model has no input named {LEVEL!r} (inputs: {found}); a nested model takes the level as a "
            f"0-d integer input named {LEVEL!r} (see tvm_nested.onnx_nest.nest_onnx)"
        )
    vi = by_name[LEVEL]
    if not vi.type.HasField("tensor_type"):
        raise ValueError(f"ONNX input {LEVEL!r} must be a tensor, got {vi.type}")
    elem = vi.type.tensor_type.elem_type
    if not elem or np.dtype(_onnx_dtype(elem)).kind not in "iu":
        found = _onnx_dtype(elem) if elem else "undefined"
        raise ValueError(f"ONNX input {LEVEL!r} must have an integer type, got {found}")
    declared = _onnx_shape(vi)
    if shape_dict is not None and LEVEL in shape_dict and list(shape_dict[LEVEL]) != []:
        raise ValueError(
            f"shape_dict gives {LEVEL!r} the shape {list(shape_dict[LEVEL])}; the level is a scalar, shape []"
        )
    if declared is not None and declared != []:
        raise ValueError(
            f"ONNX input {LEVEL!r} has rank {len(declared)} (shape {declared}); it must be a scalar (rank 0, shape [])"
        )


# ONNX operators TVM 0.27's Relax frontend cannot import, with the route that does work
_NO_ONNX_CONVERTER = {
    op: (
        "nest the PyTorch model (tvm_nested.nn.nest or pruning.prune_model: nn.LSTM / nn.GRU become "
        "step-by-step recurrences of nested matmuls) and import it with tvm_nested.from_torch, or export "
        "that nested model to ONNX (its recurrence exports as MatMul / Gemm)"
    )
    for op in ("LSTM", "GRU", "RNN")
}


def check_onnx_ops(model) -> None:
    """Refuse, naming the op, the node and the route that works, a model using an operator TVM 0.27's
    ONNX frontend has no converter for."""
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _NO_ONNX_CONVERTER:
            raise ValueError(
                f"from_onnx: node {node.name or node.output[0]!r} is an ONNX {node.op_type}, which TVM's ONNX "
                f"frontend cannot import; {_NO_ONNX_CONVERTER[node.op_type]}"
            )


def from_onnx(
    model_or_path, shape_dict: Mapping[str, Sequence] | None = None, dtype_dict: Mapping[str, str] | None = None
):
    """Import a nested ONNX model (DESIGN section 2) into a Relax IRModule.

    ``model_or_path``: an ``onnx.ModelProto`` or a path. ``shape_dict`` / ``dtype_dict`` override the
    shapes and dtypes declared in the graph (defaults: the graph's; ``level``: shape ``[]``, int32).
    Models older than opset 13 are converted to opset 17 first (logged).
    """
    from tvm.relax.frontend.onnx import from_onnx as _tvm_from_onnx

    model = load_onnx(model_or_path)
    if shape_dict is not None and not isinstance(shape_dict, Mapping):
        raise ValueError(f"shape_dict must be a mapping from input name to shape, got {type(shape_dict).__name__}")
    if dtype_dict is not None and not isinstance(dtype_dict, Mapping):
        raise ValueError(f"dtype_dict must be a mapping from input name to dtype, got {type(dtype_dict).__name__}")
    check_onnx_ops(model)
    check_level_input(model, shape_dict)
    model = upgrade_onnx(model)

    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    unknown = set(shape_dict or ()) | set(dtype_dict or ())
    unknown -= names
    if unknown:
        raise ValueError(
            f"shape_dict/dtype_dict name inputs the model does not have: {sorted(unknown)} (inputs: {sorted(names)})"
        )
    shapes, dtypes = {}, {}
    for vi in inputs:
        shape = _onnx_shape(vi)
        if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
            shapes[vi.name] = shape
        if vi.type.tensor_type.elem_type:
            dtypes[vi.name] = _onnx_dtype(vi.type.tensor_type.elem_type)
    shapes[LEVEL] = []
    dtypes[LEVEL] = LEVEL_DTYPE
    shapes.update({k: list(v) for k, v in (shape_dict or {}).items()})
    dtypes.update(dtype_dict or {})
    for vi in inputs:  # the kernels are specialised to static shapes: a symbolic dim needs a value
        if vi.name not in shapes:
            raise ValueError(
                f"from_onnx: input {vi.name!r} has shape {_onnx_shape(vi)} with a dynamic or undeclared "
                f"dimension; tvm_nested compiles static shapes: pass shape_dict={{{vi.name!r}: [...]}} "
                f'(on the command line: --input-shapes "{vi.name}:[...]")'
            )
    if np.dtype(dtypes[LEVEL]).kind not in "iu":
        raise ValueError(f"dtype_dict gives {LEVEL!r} the dtype {dtypes[LEVEL]!r}; the level is an integer")

    mod = _fixed(_tvm_from_onnx(model, shape_dict=shapes, dtype_dict=dtypes))
    _check_level_param(mod, "from_onnx")
    return mod


# ------------------------------------------------------------------------------------------ PyTorch
@contextlib.contextmanager
def quiet_torch():
    """torch 2.13's own deprecation notice about its pytree (``isinstance(treespec, LeafSpec)``),
    raised inside torch.export itself on every load and export: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        yield


def untrusted_reason(path: str) -> str | None:
    """Why a file is in a place where someone else could have written it (None: only its owner could)."""
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0):
        return f"it is owned by another user (uid {st.st_uid})"
    if st.st_mode & stat.S_IWOTH:
        return "every user may write to it"
    parent = os.path.dirname(os.path.realpath(path))
    pst = os.stat(parent)
    if pst.st_mode & stat.S_IWOTH and not (pst.st_mode & stat.S_ISVTX and st.st_uid == os.getuid()):
        return f"its directory {parent!r} is writable by every user (anyone could have put it there)"
    return None


def load_exported_program(path, *, trusted: bool = False):
    """``torch.export.load`` of a ``.pt2`` archive, for trusted files only.

    A ``.pt2`` archive is unpickled when loaded: a crafted one runs code. Load only archives you
    made or trust. Unless ``trusted=True`` (``tvm-nested ... --trust-pt2``), one in a place others
    can write to (owned by another user, writable by all, or in a world-writable directory without
    the sticky bit) is refused with ``ValueError``. ONNX models carry no code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no .pt2 archive at {path!r}")
    if not trusted:
        why = untrusted_reason(path)
        if why is not None:
            raise ValueError(
                f"{path!r}: {why}; a .pt2 archive is unpickled by torch.export.load and can run code when "
                "loaded: load only archives you trust (trusted=True, or --trust-pt2 on the command line)"
            )
    import torch  # optional dependency: only the .pt2 route needs it

    with quiet_torch():
        try:
            return torch.export.load(path)
        except Exception as err:  # a zip that is not an export archive, a truncated file...
            raise ValueError(f"{path!r} is not a readable torch.export archive (.pt2): {err}") from err


def _level_param(module) -> inspect.Parameter:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError) as err:
        raise ValueError(f"from_torch: cannot read the signature of {type(module).__name__}.forward: {err}") from err
    if LEVEL not in sig.parameters:
        args = ", ".join(sig.parameters) or "no arguments"
        raise ValueError(
            f"from_torch: {type(module).__name__}.forward({args}) takes no argument named {LEVEL!r}; a nested "
            f"model takes the level as a 0-d integer tensor argument (wrap it with tvm_nested.nn.NestedModel "
            f"or tvm_nested.nn.nest)"
        )
    return sig.parameters[LEVEL]


def _as_level_tensor(value):
    import torch

    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"from_torch: the example level must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return torch.tensor(int(value), dtype=getattr(torch, LEVEL_DTYPE))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"from_torch: the example level must be a 0-d integer tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"from_torch: the example level must be a 0-d tensor (shape []), got shape {list(value.shape)}"
        )
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"from_torch: the example level must have an integer dtype, got {value.dtype}")
    return value.to(getattr(torch, LEVEL_DTYPE))


def split_level(module, example_args, example_kwargs=None):
    """(args, kwargs) for ``module`` with the example level found, checked and made an int32 0-d tensor.

    The level may be given positionally (where ``forward`` accepts it) or in ``example_kwargs``; for a
    keyword-only ``level`` (``NestedModel.forward(*inputs, level)``) a trailing positional level is
    moved into the keywords, so ``from_torch(nm, (x, level))`` works as DESIGN section 3 shows.
    """
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    args, kwargs = list(example_args), dict(example_kwargs or {})
    param = _level_param(module)
    if LEVEL in kwargs:
        kwargs[LEVEL] = _as_level_tensor(kwargs[LEVEL])
        return tuple(args), kwargs
    if param.kind is inspect.Parameter.KEYWORD_ONLY:
        if not args:
            raise ValueError(f"from_torch: no example value for the keyword-only argument {LEVEL!r}")
        kwargs[LEVEL] = _as_level_tensor(args.pop())
        return tuple(args), kwargs
    if param.kind is inspect.Parameter.VAR_KEYWORD:
        raise ValueError(f"from_torch: pass the example level in example_kwargs={{{LEVEL!r}: ...}}")
    pos = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    idx = [p.name for p in pos].index(LEVEL)
    if idx >= len(args):
        raise ValueError(
            f"from_torch: example_args has {len(args)} values; {LEVEL!r} is argument {idx} of forward "
            f"and has no example (pass it positionally or in example_kwargs)"
        )
    args[idx] = _as_level_tensor(args[idx])
    return tuple(args), kwargs


def from_torch(module, example_args, example_kwargs=None):
    """Import a nested PyTorch module into a Relax IRModule via ``torch.export`` (DESIGN section 2).

    ``module``: a ``tvm_nested.nn.NestedModel`` or any ``nn.Module`` whose ``forward`` takes a 0-d
    integer argument named ``level``. ``example_args`` (and ``example_kwargs``) include the level.
    The module is put in eval mode; its parameters and buffers become constants.
    An already exported ``torch.export.ExportedProgram`` (e.g. ``torch.export.load("m.pt2")``) is
    imported as it is; ``example_args`` is then ignored.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if isinstance(module, torch.export.ExportedProgram):
        with quiet_torch():
            mod = _fixed(from_exported_program(module))
        _check_level_param(mod, "from_torch")
        return mod
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ValueError(f"from_torch: example_kwargs must be a mapping, got {type(example_kwargs).__name__}")
    args, kwargs = split_level(module, example_args, example_kwargs)
    module.eval()
    with torch.no_grad(), quiet_torch():
        ep = torch.export.export(module, args, kwargs)
        mod = _fixed(from_exported_program(ep))
    _check_level_param(mod, "from_torch")
    return mod


# ------------------------------------------------------------------------------------------- shared
def _fixed(mod):
    """What TVM 0.27's frontends produce, with the ops it would miscompile rewritten (x[-1] read out
    of bounds; full(-inf) that does not legalize): the returned module runs right under tvm.compile."""
    return tvm.transform.Sequential([NormalizeTakeIndices(), BroadcastNonFiniteFull()])(mod)


def _check_level_param(mod, who: str) -> None:
    """The imported ``main`` must take a 0-d integer ``level`` (a frozen level would kill the knob)."""
    params = mod["main"].params
    lv = [p for p in params if p.name == LEVEL]
    if not lv:
        raise ValueError(
            f"{who}: the imported module has no parameter named {LEVEL!r} (params: {[p.name for p in params]}); "
            f"the level was probably folded into a constant (is it used by the model?)"
        )
    ty = lv[0].ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != 0 or np.dtype(dtype_of(lv[0])).kind not in "iu":
        raise ValueError(f"{who}: parameter {LEVEL!r} must be a 0-d integer tensor, got {ty}")


__all__ = [
    "LEVEL",
    "LEVEL_DTYPE",
    "MIN_ONNX_OPSET",
    "ONNX_OPSET",
    "check_level_input",
    "check_onnx_ops",
    "from_onnx",
    "from_torch",
    "graph_inputs",
    "load_exported_program",
    "load_onnx",
    "quiet_torch",
    "upgrade_onnx",
]
