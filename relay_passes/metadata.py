"""AttachMetadata: the artifact's description of itself, compiled into it as ``nested_info()``.

Run last among the IR passes (after scheduling and rerouting): it reads what the earlier passes
recorded as module attrs (``nested.info``: levels and layers; ``nested.stages``: the stage plan;
``nested.reroute``: the latency table and rule) and ``main``'s inputs, and adds the Relax function
``nested_info`` returning the JSON record as a uint8 tensor, so the metadata travels with the
library (export, RPC upload) and cannot get lost beside it. ``runtime/info.py`` reads it.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from ..contract import FORMAT_VERSION, INFO_ATTR, INFO_FUNC, INFO_VERSION, REROUTE_ATTR, STAGES_ATTR, dtype_of
from ..target import canonical


def _attr(mod: tvm.IRModule, key: str) -> dict | None:
    if mod.attrs is None or key not in mod.attrs:
        return None
    return json.loads(str(mod.attrs[key]))


def _main_inputs(mod: tvm.IRModule) -> list[dict]:
    out = []
    for p in mod["main"].params:
        if any(not isinstance(d, tvm.tirx.IntImm) for d in p.ty.shape):
            dims = ", ".join(str(int(d)) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in p.ty.shape)
            raise ValueError(
                f"input {p.name!r} has a dynamic shape [{dims}]: tvm_nested compiles static "
                "shapes (give them to the frontend, e.g. from_onnx(..., shape_dict=...))"
            )
        out.append({"name": p.name, "shape": [int(s) for s in p.ty.shape], "dtype": dtype_of(p)})
    return out


def collect_metadata(mod: tvm.IRModule, target) -> dict:
    """The metadata record of ``mod`` compiled for ``target`` (what ``nested_info()`` returns)."""
    nested = _attr(mod, INFO_ATTR) or {"num_levels": 1, "layers": []}
    layers = nested["layers"]
    num_levels = int(nested["num_levels"])
    dense = sum(layer["dense_bytes"] // 4 for layer in layers)
    densities = [sum(layer["nnz"][lvl] for layer in layers) / dense if dense else 1.0 for lvl in range(num_levels)]
    info = {
        "info_version": INFO_VERSION,
        "format_version": FORMAT_VERSION,
        "tvm_version": tvm.__version__,
        "target": canonical(target),
        "num_levels": num_levels,
        "densities": densities,
        "layers": layers,
        "inputs": _main_inputs(mod),
    }
    stages = _attr(mod, STAGES_ATTR)
    if stages is not None:
        info["stages"] = stages
    info.update(_attr(mod, REROUTE_ATTR) or {})
    return info


def AttachMetadata(target) -> tvm.transform.Pass:
    """Add ``nested_info()`` returning ``collect_metadata(mod, target)`` (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.AttachMetadata")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        record = json.dumps(collect_metadata(mod, target)).encode()
        bb = relax.BlockBuilder(mod)
        with bb.function(INFO_FUNC, []):
            bb.emit_func_output(relax.const(np.frombuffer(record, dtype="uint8")))
        return bb.get()

    return _pass


__all__ = ["AttachMetadata", "collect_metadata"]
