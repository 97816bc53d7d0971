"""tune: MetaSchedule (XGBoost cost model) over the nested kernels and the dense operators.

    report = tvm_nested.tune(mod, "llvm", "logs/model", max_trials=64)
    lib = tvm_nested.build(mod, "llvm", tuning_log="logs/model")   # no measurement

The workloads are the PrimFuncs of the one pipeline (``tvm_nested/pipeline.py``) at the end of its
"legalize" phase: exactly the functions ``build`` schedules and compiles.

* every nested kernel (a PrimFunc with a ``nested.op`` attr) over ``schedules.space.cpu_space``:
  the grid of ``schedule_cpu``'s knobs, measured with its REAL packed arrays (the constants at its
  ``call_tir`` site), a random input and the level. One compiled kernel serves every level, so its
  schedule is chosen on all levels together: the runner's argument sets cycle through the levels,
  one timing each, and MetaSchedule ranks a candidate by their mean (the average latency over
  levels). The per-level timings stay in the record and in the report.
* every dense operator task (``extract_tasks``) with MetaSchedule's default space. Tasks without
  loops (the 0-d level guard) are skipped: there is nothing to tune.

Everything goes into one tuning log (``schedules/tuning_log.py``: MetaSchedule's JSON database +
manifest), locked for the run and appended one whole line per measured candidate, so an interrupted
run keeps what it measured and tuning again adds. ``build`` applies it with the pipeline's
``ApplyTuningLog`` (query only). Candidates are compiled into one temporary folder per run, removed
when the run ends.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import tvm
from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..contract import ATTR_OP
from ..pipeline import pipeline
from ..relay_passes import read_nested_info
from ..runtime import BoardError
from ..schedules import choice, tuning_log
from ..schedules.cpu import is_nested_kernel
from ..schedules.space import cpu_space
from ..target import is_cross, parse_target
from .measure import (
    RPCSettings,
    arg_specs,
    best_record,
    call_sites,
    make_builder,
    make_runner,
    measure_defaults,
    metaschedule_logging,
    register_tensor_intrinsics,
    signature,
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
            f"target {tgt} does not run on this machine: tune it on the board with runner=RPCSettings(...) "
            "(tvm-nested tune --rpc HOST:PORT, or --tracker HOST:PORT --key KEY)"
        )
    if isinstance(runner, RPCSettings):
        runner.check_reachable()  # a silent or absent board is named now, not after compiling
    with (
        tuning_log.open_for_tuning(work_dir, tgt) as log,
        tempfile.TemporaryDirectory(prefix="tvm_nested_tune_") as scratch,
    ):
        return _tune(mod, tgt, log, scratch, max_trials, runner, levels, num_trials_per_iter, seed, progress, verbose)


def _tune(mod, tgt, log, scratch, max_trials, runner, levels, num_trials_per_iter, seed, progress, verbose):
    path = log.path
    start = time.time()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda *a, **k: None)

    with tgt, tvm.transform.PassContext(opt_level=3):
        graph = pipeline(tgt, stop_after="stages")(mod)
        # the sparse-or-dense choice per layer and level, measured here (local runner) on the
        # kernels specialised for the target, goes into the log first: the "kernels" phase then
        # compiles it in, so the log records the kernels build compiles
        if runner == "local":
            specialised = pipeline(tgt, start_at="kernels", stop_after="kernels")(graph)
            measured = choice.measure_choices(specialised, tgt, levels)
            table = choice.load_choices_file(path / choice.CHOICE_FILE)
            table.update(version=choice.CHOICE_VERSION, target=str(tgt))
            table.setdefault("kernels", {}).update(measured)
            log.replace_json(choice.CHOICE_FILE, table)
        lowered = pipeline(tgt, tuning_log=path, start_at="kernels", stop_after="legalize")(graph)
    info = read_nested_info(lowered) or {"num_levels": 1}
    num_levels = int(info["num_levels"])
    levels = list(range(num_levels)) if levels is None else [int(v) for v in levels]
    bad = [v for v in levels if not 0 <= v < num_levels]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of 0..{num_levels - 1}, got {levels}")
    sites = call_sites(lowered)
    tasks = [t for t in ms.relax_integration.extract_tasks(lowered, tgt) if _has_loops(t.dispatched[0]["main"])]
    tasks.sort(key=lambda t: not is_nested_kernel(t.dispatched[0]["main"]))  # nested kernels first
    kernels = {}  # signature -> real arguments, for every nested kernel
    for t in tasks:
        func = t.dispatched[0]["main"]
        if is_nested_kernel(func):
            infos = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)]
            kernels[signature(infos)] = arg_specs(sites[t.task_name])
    register_tensor_intrinsics(tgt)
    builder = make_builder(tgt, runner, scratch)
    measure = make_runner(runner, kernels=kernels, levels=levels, seed=seed)
    db = log.database
    n_nested = sum(is_nested_kernel(t.dispatched[0]["main"]) for t in tasks)
    say(
        f"[tvm-nested tune] {len(tasks)} functions ({n_nested} nested), {max_trials} trials each, "
        f"levels {levels}, log {path} (MetaSchedule's own logs: {path / tuning_log.LOGS_DIR})"
    )
    bar = tqdm(
        total=len(tasks) * max_trials,
        unit="trial",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    callback = _ProgressBar(bar)
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), callback]
    results = []
    try:
        for i, task in enumerate(tasks, start=1):
            task_mod = task.dispatched[0]
            func = task_mod["main"]
            nested = is_nested_kernel(func)
            before = len(workload_records(db, task_mod))
            callback.start(f"{i}/{len(tasks)} {task.task_name}")
            space = cpu_space(tgt) if nested else "post-order-apply"
            if nested and before == 0:
                measure_defaults(db, task_mod, tgt, builder, measure)
            with metaschedule_logging(verbose):
                ms.tune_tir(
                    task_mod,
                    tgt,
                    str(path),
                    max_trials_global=max_trials,
                    num_trials_per_iter=min(num_trials_per_iter, max_trials),
                    builder=builder,
                    runner=measure,
                    database=db,
                    cost_model="xgb",
                    measure_callbacks=callbacks,
                    space=space,
                    seed=seed,
                    strategy=ms.search_strategy.EvolutionarySearch(
                        population_size=max(64, min(512, 8 * max_trials)), max_fail_count=2
                    ),
                )
            stalled = getattr(measure, "stalled", None)
            if stalled is not None:
                raise BoardError(f"{stalled}; the records measured before are kept in {path}")
            bar.n = i * max_trials  # a search that ran out of candidates early: the next task starts here
            bar.refresh()
            records = workload_records(db, task_mod)
            best = best_record(records)
            run_secs = [float(s) for s in best.run_secs] if best is not None else None
            per_level = run_secs if nested and run_secs and len(run_secs) == len(levels) else None
            results.append(
                KernelTuning(
                    name=task.task_name,
                    kind="nested" if nested else "dense",
                    op=str(func.attrs[ATTR_OP]) if nested else task.task_name,
                    trials=len(records) - before,
                    records=len(records),
                    best_seconds=float(np.mean(run_secs)) if run_secs else None,
                    levels=list(levels) if nested else [],
                    level_seconds=per_level,
                )
            )
    finally:
        bar.close()
    report = TuningReport(str(path), str(tgt), results, time.time() - start)
    if progress:
        print(str(report), flush=True)
    return report


__all__ = ["KernelTuning", "RPCSettings", "TuningReport", "tune"]
