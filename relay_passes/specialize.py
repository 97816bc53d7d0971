"""SpecializeKernels: every nested kernel in the form its target runs, before tuning or scheduling.

Run after ``LowerNestedLayers``. On CPU targets (``schedules.cpu.specialize_cpu``) a linear kernel
gets its partial sums and a conv kernel the flat layout; then the sparse-or-dense choice per layer
and level from the tuning log's choice table is compiled in (``schedules.choice``; all sparse when
there is no log or no entry). Other targets keep the kernels as lowered. ``tvm_nested.tune``
extracts its tasks after this pass, so a tuning log records the very kernels ``build`` compiles.

The levels a kernel runs densely are recorded per layer (``dense_levels``) in ``nested.info``.
"""

from __future__ import annotations

import json

import tvm

from ..contract import INFO_ATTR, as_target
from ..schedules.choice import load_choices, specialize_module


def SpecializeKernels(target, tuning_log=None) -> tvm.transform.Pass:
    """Specialise the nested kernels for ``target`` (see the module docstring)."""
    target = as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="tvm_nested.SpecializeKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tables = load_choices(tuning_log) if tuning_log is not None else None
        mod, chosen = specialize_module(mod, target, tables)
        if not chosen or mod.attrs is None or INFO_ATTR not in mod.attrs:
            return mod
        info = json.loads(str(mod.attrs[INFO_ATTR]))
        for layer in info["layers"]:
            if layer.get("kernel") in chosen:
                layer["dense_levels"] = chosen[layer["kernel"]]
        return mod.with_attr(INFO_ATTR, json.dumps(info))

    return _pass


__all__ = ["SpecializeKernels"]
