"""build: one compiled module holding every level of a nested sparse model.

``build`` = the graph pipeline (``pipeline.lower``) + a schedule for every nested kernel + the
artifact's own metadata + ``tvm.compile`` in one ``PassContext``. Scheduling, building and running
stay apart: tuning lives in ``tune.py``, running in ``runtime.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import tvm
from tvm import relax

from . import pipeline
from .info import INFO_FUNC, INFO_VERSION, InfoView
from .relay_passes.level_guard import INFO_ATTR
from .runtime import NestedRuntime
from .schedules.cpu_dense import schedule_dense
from .target import canonical, is_cross, parse_target

# Cross toolchains by target triple prefix: the compiler, the Debian packages it needs to link a .so
# (gcc alone lacks the target's libc start files: "cannot find crti.o"), and one of those files.
_CROSS_CC = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
                         "/usr/aarch64-linux-gnu/lib/crti.o")}


def _schedule_rules():
    """Schedule rule per target kind: func, target -> scheduled PrimFunc, or None when it does not apply."""
    from .schedules import schedule_cpu
    from .schedules.cuda import schedule_cuda

    return {"llvm": schedule_cpu, "cuda": schedule_cuda}


class NestedModule(InfoView):
    """The compiled artifact: one executable, every level, weights stored once."""

    def __init__(self, executable, target: tvm.target.Target, info: dict, *, ir_module: tvm.IRModule | None = None):
        self.executable = executable
        self.target = target
        self.info = info
        self._ir = ir_module  # lowered + scheduled, before the metadata: what with_latency_table recompiles

    def with_latency_table(self, table, *, adaptive: bool = True, overhead_us: float = 0.0) -> NestedModule:
        """A new module with ``table`` (from ``tvm_nested.reroute.profile_stages``) compiled in, enabling
        ``run_deadline``. Recompiles the lowered module: no re-lowering, no re-tuning. ``adaptive``: the
        on-device rule scales the table by the slowdown it observes (``tvm_nested/reroute.py``).
        ``overhead_us``: per-call cost beyond the table's stages, reserved by the rule
        (``tvm_nested.reroute.profile_overhead``)."""
        if self._ir is None:
            raise ValueError("this NestedModule keeps no IR to recompile: build it again with tvm_nested.build(..., "
                             "stages=K, latency_table=table)")
        if self.num_stages is None:
            raise ValueError("this module has no stages: build it with tvm_nested.build(mod, target, stages=K) first")
        return _compile(self._ir, self.target, dict(self.info), table, adaptive, overhead_us)

    def runtime(self, device=None, *, num_threads: int | None = None) -> NestedRuntime:
        """Run this module in this process (only for targets this machine can execute)."""
        if is_cross(self.target) and device is None:
            raise ValueError(f"module built for {self.target.kind.name} {self.target.attrs.get('mtriple', '')} cannot run on this "
                             "machine: export_library it and run it on the board (tvm_nested.load over RPC)")
        return NestedRuntime(self.executable, device, num_threads=num_threads)

    def export_library(self, path: str | os.PathLike, *, cc: str | None = None) -> str:
        """Write a shared library; cross-compiles when the target asks (``cc`` names the compiler)."""
        path = os.fspath(path)
        kwargs = {}
        triple = str(self.target.attrs.get("mtriple", "")) if self.target.kind.name == "llvm" else ""
        if cc is None and is_cross(self.target) and triple:
            arch = triple.split("-")[0]
            if arch not in _CROSS_CC:
                raise ValueError(f"no known cross compiler for triple {triple!r}: pass cc='<your {triple}-gcc>'")
            cc, packages, libc = _CROSS_CC[arch]
            if shutil.which(cc) is None or not os.path.exists(libc):
                missing = f"cross compiler {cc!r}" if shutil.which(cc) is None else f"{libc} (the target's libc)"
                raise RuntimeError(f"{missing} not found for target {triple}: install the Debian packages {packages} "
                                   f"(apt-get install {packages}) or pass cc=")
        if cc is not None:
            from tvm.support import cc as tvm_cc

            kwargs["fcompile"] = tvm_cc.cross_compiler(cc)
        self.executable.export_library(path, **kwargs)
        return path


def _main_inputs(mod: tvm.IRModule) -> list[dict]:
    out = []
    for p in mod["main"].params:
        if any(not isinstance(d, tvm.tirx.IntImm) for d in p.ty.shape):
            raise ValueError(f"input {p.name!r} has a dynamic shape {list(p.ty.shape)}: tvm_nested compiles static "
                             "shapes (give them to the frontend, e.g. from_onnx(..., shape_dict=...))")
        dt = p.ty.dtype
        out.append({"name": p.name, "shape": [int(s) for s in p.ty.shape], "dtype": getattr(dt, "dtype", str(dt))})
    return out


def _collect_info(mod: tvm.IRModule, target: tvm.target.Target) -> dict:
    attrs = mod.attrs
    if attrs is not None and INFO_ATTR in attrs:
        nested = json.loads(str(attrs[INFO_ATTR]))
    else:
        nested = {"num_levels": 1, "layers": []}
    layers = nested.get("layers", [])
    num_levels = int(nested["num_levels"])
    dense = sum(layer["dense_bytes"] // 4 for layer in layers)
    densities = [sum(layer["nnz"][lvl] for layer in layers) / dense if dense else 1.0 for lvl in range(num_levels)]
    from .schedules import FORMAT_VERSION

    return {
        "info_version": INFO_VERSION,
        "format_version": FORMAT_VERSION,
        "tvm_version": tvm.__version__,
        "target": canonical(target),
        "num_levels": num_levels,
        "densities": densities,
        "layers": layers,
        "inputs": _main_inputs(mod),
    }


def _with_info_function(mod: tvm.IRModule, info: dict) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    with bb.function(INFO_FUNC, []):
        bb.emit_func_output(relax.const(np.frombuffer(json.dumps(info).encode(), dtype="uint8")))
    return bb.get()


def schedule_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Apply the target's schedule rule to every nested kernel; report any that no rule scheduled."""
    rule = _schedule_rules().get(target.kind.name)
    unscheduled = []
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or "nested.op" not in func.attrs:
            continue
        if "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"]):
            continue
        scheduled = rule(func, target) if rule is not None else None
        if scheduled is None:
            unscheduled.append(gv.name_hint)
            continue
        # the compiled symbol follows the (unique) GlobalVar, whatever the rule copied from its template
        mod[gv] = scheduled.with_attr("tirx.is_scheduled", True).with_attr("global_symbol", gv.name_hint)
    if unscheduled:
        msg = f"no {target.kind.name} schedule for {len(unscheduled)} nested kernel(s): {', '.join(unscheduled)}"
        if target.kind.name != "llvm":
            raise RuntimeError(msg)  # an unscheduled GPU kernel does not compile; say which
        warnings.warn(msg + " (they run as plain loops)", stacklevel=2)
    return mod


