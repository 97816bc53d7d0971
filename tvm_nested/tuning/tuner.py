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
``schedules/knob_table.py``) holds both, locked for the run, records appended whole, so an
interrupted run keeps what it measured and tuning again adds. ``build`` applies it in the
pipeline's "kernels" and "schedule" phases (query only, never measure). Candidates are compiled
into one temporary folder per run, removed when the run ends.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..contract import call_sites
from ..pipeline import pipeline
from ..relay_passes import read_nested_info
from ..runtime import BoardError
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


@derived_object
class _ProgressBar(ms.measure_callback.PyMeasureCallback):
    """MetaSchedule calls it after every measured batch: the bar advances by the batch and shows the
    task and its best mean latency so far."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar
        self.best: float | None = None

    def start(self, label: str) -> None:
        self.best = None
        self.bar.set_description_str(label, refresh=False)
        self.bar.set_postfix_str("", refresh=True)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        secs = [float(np.mean([float(s) for s in r.run_secs])) for r in runner_results if r.run_secs]
        if secs:
            self.best = min(secs) if self.best is None else min(self.best, *secs)
        if self.best is not None:
            self.bar.set_postfix_str(f"best {self.best * 1e3:.4f} ms", refresh=False)
        self.bar.update(len(runner_results))


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
    verbose: bool = False,
) -> TuningReport:
    """Tune every nested kernel and dense operator of ``mod`` for ``target`` into the log ``work_dir``.

    ``max_trials``: measured candidates per function (each nested kernel, each dense task).
    ``runner``: ``"local"`` (this machine) or ``RPCSettings`` (a board). ``levels``: the levels a
    nested kernel is measured at (default: all); a candidate's cost is their mean.
    ``progress``: one progress bar on stderr (functions, trials done of the total, the best latency
    of the current function, time left) and the report at the end; ``verbose``: MetaSchedule's own
    log lines on the terminal too (they always go to ``work_dir/logs``).

    The log is locked for this run (``schedules/tuning_log.py``): a second ``tune`` into it raises
    ``TuningLogError``; builds may read it meanwhile. A board that does not answer within
    ``RPCSettings.session_timeout`` raises ``BoardError`` naming it.
    """
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    if isinstance(num_trials_per_iter, bool) or not isinstance(num_trials_per_iter, int) or num_trials_per_iter < 1:
        raise ValueError(f"num_trials_per_iter must be an integer >= 1, got {num_trials_per_iter!r}")
    if runner != "local" and not isinstance(runner, RPCSettings):
        make_runner(runner)  # raises the explanatory TypeError
    tgt = parse_target(target)
    _check_cpu(tgt)
    if runner == "local" and is_cross(tgt):
        raise ValueError(
            f"target {target if isinstance(target, str) else tgt} does not run on this machine: tune it on the "
            "board with runner=RPCSettings(...) (tvm-nested tune --rpc HOST:PORT, or --tracker HOST:PORT --key KEY)"
        )
    if isinstance(runner, RPCSettings):
        runner.check_reachable()  # a silent or absent board is named now, not after compiling
    # the model and the levels are checked before the log is created or locked
    with tgt, tvm.transform.PassContext(opt_level=3):
        graph = pipeline(tgt, stop_after="stages")(mod)
    info = read_nested_info(graph) or {"num_levels": 1}
    num_levels = int(info["num_levels"])
    levels = list(range(num_levels)) if levels is None else [int(v) for v in levels]
    bad = [v for v in levels if not 0 <= v < num_levels]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of 0..{num_levels - 1}, got {levels}")
    with (
        tuning_log.open_for_tuning(work_dir, tgt) as log,
        tempfile.TemporaryDirectory(prefix="tvm_nested_tune_") as scratch,
    ):
        return _tune(graph, tgt, log, scratch, max_trials, runner, levels, num_trials_per_iter, seed, progress, verbose)


def _tune(graph, tgt, log, scratch, max_trials, runner, levels, num_trials_per_iter, seed, progress, verbose):
    path, start = log.path, time.time()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda *a, **k: None)
    kernels = [(gv, f) for gv, f in graph.functions_items() if (s := spec_of(f)) is not None and s.layout == "rows"]
    say(
        f"[tvm-nested tune] {len(kernels)} nested kernels and the dense operators, {max_trials} trials each, "
        f"levels {levels}, log {path} (MetaSchedule's own logs: {path / tuning_log.LOGS_DIR})"
    )
    bar = tqdm(
        total=len(kernels) * max_trials,
        unit="trial",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    try:
        # 1. nested kernels: their CPU knobs (structure and packing) measured on the real weights,
        #    into the log's knob table; the "kernels" phase then packs each layer for its best knobs
        results = _tune_nested(graph, kernels, tgt, log, levels, max_trials, runner, seed, bar)
        # 2. the dense remainder: MetaSchedule (XGBoost cost model) over the pipeline's own PrimFuncs
        with tgt, tvm.transform.PassContext(opt_level=3):
            lowered = pipeline(tgt, tuning_log=path, start_at="kernels", stop_after="legalize")(graph)
        results += _tune_dense(lowered, tgt, log, scratch, max_trials, num_trials_per_iter, runner, seed, verbose, bar)
    finally:
        bar.close()
    report = TuningReport(str(path), str(tgt), results, time.time() - start)
    if progress:
        print(str(report), flush=True)
    return report


def _tune_nested(graph, kernels, target, log, levels, max_trials, runner, seed, bar) -> list[KernelTuning]:
    board = runner if isinstance(runner, RPCSettings) else None
    table = knob_table.load_knobs(log.path)
    sites = call_sites(graph)
    results = []
    for i, (gv, func) in enumerate(kernels, start=1):
        spec, args = spec_of(func), sites[gv.name_hint]
        fmt = NestedCSR.from_arrays(spec.packed.cols, [c.value.numpy() for c in args[1:5]])
        key = knob_table.kernel_key(spec, fmt.level_len)
        entry = table.get(key, {"op": spec.op, "measured": []})
        done = {json.dumps(m["knobs"], sort_keys=True) for m in entry["measured"]}
        todo = [k for k in cpu.knob_space(spec, target) if json.dumps(asdict(k), sort_keys=True) not in done]
        todo = todo[: max(0, max_trials - len(done))]
        bar.set_description_str(f"{i}/{len(kernels)} {gv.name_hint}", refresh=False)
        found, best_so_far = [], float("inf")
        try:
            for candidate in knobs.measure(spec, fmt, args, todo, target, levels, board=board, seed=seed):
                found.append(candidate)
                best_so_far = min(best_so_far, candidate.seconds)
                if np.isfinite(best_so_far):
                    bar.set_postfix_str(f"best {best_so_far * 1e3:.4f} ms", refresh=False)
                bar.update(1)
        finally:  # a board that stopped answering: what it measured before is kept
            best = _keep_measured(log, table, key, entry, found)
        if best is None:
            raise RuntimeError(f"{gv.name_hint}: no candidate built and ran: {found[0].error if found else '?'}")
        bar.n = i * max_trials  # a short space: the next kernel starts here
        bar.refresh()
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
    return results


def _keep_measured(log, table, key, entry, found) -> dict | None:
    """Add the measured candidates to the kernel's entry and, when one ran, save the entry with its
    best (``knobs.best``: every level counts alike, none slower than the defaults) into the log's
    knob table; the best, or None."""
    entry["measured"] += [{"knobs": asdict(c.knobs), "level_seconds": c.level_seconds, "error": c.error} for c in found]
    if not any(m["level_seconds"] for m in entry["measured"]):
        return None
    best = knobs.best(entry["measured"])
    entry["knobs"], entry["level_seconds"] = best["knobs"], best["level_seconds"]
    knob_table.save_knobs(log, {key: entry})
    table[key] = entry
    return best


def _tune_dense(
    lowered, target, log, scratch, max_trials, num_trials_per_iter, runner, seed, verbose, bar
) -> list[KernelTuning]:
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(lowered, target)
        if _has_loops(t.dispatched[0]["main"]) and not is_nested_kernel(t.dispatched[0]["main"])
    ]
    if not tasks:
        return []
    register_tensor_intrinsics(target)
    builder = make_builder(target, runner, scratch)
    measure = make_runner(runner, seed=seed)
    db = log.database
    start = bar.n
    bar.total = start + len(tasks) * max_trials
    callback = _ProgressBar(bar)
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), callback]
    results = []
    for i, task in enumerate(tasks, start=1):
        task_mod = task.dispatched[0]
        before = len(workload_records(db, task_mod))
        callback.start(f"dense {i}/{len(tasks)} {task.task_name}")
        with metaschedule_logging(verbose):
            ms.tune_tir(
                task_mod,
                target,
                str(log.path),
                max_trials_global=max_trials,
                num_trials_per_iter=min(num_trials_per_iter, max_trials),
                builder=builder,
                runner=measure,
                database=db,
                cost_model="xgb",
                measure_callbacks=callbacks,
                space="post-order-apply",
                seed=seed,
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=max(64, min(512, 8 * max_trials)), max_fail_count=2
                ),
            )
        stalled = getattr(measure, "stalled", None)
        if stalled is not None:
            raise BoardError(f"{stalled}; the records measured before are kept in {log.path}")
        bar.n = start + i * max_trials
        bar.refresh()
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
