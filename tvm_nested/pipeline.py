"""THE pass pipeline: one ``tvm.transform.Pass`` from a frontend's Relax module to VM code.

``build`` compiles through it (``tvm.compile(..., relax_pipeline=pipeline(...))``); ``tune`` runs it
up to the end of the "legalize" phase and tunes the PrimFuncs it finds there, so what is tuned is
what is built. Phases, in order (an optional step is an empty ``Sequential``, so the list is the
same for every build):

1. ``graph``: nested layers found and lowered to ``call_tir`` of packed kernels, ``main`` guarded;
2. ``stages``: ``main`` split into stage functions (``stages=``) and ``nested_stage_times``, for rerouting;
3. ``reroute``: ``main_deadline`` with the latency table compiled in (``latency_table=``);
4. ``kernels``: each nested kernel in the form its target runs (CPU: packed for its knobs, from the
   tuning log's knob table or the target family's defaults);
5. ``legalize``: TVM's library dispatch and legalization (Relax ops -> fused PrimFuncs);
6. ``schedule``: the tuning log's records, then the target's rules, then a report of the rest;
7. ``metadata``: ``nested_info()``, the artifact's description of itself;
8. ``vm``: TVM's dataflow lowering and finalisation for the Relax VM.

``dump_dir`` (or the debugging variable ``TVM_NESTED_DUMP``) writes the IR after each phase.
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm
from tvm import relax

from .contract import DUMP_ENV, RELAX_BACKENDS
from .relay_passes import (
    AddDeadlineFunction,
    AddStageTimer,
    ApplyTuningLog,
    AttachMetadata,
    BroadcastNonFiniteFull,
    FoldBatchNorm,
    FuseEpilogue,
    LevelGuard,
    LowerNestedLayers,
    NormalizeTakeIndices,
    ReportUnscheduled,
    ScheduleKernels,
    SpecializeKernels,
    SplitStages,
    SumToAdd,
)
from .target import parse_target

PHASES = ("graph", "stages", "reroute", "kernels", "legalize", "schedule", "metadata", "vm")

_NOTHING = tvm.transform.Sequential([])


def backend(target):
    """TVM's Relax backend module for ``target``; ValueError for a kind tvm_nested does not build."""
    kind = target.kind.name
    if kind not in RELAX_BACKENDS:
        raise ValueError(f"tvm_nested builds for {sorted(RELAX_BACKENDS)} targets, not {kind!r}")
    return RELAX_BACKENDS[kind]


def _stages_pass(stages, note) -> tvm.transform.Pass:
    if stages is None:
        return _NOTHING
    if isinstance(stages, (list, tuple)):
        return SplitStages(None, cuts=list(stages), note=note)
    return SplitStages(stages, note=note)


def phases(
    target,
    *,
    tuning_log=None,
    stages=None,
    stages_note: dict | None = None,
    latency_table=None,
    policy: str | None = None,
    aggressiveness: float | None = None,
    overhead_us: float = 0.0,
) -> list[tuple[str, list[tvm.transform.Pass]]]:
    """The named phases of the pipeline for ``target`` (see the module docstring)."""
    be = backend(target)
    if latency_table is not None and stages is None:
        raise ValueError("a latency table needs stages: build(..., stages=K, latency_table=table)")
    return [
        # Phase 1: graph. Frontend fixes (x[-1] read out of bounds, full(-inf) that does not
        # legalize); casts of constant level maps folded; ONNX Sum (stack + sum) back to adds;
        # inference BatchNorm folded into the
        # conv before it (its weight is what gets packed); nested layers -> call_tir of a kernel
        # taking the level, weights packed once ("nested.info"); residual adds and activations
        # after a nested layer fused into its kernel; main refuses a level out of range.
        (
            "graph",
            [
                NormalizeTakeIndices(),
                BroadcastNonFiniteFull(),
                relax.transform.FoldConstant(),
                SumToAdd(),
                FoldBatchNorm(),
                LowerNestedLayers(),
                FuseEpilogue(),
                LevelGuard(),
            ],
        ),
        # Phase 2: stage functions sharing main's kernels and constants (rerouting), and the
        # function that times them on the device (the latency table).
        ("stages", [_stages_pass(stages, stages_note), _NOTHING if stages is None else AddStageTimer()]),
        # Phase 3: main_deadline: stages + the on-device rule over the latency table.
        (
            "reroute",
            [
                _NOTHING
                if latency_table is None
                else AddDeadlineFunction(
                    latency_table, policy=policy, aggressiveness=aggressiveness, overhead_us=overhead_us
                )
            ],
        ),
        # Phase 4: each nested kernel in the form the target runs (what a tuning log records).
        ("kernels", [SpecializeKernels(target, tuning_log)]),
        # Phase 5: TVM's library dispatch and legalization: Relax ops -> fused PrimFuncs. The CPU
        # backend's legalize list is the target-independent one (CUDA's appends dlight's rules,
        # which the schedule phase applies after the nested kernels' own rule).
        ("legalize", be.library_dispatch_passes(target) + RELAX_BACKENDS["llvm"].legalize_passes(target)),
        # Phase 6: the log's records (never measured here), the target's rules, a report of the rest.
        (
            "schedule",
            [
                _NOTHING if tuning_log is None else ApplyTuningLog(target, tuning_log),
                ScheduleKernels(target),
                ReportUnscheduled(target),
            ],
        ),
        # Phase 7: nested_info(), the artifact's own metadata.
        ("metadata", [AttachMetadata(target)]),
        # Phase 8: TVM's lowering for the Relax VM.
        ("vm", be.dataflow_lower_passes(target) + be.finalize_passes(target)),
    ]


def _dump(name: str, dump_dir: Path) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name=f"tvm_nested.Dump[{name}]")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / f"{PHASES.index(name) + 1:02d}-{name}.py").write_text(mod.script())
        return mod

    return _pass


def pipeline(
    target,
    *,
    tuning_log=None,
    stages=None,
    stages_note: dict | None = None,
    latency_table=None,
    policy: str | None = None,
    aggressiveness: float | None = None,
    overhead_us: float = 0.0,
    start_at: str | None = None,
    stop_after: str | None = None,
    dump_dir: str | os.PathLike | None = None,
) -> tvm.transform.Pass:
    """The pipeline for ``target`` as one Pass; ``start_at`` / ``stop_after`` name phases to run a
    slice of it (``tune`` stops after "legalize"; ``with_latency_table`` starts at "reroute")."""
    target = parse_target(target)
    names = list(PHASES)
    first = names.index(start_at) if start_at is not None else 0
    last = names.index(stop_after) if stop_after is not None else len(names) - 1
    dump_dir = dump_dir or os.environ.get(DUMP_ENV)
    seq = []
    for name, passes in phases(
        target,
        tuning_log=tuning_log,
        stages=stages,
        stages_note=stages_note,
        latency_table=latency_table,
        policy=policy,
        aggressiveness=aggressiveness,
        overhead_us=overhead_us,
    )[first : last + 1]:
        seq.extend(passes)
        if dump_dir:
            seq.append(_dump(name, Path(dump_dir)))
    return tvm.transform.Sequential(seq, name="tvm_nested.pipeline")


__all__ = ["PHASES", "backend", "phases", "pipeline"]