def build(mod: tvm.IRModule, target="llvm", tuning_log=None, *, dump_dir=None, stages=None,
          latency_table=None) -> NestedModule:
    """Compile a Relax module from ``from_onnx`` / ``from_torch`` into one module holding every level.

    ``target``: a classic string (``"llvm -mtriple=aarch64-linux-gnu -mattr=+neon"``), dict, tag or
    ``tvm.target.Target``. ``tuning_log``: a directory written by ``tvm_nested.tune`` for this target.
    ``stages``: also compile the network as stage functions that each take the level (a count, cut
    balanced by estimated work, or a list of cut points; see ``relay_passes/stages.py``);
    ``latency_table``: the ``(stages, levels)`` microseconds from ``tvm_nested.reroute.profile_stages``,
    compiled in for ``run_deadline`` (see ``tvm_nested/reroute.py``).
    """
    if not isinstance(mod, tvm.IRModule) or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise ValueError("build expects a Relax IRModule with a 'main' function (from tvm_nested.from_onnx/from_torch)")
    tgt = parse_target(target)
    mod = pipeline.lower(mod, dump_dir)
    info = _collect_info(mod, tgt)
    # the CPU structure of every nested kernel and its sparse-or-dense table per level (from the
    # tuning log; all sparse when untuned), before the log is applied: the log keys on them
    from .schedules.choice import load_choices, specialize_module

    mod, chosen = specialize_module(mod, tgt, load_choices(tuning_log) if tuning_log is not None else None)
    for layer in info["layers"]:
        if layer.get("kernel") in chosen:
            layer["dense_levels"] = chosen[layer["kernel"]]
    if not info["layers"]:
        warnings.warn("no nested layer recognised: the model is compiled dense, with one level", stacklevel=2)
    if tuning_log is not None:
        from .tune import apply_tuning_log

        mod = apply_tuning_log(mod, tgt, tuning_log)
    mod = schedule_kernels(mod, tgt)
    if stages is None and latency_table is not None:
        stages = int(np.shape(latency_table)[0])
    if stages is not None:
        from .reroute import add_stages

        mod, info["stages"] = add_stages(mod, stages)
    return _compile(mod, tgt, info, latency_table)


def _compile(mod: tvm.IRModule, tgt: tvm.target.Target, info: dict, latency_table=None,
             adaptive: bool = True, overhead_us: float = 0.0) -> NestedModule:
    lowered = mod
    mod = schedule_dense(mod, tgt)  # legalize + fuse, default CPU schedules for the dense remainder
    info.pop("latency_table_us", None)
    info.pop("reroute_rule", None)
    info.pop("reroute_overhead_us", None)
    if latency_table is not None:
        from .reroute import add_deadline_function, check_table

        table = check_table(latency_table, int(info["stages"]["num_stages"]), int(info["num_levels"]))
        mod = add_deadline_function(mod, table, int(info["num_levels"]), adaptive, overhead_us)
        info["latency_table_us"] = table.tolist()
        info["reroute_rule"] = "adaptive" if adaptive else "table"
        info["reroute_overhead_us"] = float(overhead_us)
    mod = _with_info_function(mod, info)
    with tgt, tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target=tgt)
    return NestedModule(executable, tgt, info, ir_module=lowered)
