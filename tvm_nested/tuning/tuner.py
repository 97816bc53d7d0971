"""tune: the nested kernels' CPU knobs, measured; the dense operators with MetaSchedule (XGBoost).

    report = tvm_nested.tune(mod, "llvm", "logs/model", max_trials=64)
    lib = tvm_nested.build(mod, "llvm", tuning_log="logs/model")   # no measurement

The workloads come from the one pipeline (``tvm_nested/pipeline.py``), so what is tuned is what
``build`` compiles:

* every nested kernel, after the "stages" phase: a CPU kernel's structure decides how its weights
  are packed (``schedules/cpu.py``), so its candidates are (packing, kernel) pairs from
  ``cpu.knob_space`` (tile, input-channel blocks, row alignment, shifted copies, direct reads,
  channel chunks, partial sums, prefetch), each compiled and timed on the real packed weights at
  every level asked for (``tuning/knobs.py``: this machine or the board); the best (mean over the
  levels) goes into the log's knob table, every measurement stays in it, and tuning again measures
  the candidates not measured yet;
* every dense operator task, after the "legalize" phase with the knobs applied, with MetaSchedule's
  default space and XGBoost cost model. Tasks without loops (the 0-d level guard) are skipped.

One tuning log (``schedules/tuning_log.py``: MetaSchedule's JSON database + manifest, and
``schedules/knob_table.py``) holds both; an interrupted run keeps what it measured. ``build``
applies it in the pipeline's "kernels" and "schedule" phases (query only, never measure).
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from ..contract import call_sites
from ..pipeline import pipeline
from ..relay_passes import read_nested_info
from ..schedules import cpu, knob_table, tuning_log
from ..schedules.format import NestedCSR
from ..schedules.kernel import is_nested_kernel
from ..schedules.spec import spec_of
from ..target import is_cross, parse_target
from . import knobs
from .measure import (
    RPCSettings,
    best_record,
    make_builder,
    make_runner,
    metaschedule_logging,
    open_session,
    register_tensor_intrinsics,
    workload_records,
)


@dataclass
class KernelTuning:
    """One tuned function: a nested kernel or a dense operator task."""

    name: str
    kind: str  # "nested" or "dense"
    op: str  # nested.op ("conv2d", "linear") or the dense task's name
    trials: int  # records this run added
    records: int  # records of this workload in the log now
    best_seconds: float | None  # the best record's mean over its timings (levels, for nested)
    levels: list[int] = field(default_factory=list)
    level_seconds: list[float] | None = None  # per level in ``levels``, from the best record

    def latency(self, level: int) -> float:
        if self.level_seconds is None or level not in self.levels:
            raise KeyError(f"{self.name}: no measured latency for level {level}")
        return self.level_seconds[self.levels.index(level)]


@dataclass
class TuningReport:
    log_dir: str
    target: str
    kernels: list[KernelTuning]
    seconds: float

    @property
    def nested(self) -> list[KernelTuning]:
        return [k for k in self.kernels if k.kind == "nested"]

    @property
    def dense(self) -> list[KernelTuning]:
        return [k for k in self.kernels if k.kind == "dense"]

    def __str__(self) -> str:
        lines = [
            f"tuning log {self.log_dir} ({self.seconds:.0f} s)",
            "| function | kind | new records | best ms | per level ms |",
            "|---|---|---:|---:|---|",
        ]
        for k in self.kernels:
            best = "-" if k.best_seconds is None else f"{k.best_seconds * 1e3:.4f}"
            per = (
                ""
                if k.level_seconds is None
                else ", ".join(f"L{lvl}: {s * 1e3:.4f}" for lvl, s in zip(k.levels, k.level_seconds))
            )
            lines.append(f"| {k.name} | {k.kind} {k.op} | {k.trials} | {best} | {per} |")
        return "\n".join(lines)


def _check_cpu(target: tvm.target.Target) -> None:
    if target.kind.name != "llvm":
        raise ValueError(
            f"tuning supports llvm (CPU) targets; {target.kind.name} has no nested-kernel design space yet"
        )


def _has_loops(func) -> bool:
    """False for functions over 0-d tensors only (the level guard): nothing to tune."""
    return any(len(getattr(p.ty, "shape", ())) > 0 for p in func.params)


def tune(
    mod: tvm.IRModule,
    target,
    work_dir: str | os.PathLike,
    *,
    max_trials: int = 64,
    runner="local",
    levels=None,
    num_trials_per_iter: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> TuningReport:
    """Tune every nested kernel and dense operator of ``mod`` for ``target`` into the log ``work_dir``.

    ``max_trials``: measured candidates per function (each nested kernel, each dense task).
    ``runner``: ``"local"`` (this machine) or ``RPCSettings`` (a board). ``levels``: the levels a
    nested kernel is measured at (default: all); a candidate's cost is their mean.
    """
    if max_trials < 1 or num_trials_per_iter < 1:
        raise ValueError(f"max_trials and num_trials_per_iter must be >= 1, got {max_trials}, {num_trials_per_iter}")
    if runner != "local" and not isinstance(runner, RPCSettings):
        make_runner(runner)  # raises the explanatory TypeError
    tgt = parse_target(target)
    _check_cpu(tgt)
    if runner == "local" and is_cross(tgt):
        raise ValueError(
            f"target {tgt} does not run on this machine: tune it on the board with runner=RPCSettings(...)"
        )
    path = tuning_log.open_for_tuning(work_dir, tgt)
    start = time.time()
    say = print if progress else (lambda *a, **k: None)
    with tgt, tvm.transform.PassContext(opt_level=3):
        graph = pipeline(tgt, stop_after="stages")(mod)
    info = read_nested_info(graph) or {"num_levels": 1}
    num_levels = int(info["num_levels"])
    levels = list(range(num_levels)) if levels is None else [int(v) for v in levels]
    bad = [v for v in levels if not 0 <= v < num_levels]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of 0..{num_levels - 1}, got {levels}")
    # 1. nested kernels: their CPU knobs (structure and packing) measured on the real weights,
    #    into the log's knob table; the "kernels" phase then packs each layer for its best knobs
    results = _tune_nested(graph, tgt, path, levels, max_trials, runner, seed, say)
    # 2. the dense remainder: MetaSchedule (XGBoost cost model) over the pipeline's own PrimFuncs
    with tgt, tvm.transform.PassContext(opt_level=3):
        lowered = pipeline(tgt, tuning_log=path, start_at="kernels", stop_after="legalize")(graph)
    results += _tune_dense(lowered, tgt, path, max_trials, num_trials_per_iter, runner, seed, say)
    report = TuningReport(str(path), str(tgt), results, time.time() - start)
    say(str(report))
    return report


def _tune_nested(graph, target, path, levels, max_trials, runner, seed, say) -> list[KernelTuning]:
    session = open_session(runner) if isinstance(runner, RPCSettings) else None
    try:
        return _measure_nested(graph, target, path, levels, max_trials, session, seed, say)
    finally:
        # a TVM RPC server serves one client: the board must be free for the dense stage's runner
        # and the caller; the session (and the remote objects that reference it) go now
        del session
        gc.collect()


def _measure_nested(graph, target, path, levels, max_trials, session, seed, say) -> list[KernelTuning]:
    table = knob_table.load_knobs(path)
    sites = call_sites(graph)
    kernels = [(gv, f) for gv, f in graph.functions_items() if (s := spec_of(f)) is not None and s.layout == "rows"]
    results = []
    for i, (gv, func) in enumerate(kernels, start=1):
        spec, args = spec_of(func), sites[gv.name_hint]
        fmt = NestedCSR.from_arrays(spec.packed.cols, [c.value.numpy() for c in args[1:5]])
        key = knob_table.kernel_key(spec, fmt.level_len)
        entry = table.get(key, {"op": spec.op, "measured": []})
        done = {json.dumps(m["knobs"], sort_keys=True) for m in entry["measured"]}
        todo = [k for k in cpu.knob_space(spec, target) if json.dumps(asdict(k), sort_keys=True) not in done]
        todo = todo[: max(0, max_trials - len(done))]
        say(
            f"[tvm-nested tune] {i}/{len(kernels)} {gv.name_hint} (nested {spec.op}): {len(done)} candidates "
            f"in the log, measuring {len(todo)}",
            flush=True,
        )
        found = knobs.measure(spec, fmt, args, todo, target, levels, session=session, seed=seed)
        entry["measured"] += [
            {"knobs": asdict(c.knobs), "level_seconds": c.level_seconds, "error": c.error} for c in found
        ]
        ok = [m for m in entry["measured"] if m["level_seconds"]]
        if not ok:
            raise RuntimeError(f"{gv.name_hint}: no candidate built and ran: {found[0].error if found else '?'}")
        best = min(ok, key=lambda m: float(np.mean(m["level_seconds"])))
        entry["knobs"], entry["level_seconds"] = best["knobs"], best["level_seconds"]
        knob_table.save_knobs(path, {key: entry})
        results.append(
            KernelTuning(
                name=gv.name_hint,
                kind="nested",
                op=spec.op,
                trials=len(found),
                records=len(entry["measured"]),
                best_seconds=float(np.mean(best["level_seconds"])),
                levels=list(levels),
                level_seconds=list(best["level_seconds"]),
            )
        )
        say(
            f"[tvm-nested tune] {gv.name_hint}: best {results[-1].best_seconds * 1e3:.4f} ms ("
            + ", ".join(f"L{lv} {s * 1e3:.4f}" for lv, s in zip(levels, best["level_seconds"]))
            + ")",
            flush=True,
        )
    return results


def _tune_dense(lowered, target, path, max_trials, num_trials_per_iter, runner, seed, say) -> list[KernelTuning]:
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(lowered, target)
        if _has_loops(t.dispatched[0]["main"]) and not is_nested_kernel(t.dispatched[0]["main"])
    ]
    if not tasks:
        return []
    register_tensor_intrinsics(target)
    builder = make_builder(target, runner)
    measure = make_runner(runner, seed=seed)
    db = tuning_log.database(path)
    results = []
    for i, task in enumerate(tasks, start=1):
        task_mod = task.dispatched[0]
        before = len(workload_records(db, task_mod))
        say(f"[tvm-nested tune] dense {i}/{len(tasks)} {task.task_name}: {before} records in the log", flush=True)
        with metaschedule_logging():
            ms.tune_tir(
                task_mod,
                target,
                str(path),
                max_trials_global=max_trials,
                num_trials_per_iter=min(num_trials_per_iter, max_trials),
                builder=builder,
                runner=measure,
                database=db,
                cost_model="xgb",
                space="post-order-apply",
                seed=seed,
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=max(64, min(512, 8 * max_trials)), max_fail_count=2
                ),
            )
        records = workload_records(db, task_mod)
        best = best_record(records)
        secs = [float(s) for s in best.run_secs] if best is not None else None
        results.append(
            KernelTuning(
                name=task.task_name,
                kind="dense",
                op=task.task_name,
                trials=len(records) - before,
                records=len(records),
                best_seconds=float(np.mean(secs)) if secs else None,
            )
        )
    return results


__all__ = ["KernelTuning", "RPCSettings", "TuningReport", "tune"]
