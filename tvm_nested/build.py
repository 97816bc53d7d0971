"""build: one compiled module holding every level of a nested sparse model.

``build`` is a ``PassContext`` plus ``tvm.compile`` over the one pipeline (``pipeline.py``). It
keeps the IR at two phase boundaries: after "stages" (what ``with_latency_table`` recompiles from,
without re-lowering) and after "metadata" (what the module says about itself).

``build(..., stages="auto")`` chooses the stages from measurements on the target: the network is
cut at every narrow point (``SplitStages("blocks")``: one stage per residual block, per recurrent
step), compiled, and timed on the device (``runtime/stage_timing.py``: every stage at every level,
and what one decision point costs); neighbouring stages are merged until a decision costs at most
``AUTO_MAX_SHARE`` of the densest stage it starts (``merge_stages``), and the module is compiled
again with those cuts and the measured table (the merged stages' entries summed).
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import tvm

from .contract import CROSS_TOOLCHAINS
from .pipeline import pipeline
from .relay_passes import collect_metadata, merge_stages, read_stage_plan
from .relay_passes.level_guard import read_num_levels
from .relay_passes.stages import BLOCKS
from .runtime import InfoView, NestedRuntime, decision_cost_us, example_inputs, profile_stages
from .schedules.tuning_log import check as tuning_log_check
from .target import is_cross, parse_target

AUTO = "auto"
# stages="auto": a decision point may cost at most this share of the densest stage it starts
AUTO_MAX_SHARE = 0.02


class NestedModule(InfoView):
    """The compiled artifact: one executable, every level, weights stored once."""

    def __init__(
        self,
        executable,
        target: tvm.target.Target,
        info: dict,
        *,
        staged_ir: tvm.IRModule | None = None,
        tuning_log=None,
    ):
        self.executable = executable
        self.target = target
        self.info = info
        self._staged_ir = staged_ir  # after the "stages" phase: what with_latency_table compiles
        self._tuning_log = tuning_log

    def with_latency_table(
        self, table, *, policy: str | None = None, aggressiveness: float | None = None, overhead_us: float = 0.0
    ) -> NestedModule:
        """A new module with ``table`` (from ``tvm_nested.reroute.profile_stages``) compiled in,
        enabling ``run_deadline``. Recompiles from the lowered module: no re-lowering, no tuning.
        ``policy`` (``"evidence"`` or ``"paper"``) and ``aggressiveness``: the rule a call uses when
        it names none (both are compiled in; ``relay_passes/deadline.py``). ``overhead_us``: per-call
        cost beyond the table's stages, reserved by the rule (``tvm_nested.reroute.profile_overhead``)."""
        if self.num_stages is None:
            raise ValueError("this module has no stages: build it with tvm_nested.build(mod, target, stages=K) first")
        if self._staged_ir is None:
            raise ValueError(
                "this NestedModule keeps no IR to recompile: build it again with "
                "tvm_nested.build(..., stages=K, latency_table=table)"
            )
        return _compile(
            self._staged_ir,
            self.target,
            start_at="reroute",
            tuning_log=self._tuning_log,
            stages=self.stage_plan["num_stages"],
            latency_table=table,
            policy=policy,
            aggressiveness=aggressiveness,
            overhead_us=overhead_us,
        )

    def runtime(self, device=None, *, num_threads: int | None = None) -> NestedRuntime:
        """Run this module in this process (only for targets this machine can execute)."""
        if is_cross(self.target) and device is None:
            raise ValueError(
                f"module built for {self.target.kind.name} {self.target.attrs.get('mtriple', '')} "
                "cannot run on this machine: export_library it and run it on the board "
                "(tvm_nested.load over RPC)"
            )
        return NestedRuntime(self.executable, device, num_threads=num_threads)

    def export_library(self, path: str | os.PathLike, *, cc: str | None = None) -> str:
        """Write a shared library; cross-compiles when the target asks (``cc`` names the compiler)."""
        path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):  # TVM says only "RuntimeError: Compilation error:" after compiling
            raise FileNotFoundError(f"cannot write {path!r}: directory {parent!r} does not exist")
        kwargs = {}
        triple = str(self.target.attrs.get("mtriple", "")) if self.target.kind.name == "llvm" else ""
        if cc is None and is_cross(self.target) and triple:
            cc = cross_compiler(triple)
        if cc is not None:
            from tvm.support import cc as tvm_cc  # TVM's compiler-driver helpers, only when cross-compiling

            kwargs["fcompile"] = tvm_cc.cross_compiler(cc)
        self.executable.export_library(path, **kwargs)
        return path


def cross_compiler(triple: str) -> str:
    """The installed cross compiler for ``triple``; an error naming the Debian packages to install."""
    arch = triple.split("-")[0]
    if arch not in CROSS_TOOLCHAINS:
        raise ValueError(f"no known cross compiler for triple {triple!r}: pass cc='<your {triple}-gcc>'")
    tc = CROSS_TOOLCHAINS[arch]
    if shutil.which(tc.cc) is None or not os.path.exists(tc.libc_file):
        missing = f"cross compiler {tc.cc!r}" if shutil.which(tc.cc) is None else f"{tc.libc_file} (the target's libc)"
        packages = " ".join(tc.packages)
        raise RuntimeError(
            f"{missing} not found for target {triple}: install the Debian packages {packages} "
            f"(apt-get install {packages}) or pass cc="
        )
    return tc.cc


def _compile(mod: tvm.IRModule, target, *, start_at: str | None = None, **options) -> NestedModule:
    """The pipeline from ``start_at`` on, in three slices: up to "stages" (kept for recompiling),
    up to "metadata" (read back as ``info``), and the VM lowering inside ``tvm.compile``."""
    with target, tvm.transform.PassContext(opt_level=3):
        staged = mod
        if start_at is None:
            staged = pipeline(target, stop_after="stages", **options)(mod)
        described = pipeline(target, start_at="reroute", stop_after="metadata", **options)(staged)
        executable = tvm.compile(described, target=target, relax_pipeline=pipeline(target, start_at="vm"))
    info = collect_metadata(described, target)
    return NestedModule(executable, target, info, staged_ir=staged, tuning_log=options.get("tuning_log"))


def _build_auto(mod: tvm.IRModule, target, *, measure_on, tuning_log, dump_dir) -> NestedModule:
    """``stages="auto"``: narrow-point stages timed on the target, merged, compiled with the table."""
    if measure_on is None:
        if is_cross(target):
            raise ValueError(
                "stages='auto' times the candidate stages on the target: for a board pass "
                "measure_on=lambda lib: tvm_nested.deploy.deploy(lib, 'host:port') (a runtime on the board)"
            )
        measure_on = NestedModule.runtime
    options = {"tuning_log": tuning_log, "dump_dir": dump_dir}
    with target, tvm.transform.PassContext(opt_level=3):
        graph = pipeline(target, stop_after="graph", **options)(mod)
        candidates = pipeline(target, start_at="stages", stop_after="stages", stages=BLOCKS, **options)(graph)
    plan = read_stage_plan(candidates)
    num_levels = read_num_levels(candidates)
    zeros = np.zeros((int(plan["num_stages"]), num_levels))  # main_deadline to time the decisions with
    lib = _compile(candidates, target, start_at="reroute", stages=BLOCKS, latency_table=zeros, **options)
    rt = measure_on(lib)
    if not isinstance(rt, NestedRuntime):
        raise TypeError(f"measure_on must return a NestedRuntime, got {type(rt).__name__}")
    inputs = example_inputs(rt.info)
    table = profile_stages(rt, inputs)
    decision = decision_cost_us(rt, inputs)
    del rt  # a board's RPC server serves one client at a time
    cuts, groups = merge_stages(plan, table[:, 0], decision, AUTO_MAX_SHARE)
    note = {
        "candidates": int(plan["num_stages"]),
        "candidate_cost_us": np.round(table[:, 0], 3).tolist(),
        "decision_us": round(decision, 3),
        "max_share": AUTO_MAX_SHARE,
    }
    merged = np.stack([table[g].sum(axis=0) for g in groups])
    with target, tvm.transform.PassContext(opt_level=3):
        staged = pipeline(target, start_at="stages", stop_after="stages", stages=cuts, stages_note=note, **options)(
            graph
        )
    return _compile(staged, target, start_at="reroute", stages=cuts, latency_table=merged, **options)


def build(
    mod: tvm.IRModule,
    target="llvm",
    tuning_log=None,
    *,
    dump_dir=None,
    stages=None,
    latency_table=None,
    measure_on=None,
) -> NestedModule:
    """Compile a Relax module from ``from_onnx`` / ``from_torch`` into one module holding every level.

    ``target``: a classic string (``"llvm -mtriple=aarch64-linux-gnu -mattr=+neon"``), dict, tag or
    ``tvm.target.Target``. ``tuning_log``: a directory written by ``tvm_nested.tune`` for this target.
    ``stages``: also compile the network as stage functions that each take the level (a count, cut
    balanced by estimated work, a list of cut points, ``"blocks"``: a cut at every narrow point, see
    ``relay_passes/stages.py``, or ``"auto"``:
    cut where measurements on the target say a decision is worth its cost, the latency table
    profiled and compiled in, see the module docstring); ``latency_table``: the ``(stages,
    levels)`` microseconds from ``tvm_nested.reroute.profile_stages``, compiled in for
    ``run_deadline`` (see ``relay_passes/deadline.py``). ``measure_on``: for ``stages="auto"``, a
    function from the candidate ``NestedModule`` to the ``NestedRuntime`` that times it (default:
    this machine; a board: ``lambda lib: tvm_nested.deploy.deploy(lib, "host:port")``).
    """
    if not isinstance(mod, tvm.IRModule) or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise ValueError("build expects a Relax IRModule with a 'main' function (from tvm_nested.from_onnx/from_torch)")
    tgt = parse_target(target)
    if tuning_log is not None:
        tuning_log_check(tuning_log, tgt)  # refused here, before any work, with its own error type
    if measure_on is not None and stages != AUTO:
        raise ValueError(f"measure_on is for stages='auto' (got stages={stages!r})")
    if stages == AUTO:
        if latency_table is not None:
            raise ValueError("stages='auto' profiles its own latency table: leave latency_table out")
        lib = _build_auto(mod, tgt, measure_on=measure_on, tuning_log=tuning_log, dump_dir=dump_dir)
    else:
        if isinstance(stages, str) and stages != BLOCKS:
            raise ValueError(f"stages must be a count, a list of cuts, {BLOCKS!r} or {AUTO!r}, got {stages!r}")
        if stages is None and latency_table is not None:
            stages = int(np.shape(latency_table)[0])
        lib = _compile(mod, tgt, tuning_log=tuning_log, stages=stages, latency_table=latency_table, dump_dir=dump_dir)
    if not lib.info["layers"]:
        warnings.warn("no nested layer recognised: the model is compiled dense, with one level", stacklevel=2)
    return lib


__all__ = ["AUTO", "AUTO_MAX_SHARE", "NestedModule", "build", "cross_compiler"]
